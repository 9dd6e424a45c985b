"""Signed ListOrders page tokens (docs/decisions/0021): forged, hostile, oversized, rotated.

Unit tests of server/temporal/listing.PageTokens, of validation's answer for a
token, and of the page-token keys in the keys ring (infra/keys.py); a
hypothesis fuzz over arbitrary text, bytes and tampered tokens. Through real
gRPC: tests/test_list_orders.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acme.orders.v1 import order_service_pb2 as pb
from infra.keys import PAGE_TOKEN_KEYS_KEPT, Keys, KeySettings, main, new_key, new_keys
from server.api import validation
from server.api.errors import InvalidArgument
from server.temporal import listing
from server.temporal.listing import ListFilter, PageToken, PageTokens
from tests.support.jwt import base64url
from tests.support.keys import key_settings

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
KEY, OTHER_KEY = bytes(range(32)), bytes(range(32, 64))
TOKENS = PageTokens([KEY])
TOKEN = PageToken(NOW, "order-ORD-00000000000000AB", ListFilter().digest(), timedelta(minutes=5))
GOOD = TOKEN.body()
FUZZ = settings(max_examples=300, deadline=None, database=None)


def violations(page_token: str, tokens: PageTokens = TOKENS) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        validation.validate_list_orders(pb.ListOrdersRequest(page_token=page_token), tokens)
    return {v.field: v.reason for v in caught.value.violations}


def refused(text: str, tokens: PageTokens = TOKENS) -> None:
    """Refused with a ValueError by the tokens, and as INVALID_ARGUMENT on page_token."""
    with pytest.raises(ValueError, match="token"):
        tokens.decode(text)
    assert set(violations(text, tokens)) == {"page_token"}


# --- What is accepted ------------------------------------------------------------------------


def test_a_token_round_trips_and_reads_as_opaque_ascii() -> None:
    text = TOKENS.encode(TOKEN)
    assert TOKENS.decode(text) == TOKEN
    body, mac = text.split(".")
    assert base64.urlsafe_b64decode(body + "==") == GOOD
    assert len(base64.urlsafe_b64decode(mac + "=")) == 32
    # The longest a server writes (a workflow id of 255 characters) fits the bound.
    longest = PageToken(NOW, "w" * 255, "f" * 64, listing.MAX_WINDOW)
    assert len(TOKENS.encode(longest)) <= listing.MAX_PAGE_TOKEN_CHARS


def test_rotation_the_newest_key_signs_and_every_key_verifies() -> None:
    before = PageTokens([KEY])
    after = PageTokens([OTHER_KEY, KEY])
    handed_out = before.encode(TOKEN)
    assert after.decode(handed_out) == TOKEN, "a token from before the rotation still works"
    signed_now = after.encode(TOKEN)
    assert signed_now != handed_out
    assert PageTokens([OTHER_KEY]).decode(signed_now) == TOKEN, "signed with the new key"
    refused(handed_out, PageTokens([OTHER_KEY]))  # once the old key is gone


# --- What is refused -------------------------------------------------------------------------


def test_a_forged_token_valid_json_and_the_wrong_mac_is_refused() -> None:
    # What the unsigned tokens were: anyone could write one.
    refused(base64url(GOOD))
    refused(f"{base64url(GOOD)}.{base64url(bytes(32))}")
    refused(PageTokens([OTHER_KEY]).encode(TOKEN))
    # A genuine MAC on another body.
    genuine_mac = TOKENS.encode(TOKEN).split(".")[1]
    moved = PageToken(NOW, "order-ORD-00000000000000ZZ", TOKEN.filter_digest, TOKEN.window)
    refused(f"{base64url(moved.body())}.{genuine_mac}")
    # A MAC of the body alone, without the service's context string.
    refused(f"{base64url(GOOD)}.{base64url(hmac.digest(KEY, GOOD, hashlib.sha256))}")


def test_deep_nesting_is_invalid_argument_not_a_recursion_error() -> None:
    deep = b"[" * 10_000
    refused(base64url(deep))  # the report's token, unsigned
    assert violations(base64url(deep)) == {"page_token": "TOO_LONG"}
    refused(PageTokens([OTHER_KEY]).sign(b"[" * 700))
    # Even a body with a valid MAC never reaches the caller as anything but ValueError.
    refused(TOKENS.sign(b"[" * 700))
    for nested in (b"[" * 100_000, b'{"a":' * 100_000):
        with pytest.raises(ValueError, match="token"):
            PageToken.from_body(nested)


@pytest.mark.parametrize("size", [listing.MAX_PAGE_TOKEN_CHARS + 1, 10**6, 16 * 10**6])
def test_an_oversized_token_is_refused_before_it_is_decoded(size: int) -> None:
    text = ("A" * size)[: size - 44] + "." + "A" * 43
    started = time.monotonic()
    refused(text)
    assert violations(text) == {"page_token": "TOO_LONG"}
    assert time.monotonic() - started < 1.0


def test_a_genuinely_signed_body_over_the_bound_is_refused_too() -> None:
    """The bound holds in PageTokens.decode itself, not only in validation."""
    padded = GOOD + b" " * listing.MAX_PAGE_TOKEN_CHARS  # valid JSON, valid MAC, too long
    text = TOKENS.sign(padded)
    assert PageToken.from_body(padded) == TOKEN
    with pytest.raises(ValueError, match="too long"):
        TOKENS.decode(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        ".",
        "garbage",
        "!!!!",
        "é",
        "e30",  # {}
        "bnVsbA",  # null
        "a.b",
        TOKENS.encode(TOKEN)[:-1],
        TOKENS.encode(TOKEN) + "A",
        TOKENS.encode(TOKEN).replace(".", ".."),
        "A." + TOKENS.encode(TOKEN).split(".")[1],  # a body of one character: not base64
        " " + TOKENS.encode(TOKEN),
        TOKENS.encode(TOKEN) + "\n",
        TOKENS.encode(TOKEN).replace("-", "+").replace("_", "/") + "=",
    ],
)
def test_malformed_tokens_are_refused(text: str) -> None:
    if text:
        refused(text)
    else:
        with pytest.raises(ValueError, match="token"):
            TOKENS.decode(text)


def test_signed_bodies_with_bad_fields_are_refused() -> None:
    """Defence in depth: even what our key signed is checked field by field."""
    good = json.loads(GOOD)
    for bad in (
        {**good, "v": 2},
        {**good, "t": "yesterday"},
        {**good, "t": "2025-01-01T00:00:00"},  # naive
        {**good, "id": ""},
        {**good, "id": 7},
        {**good, "id": "w" * 256},
        {**good, "f": None},
        {**good, "w": 0},
        {**good, "w": True},
        {**good, "w": 10**15},
        [good],
        "token",
    ):
        refused(TOKENS.sign(json.dumps(bad).encode()))
    refused(TOKENS.sign(b"\xff\xfe"))


def test_no_keys_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="at least one key"):
        PageTokens([])


def test_without_configured_keys_a_server_signs_with_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A keys file from before page-token keys: nothing derived, a warning, no shared tokens."""
    with caplog.at_level("WARNING", logger=listing.__name__):
        one, two = PageTokens.for_keys(()), PageTokens.for_keys(())
    assert one.decode(one.encode(TOKEN)) == TOKEN
    refused(one.encode(TOKEN), two)
    assert "python -m infra.keys rotate" in caplog.text
    assert PageTokens.for_keys([KEY]).decode(TOKENS.encode(TOKEN)) == TOKEN


