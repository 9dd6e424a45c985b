"""server.tokens: the tokens file, roles, expiry, lookup, and the `new` / `hash` CLI."""

from __future__ import annotations

import hashlib
import io
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from server import tokens as tokens_cli
from server.platform import tokens
from tests.support.access import ROLE_RPCS

SERVICE = "/acme.orders.v1.OrderService"
TOKEN = "ord_test-token"
DIGEST = hashlib.sha256(TOKEN.encode()).hexdigest()


def entry(**fields: str) -> str:
    lines = ["[[callers]]", *(f"{key} = {value}" for key, value in fields.items())]
    return "\n".join(lines) + "\n"


def test_new_tokens_are_random_and_recognisable() -> None:
    first, second = tokens.new_token(), tokens.new_token()
    assert first != second
    assert re.fullmatch(r"ord_[A-Za-z0-9_-]{43}", first)
    assert tokens.hash_token(first) == hashlib.sha256(first.encode()).hexdigest()


def test_identify_finds_the_caller_by_its_token() -> None:
    store = tokens.parse(
        entry(name='"storefront"', token_sha256=f'"{DIGEST}"', role='"storefront"')
        + entry(name='"payments"', token_sha256=f'"{"0" * 64}"', role='"payment-gateway"')
    )
    assert len(store) == 2
    caller = store.identify(TOKEN)
    assert caller is not None
    assert caller.name == "storefront"
    assert store.identify("ord_other") is None
    assert store.identify("") is None


@pytest.mark.parametrize(("role", "allowed"), list(ROLE_RPCS.items()))
def test_roles(role: str, allowed: frozenset[str]) -> None:
    store = tokens.parse(entry(name='"c"', token_sha256=f'"{DIGEST}"', role=f'"{role}"'))
    caller = store.identify(TOKEN)
    assert caller is not None
    may = caller.principal.may_call
    assert {rpc for rpc in tokens.ORDER_METHODS if may(f"{SERVICE}/{rpc}")} == allowed
    # Only admin reaches services beyond OrderService.
    assert may("/acme.other.v1.Other/Do") == (role == "admin")


def test_methods_alone_or_added_to_a_role() -> None:
    store = tokens.parse(
        entry(name='"board"', token_sha256=f'"{DIGEST}"', methods='["GetOrderStatus"]')
        + entry(
            name='"shop"',
            token_sha256=f'"{"a" * 64}"',
            role='"payment-gateway"',
            methods='["GetOrder"]',
        )
    )
    board, shop = store.callers
    assert board.methods == frozenset({f"{SERVICE}/GetOrderStatus"})
    assert shop.methods == frozenset({f"{SERVICE}/ConfirmPayment", f"{SERVICE}/GetOrder"})


@pytest.mark.parametrize(
    "expires", ["2027-01-01T00:00:00Z", '"2027-01-01T00:00:00Z"', '"2027-01-01T01:00:00+01:00"']
)
def test_expiry_as_a_toml_datetime_or_a_string(expires: str) -> None:
    store = tokens.parse(
        entry(name='"c"', token_sha256=f'"{DIGEST}"', role='"admin"', expires=expires)
    )
    caller = store.callers[0]
    assert caller.expires == datetime(2027, 1, 1, tzinfo=UTC)
    assert not caller.expired(datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC))
    assert caller.expired(datetime(2027, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "lists no callers"),
        ("callers = []", "lists no callers"),
        ("[[callers]\n", "not valid TOML"),
        ('[[caller]]\nname = "x"', "unknown key 'caller'"),
        (entry(name='"c"', token_sha256='"abc"', role='"admin"'), "64 hex digits"),
        (entry(name='"bad name"', token_sha256=f'"{DIGEST}"', role='"admin"'), "name must be"),
        (entry(token_sha256=f'"{DIGEST}"', role='"admin"'), "name must be"),
        (entry(name='"c"', token_sha256=f'"{DIGEST}"'), "give a role, methods, or both"),
        (entry(name='"c"', token_sha256=f'"{DIGEST}"', role='"root"'), "unknown role 'root'"),
        (entry(name='"c"', token_sha256=f'"{DIGEST}"', role="1"), "unknown role 1"),
        (
            entry(name='"c"', token_sha256=f'"{DIGEST}"', methods='["DropOrders"]'),
            "unknown RPC 'DropOrders'",
        ),
        (entry(name='"c"', token_sha256=f'"{DIGEST}"', methods='"GetOrder"'), "must be a list"),
        (
            entry(name='"c"', token_sha256=f'"{DIGEST}"', role='"admin"', expire="2027-01-01"),
            "unknown key 'expire'",
        ),
        (
            entry(name='"c"', token_sha256=f'"{DIGEST}"', role='"admin"', expires="2027-01-01"),
            "not an RFC 3339 timestamp",
        ),
        (
            entry(
                name='"c"',
                token_sha256=f'"{DIGEST}"',
                role='"admin"',
                expires="2027-01-01T00:00:00",
            ),
            "has no UTC offset",
        ),
        (
            entry(name='"c"', token_sha256=f'"{DIGEST}"', role='"admin"', expires='"soon"'),
            "not an RFC 3339 timestamp",
        ),
        (
            entry(name='"a"', token_sha256=f'"{DIGEST}"', role='"admin"')
            + entry(name='"b"', token_sha256=f'"{DIGEST.upper()}"', role='"admin"'),
            "the same token is listed twice",
        ),
    ],
)
def test_a_bad_file_is_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(tokens.TokenFileError, match=re.escape(message)):
        tokens.parse(text)


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    with pytest.raises(tokens.TokenFileError, match=f"cannot read {re.escape(str(path))}"):
        tokens.load(path)
    path.write_text("callers = []")
    with pytest.raises(tokens.TokenFileError, match=rf"{re.escape(str(path))}: lists no callers"):
        tokens.load(path)


def test_cli_new_prints_the_token_once_and_an_entry_that_loads(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["new", "--name", "storefront", "--role", "storefront"]
    extra = ["--method", "ConfirmPayment", "--expires", "2027-01-01T00:00:00Z"]
    assert tokens_cli.main([*argv, *extra]) == 0
    out = capsys.readouterr().out
    token = re.findall(r"^    (ord_\S+)$", out, flags=re.MULTILINE)
    assert len(token) == 1
    assert out.count(token[0]) == 1, "the token is printed once, and never in the entry"
    entry_text = out[out.index("[[callers]]") :]
    assert f'token_sha256 = "{tokens.hash_token(token[0])}"' in entry_text
    caller = tokens.parse(entry_text).identify(token[0])
    assert caller is not None
    assert caller.name == "storefront"
    assert caller.expires == datetime(2027, 1, 1, tzinfo=UTC)
    assert caller.principal.may_call(f"{SERVICE}/ConfirmPayment")
    assert caller.principal.may_call(f"{SERVICE}/WatchOrder")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["new", "--name", "x"], "give --role, --method, or both"),
        (["new", "--name", "x", "--role", "root"], "invalid choice: 'root'"),
        (["new", "--name", "x y", "--role", "admin"], "--name must be"),
        (["new", "--name", "x", "--role", "admin", "--expires", "2027-01-01"], "--expires"),
    ],
)
def test_cli_new_refuses_bad_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        tokens_cli.main(argv)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_hash_reads_the_token_from_standard_input(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{TOKEN}\n"))
    assert tokens_cli.main(["hash"]) == 0
    assert capsys.readouterr().out == f"{DIGEST}\n"
