"""The payloads of a history printed as JSON (`temporal workflow show -o json`, the API's JSON)."""

from __future__ import annotations

import json
from typing import Any


def json_payloads(history_json: str) -> list[dict[str, Any]]:
    """Every payload in the document (metadata and data in base64), however deep."""
    payloads: list[dict[str, Any]] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("metadata"), dict) and isinstance(node.get("data"), str):
                payloads.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(history_json))
    return payloads
