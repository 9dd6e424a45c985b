"""The secrets that keep customer data unreadable in Temporal (docs/decisions/0017).

- payload keys (AES-256): the newest encrypts every payload, every one decrypts;
- the customer-id key (HMAC-SHA256): what visibility holds instead of a customer id;
- page-token keys (HMAC-SHA256): the first signs ListOrders page tokens, every one
  verifies (docs/decisions/0021).

They come from a TOML keys file, or from variables (for secret stores that inject them):

    # keys.toml, made by `python -m infra.keys new keys.toml`
    encrypt_with = "k-20261205-0a1b"
    customer_id_key = "<base64 of 32 bytes>"
    page_token_keys = ["<base64 of 32 bytes>"]   # newest first

    [payload_keys]
    "k-20261205-0a1b" = "<base64 of 32 bytes>"

    python -m infra.keys new FILE      # a new file with fresh keys (refuses to overwrite)
    python -m infra.keys rotate FILE   # adds a payload key and encrypts with it from now on,
                                       # and a page-token key that signs from now on
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import secrets
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

from pydantic import PrivateAttr, SecretStr, model_validator

from infra.settings import ExistingFile, Options, load_file, secret_value, setting

KEY_BYTES = 32
# Page-token keys `rotate` keeps: the new one and the one before, so tokens handed out
# before a rotation keep working. A page token lasts a listing, not an order's life.
PAGE_TOKEN_KEYS_KEPT = 2


@dataclass(frozen=True)
class Keys:
    """Payload keys by id, the id that encrypts, the customer-id key, the page-token keys.

    page_token_keys: newest first; empty in a keys file from before them (the
    server then signs with a key of its own process: server/temporal/listing.py).
    """

    payload_keys: Mapping[str, bytes]
    encrypt_with: str
    customer_id_key: bytes
    page_token_keys: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if self.encrypt_with not in self.payload_keys:
            raise ValueError(
                f"encrypt_with names {self.encrypt_with!r}, which is not a payload key"
            )
        named = [
            *self.payload_keys.items(),
            ("customer_id_key", self.customer_id_key),
            *((f"page_token_keys[{i}]", key) for i, key in enumerate(self.page_token_keys)),
        ]
        for key_id, key in named:
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {key_id!r} has {len(key)} bytes; it needs {KEY_BYTES}")

    @classmethod
    def from_toml(cls, text: str) -> Self:
        """Raises ValueError naming what is wrong (never a key's value)."""
        try:
            data = tomllib.loads(text)
            payload = data["payload_keys"]
            return cls(
                payload_keys={str(k): _key(k, v) for k, v in payload.items()},
                encrypt_with=str(data["encrypt_with"]),
                customer_id_key=_key("customer_id_key", data["customer_id_key"]),
                page_token_keys=_page_token_keys(data.get("page_token_keys", [])),
            )
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"not TOML: {err}") from None
        except KeyError as err:
            raise ValueError(f"missing {err.args[0]}") from None
        except AttributeError:
            raise ValueError("payload_keys must be a table of id = base64 key") from None

    @classmethod
    def from_variables(
        cls, payload_keys: str, customer_id_key: str, page_token_keys: str = ""
    ) -> Self:
        """`payload_keys` is "id=base64,id=base64", the first encrypting;
        `page_token_keys` "base64,base64", the first signing."""
        pairs = [part.strip().partition("=") for part in payload_keys.split(",") if part.strip()]
        if not pairs or any(not key_id or not sep for key_id, sep, _ in pairs):
            raise ValueError("payload keys must be id=base64 pairs, comma-separated")
        return cls(
            payload_keys={key_id.strip(): _key(key_id, value) for key_id, _, value in pairs},
            encrypt_with=pairs[0][0].strip(),
            customer_id_key=_key("customer_id_key", customer_id_key),
            page_token_keys=_page_token_keys(
                [part.strip() for part in page_token_keys.split(",") if part.strip()]
            ),
        )

    def to_toml(self) -> str:
        page_token_keys = ", ".join(f'"{_b64(key)}"' for key in self.page_token_keys)
        lines = [
            "# Made by `python -m infra.keys`. Keep it secret, and keep every key that ever",
            "# encrypted: an order whose key is lost cannot be read (docs/decisions/0017).",
            f'encrypt_with = "{self.encrypt_with}"',
            f'customer_id_key = "{_b64(self.customer_id_key)}"',
            *([f"page_token_keys = [{page_token_keys}]"] if self.page_token_keys else []),
            "",
            "[payload_keys]",
            *(f'"{key_id}" = "{_b64(key)}"' for key_id, key in self.payload_keys.items()),
        ]
        return "\n".join(lines) + "\n"

    def rotated(self) -> Keys:
        """The same keys plus a new payload key, which encrypts from now on, and a new
        page-token key, which signs from now on (the one before it still verifies)."""
        key_id = new_key_id()
        while key_id in self.payload_keys:
            key_id = new_key_id()
        page_token_keys = (new_key(), *self.page_token_keys)[:PAGE_TOKEN_KEYS_KEPT]
        return Keys(
            {**self.payload_keys, key_id: new_key()},
            key_id,
            self.customer_id_key,
            page_token_keys,
        )


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def new_key_id() -> str:
    """Readable and unique: the day it was made, and some randomness."""
    return f"k-{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(2)}"