# --- Fuzz ----------------------------------------------------------------------------------------

ALPHABET = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/")


@FUZZ
@given(
    text=st.one_of(
        st.text(),
        ALPHABET,
        st.binary().map(lambda raw: raw.decode("latin-1")),
        st.binary().map(base64url),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
            lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        ).map(lambda value: base64url(json.dumps(value).encode())),
        st.tuples(st.binary(), st.binary(min_size=32, max_size=32)).map(
            lambda parts: f"{base64url(parts[0])}.{base64url(parts[1])}"
        ),
        st.integers(1, 200).map(lambda depth: base64url(b"[" * depth * 50)),
    )
)
def test_fuzz_anything_made_up_is_invalid_argument_on_page_token(text: str) -> None:
    with pytest.raises(ValueError, match="token"):
        TOKENS.decode(text)
    if text:
        assert set(violations(text)) == {"page_token"}


@FUZZ
@given(position=st.integers(min_value=0), replacement=st.characters(exclude_categories=["Cs"]))
def test_fuzz_a_tampered_token_is_refused_or_means_the_same(
    position: int, replacement: str
) -> None:
    """Changing any one character gives a refusal, or the same token (base64's spare
    bits in the last character): never another position."""
    genuine = TOKENS.encode(TOKEN)
    index = position % len(genuine)
    tampered = genuine[:index] + replacement + genuine[index + 1 :]
    try:
        assert TOKENS.decode(tampered) == TOKEN
    except ValueError:
        assert set(violations(tampered)) == {"page_token"}


@settings(
    max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(body=st.binary(max_size=600))
def test_fuzz_any_body_our_key_signs_is_a_token_or_a_value_error(body: bytes) -> None:
    text = TOKENS.sign(body)
    try:
        TOKENS.decode(text)
    except ValueError:
        assert set(violations(text)) == {"page_token"}


# --- The keys ring: page_token_keys in infra/keys.py ------------------------------------------


def test_new_keys_have_a_page_token_key_and_the_toml_keeps_its_order() -> None:
    keys = new_keys()
    assert len(keys.page_token_keys) == 1
    rotated = keys.rotated()
    again = Keys.from_toml(rotated.to_toml())
    assert again == rotated
    assert again.page_token_keys[1] == keys.page_token_keys[0]


def test_rotate_signs_with_a_new_key_and_keeps_the_one_before() -> None:
    keys = new_keys()
    tokens_before = PageTokens(keys.page_token_keys)
    handed_out = tokens_before.encode(TOKEN)
    once = keys.rotated()
    assert once.page_token_keys[1:] == keys.page_token_keys
    assert PageTokens(once.page_token_keys).decode(handed_out) == TOKEN
    twice = once.rotated()
    assert len(twice.page_token_keys) == PAGE_TOKEN_KEYS_KEPT
    refused(handed_out, PageTokens(twice.page_token_keys))


def test_a_keys_file_from_before_page_token_keys_still_loads(tmp_path: Path) -> None:
    """It has none; `rotate` adds one; the server meanwhile signs with its own (see above)."""
    current = new_keys()
    older = Keys(current.payload_keys, current.encrypt_with, current.customer_id_key)
    path = tmp_path / "keys.toml"
    path.write_text(older.to_toml())
    assert "page_token_keys" not in path.read_text()
    assert KeySettings(keys_file=path).keys.page_token_keys == ()
    assert main(["rotate", str(path)]) == 0
    assert len(KeySettings(keys_file=path).keys.page_token_keys) == 1


def test_page_token_keys_from_variables() -> None:
    keys = new_keys().rotated()
    loaded = KeySettings(**key_settings(keys)).keys
    assert loaded.page_token_keys == keys.page_token_keys


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ('page_token_keys = "abc"', "must be a list"),
        ('page_token_keys = ["not base64!"]', "is not base64"),
        (f'page_token_keys = ["{base64.b64encode(b"short").decode()}"]', "needs 32"),
    ],
)
def test_bad_page_token_keys_are_refused_by_name(line: str, error: str) -> None:
    keys = new_keys()
    older = Keys(keys.payload_keys, keys.encrypt_with, keys.customer_id_key)
    text = older.to_toml().replace("\n\n[payload_keys]", f"\n{line}\n\n[payload_keys]")
    with pytest.raises(ValueError, match=error) as caught:
        Keys.from_toml(text)
    assert "page_token_keys" in str(caught.value)


def test_a_page_token_key_is_a_key_of_its_own() -> None:
    assert new_key() != new_key()
    keys = new_keys()
    assert keys.page_token_keys[0] not in (keys.customer_id_key, *keys.payload_keys.values())
