"""The keys the tests encrypt with (docs/decisions/0017).

`KEYS` are made fresh for each test session: nobody needs to set a key to run the
suite, and nothing can come to depend on a particular key. The committed
encrypted histories were recorded with the test-only keys of HISTORY_KEYS_FILE.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import TypedDict

from pydantic import SecretStr
from temporalio.client import Client

from infra import codec
from infra.keys import Keys, new_keys

KEYS = new_keys()
HISTORY_KEYS_FILE = Path(__file__).resolve().parents[1] / "histories" / "test-keys.toml"


def history_keys() -> Keys:
    return Keys.from_toml(HISTORY_KEYS_FILE.read_text())


def keys_file(folder: Path, keys: Keys = KEYS) -> Path:
    """`keys` written as a keys file (owner-only) in `folder`, for a process's --keys-file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "keys.toml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(keys.to_toml())
    return path


def with_codec(client: Client, keys: Keys = KEYS) -> Client:
    """The same connection as `client`, encrypting and decrypting with `keys`,
    as the server's and the worker's clients do."""
    config = client.config()
    config["data_converter"] = codec.data_converter(keys)
    return Client(**config)


def key_variables(keys: Keys = KEYS) -> dict[str, str]:
    """`keys` as the ORDER_*_KEY(S) variables, for a process's environment."""
    others = [key_id for key_id in keys.payload_keys if key_id != keys.encrypt_with]
    pairs = [
        f"{key_id}={_b64(keys.payload_keys[key_id])}" for key_id in [keys.encrypt_with, *others]
    ]
    return {
        "ORDER_PAYLOAD_KEYS": ",".join(pairs),
        "ORDER_CUSTOMER_ID_KEY": _b64(keys.customer_id_key),
        # Shared, so that a page token made by one test server is read by another.
        "ORDER_PAGE_TOKEN_KEYS": ",".join(_b64(key) for key in keys.page_token_keys),
    }


class KeyFields(TypedDict):
    """The fields of infra.keys.KeySettings, which the server's, the worker's and the codec
    server's settings all take."""

    payload_keys: SecretStr
    customer_id_key: SecretStr
    page_token_keys: SecretStr


def key_settings(keys: Keys = KEYS) -> KeyFields:
    """`keys` as a process's settings fields: `ServerSettings(..., **key_settings())`."""
    variables = key_variables(keys)
    return KeyFields(
        payload_keys=SecretStr(variables["ORDER_PAYLOAD_KEYS"]),
        customer_id_key=SecretStr(variables["ORDER_CUSTOMER_ID_KEY"]),
        page_token_keys=SecretStr(variables["ORDER_PAGE_TOKEN_KEYS"]),
    )


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")