def new_keys() -> Keys:
    key_id = new_key_id()
    return Keys({key_id: new_key()}, key_id, new_key(), (new_key(),))


def _key(name: object, value: object) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"key {name!r} is not base64") from None


def _page_token_keys(values: object) -> tuple[bytes, ...]:
    if not isinstance(values, list):
        raise ValueError("page_token_keys must be a list of base64 keys, newest first")
    return tuple(_key(f"page_token_keys[{i}]", value) for i, value in enumerate(values))


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


class KeySettings(Options):
    """Keys: payload encryption and the customer-id hash (docs/decisions/0017)."""

    keys_file: ExistingFile | None = setting(
        None,
        "ORDER_KEYS_FILE",
        "TOML file of the payload keys and the customer-id key "
        "(`python -m infra.keys new FILE` makes one)",
        shown="none",
    )
    payload_keys: SecretStr | None = setting(
        None,
        "ORDER_PAYLOAD_KEYS",
        "instead of a keys file: payload keys as id=base64 pairs, comma-separated; "
        "the first encrypts",
        shown="none",
    )
    customer_id_key: SecretStr | None = setting(
        None,
        "ORDER_CUSTOMER_ID_KEY",
        "instead of a keys file: the base64 customer-id key (HMAC-SHA256)",
        shown="none",
    )
    page_token_keys: SecretStr | None = setting(
        None,
        "ORDER_PAGE_TOKEN_KEYS",
        "instead of a keys file: the base64 keys that sign ListOrders page tokens "
        "(HMAC-SHA256), comma-separated, the first signing; without any, each server "
        "signs with a key of its own",
        shown="none",
    )
    _keys: Keys | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _load_keys(self) -> Self:
        from_variables = any(
            value is not None
            for value in (self.payload_keys, self.customer_id_key, self.page_token_keys)
        )
        if self.keys_file is not None and from_variables:
            raise ValueError(
                "give the keys either in a file (--keys-file) or in variables "
                "(ORDER_PAYLOAD_KEYS, ORDER_CUSTOMER_ID_KEY, ORDER_PAGE_TOKEN_KEYS), not both"
            )
        if self.keys_file is not None:
            self._keys = load_file(
                self.keys_file, Keys.from_toml, lambda problem: ValueError(f"keys file: {problem}")
            )
        elif from_variables:
            payload, customer = secret_value(self.payload_keys), secret_value(self.customer_id_key)
            if not payload or not customer:
                raise ValueError("ORDER_PAYLOAD_KEYS and ORDER_CUSTOMER_ID_KEY go together")
            self._keys = Keys.from_variables(
                payload, customer, secret_value(self.page_token_keys) or ""
            )
        return self

    @property
    def has_keys(self) -> bool:
        return self._keys is not None

    @staticmethod
    def missing_keys_message() -> str:
        return (
            "no keys: give --keys-file or ORDER_KEYS_FILE (make one with "
            "`python -m infra.keys new .temporal/keys.toml`), or ORDER_PAYLOAD_KEYS "
            "and ORDER_CUSTOMER_ID_KEY"
        )

    @property
    def keys(self) -> Keys:
        """The keys; ValueError if none were given (every process that reads orders needs them)."""
        if self._keys is None:
            raise ValueError(self.missing_keys_message())
        return self._keys


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.keys", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", choices=["new", "rotate"])
    parser.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    path: Path = args.file
    if args.command == "new":
        if path.exists():
            parser.error(f"{path} exists; `rotate` adds a key to it")
        keys = new_keys()
    else:
        try:
            keys = Keys.from_toml(path.read_text()).rotated()
        except (OSError, ValueError) as err:  # a missing or broken file: say so, no traceback
            parser.error(f"cannot rotate {path}: {err}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole under a temporary name, then renamed: never half a keys file.
    temporary = path.with_name(path.name + ".new")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(keys.to_toml())
    temporary.replace(path)
    rotated = ", a new page-token key signs" if args.command == "rotate" else ""
    print(f"{path}: payload key {keys.encrypt_with} encrypts from now on{rotated}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
