"""Payload encryption: AES-256-GCM over every payload Temporal stores (docs/decisions/0017).

Each payload becomes `encoding: binary/encrypted`, `encryption-key-id: <id>`,
data = a fresh 12-byte nonce + the sealed original Payload (its metadata too).
The key id and the encoding are bound as associated data. Payloads not marked
encrypted (orders started before encryption) pass through decode unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    PayloadCodec,
)

from infra.keys import Keys

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
NONCE_BYTES = 12
TAG_BYTES = 16


class UndecryptablePayload(ValueError):
    """An encrypted payload this codec cannot open; the message names the key id, never a key."""


def is_encrypted(payload: Payload) -> bool:
    return payload.metadata.get("encoding") == ENCODING


def key_id_of(payload: Payload) -> str:
    return payload.metadata.get(KEY_ID, b"").decode("utf-8", "replace")


def _associated_data(key_id: str) -> bytes:
    # The encoding has a fixed length, so the two parts cannot be confused.
    return ENCODING + b":" + key_id.encode()


class EncryptionCodec(PayloadCodec):
    """Encrypts with the keys' newest payload key; decrypts with any of them."""

    def __init__(self, keys: Keys) -> None:
        super().__init__()
        self.encrypt_with = keys.encrypt_with
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.payload_keys.items()}

    def encrypt(self, payload: Payload) -> Payload:
        key_id = self.encrypt_with
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[key_id].encrypt(
            nonce, payload.SerializeToString(), _associated_data(key_id)
        )
        return Payload(
            metadata={"encoding": ENCODING, KEY_ID: key_id.encode()}, data=nonce + sealed
        )

    def decrypt(self, payload: Payload) -> Payload:
        """The original payload; one not marked encrypted as it is. Raises UndecryptablePayload."""
        if not is_encrypted(payload):
            return payload
        key_id = key_id_of(payload)
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise UndecryptablePayload(
                f"payload encrypted with key {key_id!r}, which is not among the payload keys "
                f"({', '.join(sorted(self._ciphers))}): add it back to the keys file"
            )
        data = payload.data
        if len(data) < NONCE_BYTES + TAG_BYTES:
            raise UndecryptablePayload(f"payload encrypted with key {key_id!r} is truncated")
        try:
            plain = cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], _associated_data(key_id))
        except InvalidTag:
            raise UndecryptablePayload(
                f"payload encrypted with key {key_id!r} does not decrypt: "
                "altered, or another key under the same id"
            ) from None
        return Payload.FromString(plain)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(payload) for payload in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(payload) for payload in payloads]


def data_converter(keys: Keys) -> DataConverter:
    """The default converter, every payload encrypted; failure messages and stack traces
    moved into an encoded (so encrypted) attribute, as they may quote customer data."""
    return dataclasses.replace(
        DataConverter.default,
        payload_codec=EncryptionCodec(keys),
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )
