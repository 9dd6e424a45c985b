"""The rules for personal data, on their own: the customer-id hash, masked emails, safe reasons.

tests/test_no_plain_pii.py shows the whole service keeping to them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workflows import rules, search_attributes

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


# --- The customer-id hash ---------------------------------------------------------------


def test_the_customer_key_is_a_versioned_hmac_of_the_id() -> None:
    value = search_attributes.customer_key(KEY, "CUST-001")
    assert re.fullmatch(r"h1:[0-9a-f]{64}", value)
    assert value == "h1:" + hmac.new(KEY, b"CUST-001", hashlib.sha256).hexdigest()
    assert "CUST-001" not in value
    # Keyed: a plain hash of a guessed id finds nothing.
    assert value != "h1:" + hashlib.sha256(b"CUST-001").hexdigest()


def test_the_customer_key_tells_ids_and_keys_apart() -> None:
    one = search_attributes.customer_key(KEY, "CUST-001")
    assert search_attributes.customer_key(KEY, "CUST-001") == one
    assert search_attributes.customer_key(KEY, "CUST-002") != one
    assert search_attributes.customer_key(KEY, "cust-001") != one
    assert search_attributes.customer_key(OTHER_KEY, "CUST-001") != one


# --- Masked email addresses -------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "masked"),
    [
        ("alice@example.com", "a***@example.com"),
        ("Zq.pii+tag@mail.example.org", "Z***@mail.example.org"),
        ("a@b.co", "a***@b.co"),
        ("@example.com", "***@example.com"),
        (".dot@example.com", "***@example.com"),
        ("no-at-sign", "***"),
        ("", "***"),
        # Never a line break or another address, whatever the text holds.
        ("a@b.example\r\nBcc: all@evil.example", "a***@***"),
        ("x@evil.example>\n<y", "x***@***"),
    ],
)
def test_mask_email(address: str, masked: str) -> None:
    assert rules.mask_email(address) == masked


@given(st.text())
def test_a_masked_address_shows_at_most_one_character_of_the_name(text: str) -> None:
    masked = rules.mask_email(text)
    name, _, domain = masked.partition("***")
    assert len(name) <= 1
    assert domain == "" or domain.startswith("@")
    assert masked.isprintable()


def test_an_invalid_address_is_masked_in_its_error() -> None:
    for text in ["zq-secret@example.com\r\nBcc: x@y.example", "zq-secret"]:
        with pytest.raises(rules.InvalidEmailAddress) as caught:
            rules.parse_email_address(text)
        assert "zq-secret" not in str(caught.value)


# --- Cancellation reasons ---------------------------------------------------------------

BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


@pytest.mark.parametrize("char", [*BIDI, *"\n\r\t\x00\x1b\x7f\x85\u2028\u2029"])
def test_a_reason_with_a_control_or_bidi_character_is_unsafe(char: str) -> None:
    assert not rules.is_safe_reason(f"a{char}b")
    assert rules.is_safe_reason(rules.safe_reason(f"a{char}b"))


def test_every_bidi_control_is_listed() -> None:
    """Every character Unicode classes as an embedding, override or isolate, or as an
    implicit direction mark, is in the rule."""
    directional = {
        chr(code)
        for code in range(0x110000)
        if unicodedata.bidirectional(chr(code))
        in ("LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI")
        or chr(code) in "\u200e\u200f\u061c"
    }
    assert directional == set(BIDI) == rules.BIDI_CONTROLS


@given(st.text())
def test_a_safe_reason_is_always_safe_and_keeps_a_safe_one_as_it_is(text: str) -> None:
    cleaned = rules.safe_reason(text)
    assert rules.is_safe_reason(cleaned)
    assert len(cleaned) == len(text)
    if rules.is_safe_reason(text):
        assert cleaned == text


def test_breaks_become_spaces_and_other_controls_a_replacement_character() -> None:
    assert rules.safe_reason("one\r\ntwo\tthree") == "one  two three"
    assert rules.safe_reason("evil\u202etxt.exe\x1b") == "evil\ufffdtxt.exe\ufffd"
