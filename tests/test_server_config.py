"""server.config: flags, environment fallbacks, durations, and exit status 2 on bad values."""

from __future__ import annotations

from datetime import timedelta

import pytest

from infra.temporal_connection import TemporalConnection
from server.config import ServerConfig, format_duration, from_args, parse_duration
from workflows import models


def test_defaults() -> None:
    assert from_args([], {}) == ServerConfig(
        host="localhost",
        port=50051,
        temporal=TemporalConnection("localhost:7233", "default"),
        task_queue=models.DEFAULT_TASK_QUEUE,
        payment_timeout_seconds=24 * 3600,
        temporal_rpc_timeout=timedelta(seconds=10),
    )


def test_flags() -> None:
    config = from_args(
        [
            "--host", "0.0.0.0",
            "--allow-insecure-remote",
            "--port", "0",
            "--temporal-address", "temporal:7233",
            "--namespace", "orders",
            "--task-queue", "orders-eu",
            "--payment-timeout", "1h30m",
            "--temporal-rpc-timeout", "500ms",
        ],
        {},
    )  # fmt: skip
    assert config == ServerConfig(
        host="0.0.0.0",
        allow_insecure_remote=True,
        port=0,
        temporal=TemporalConnection("temporal:7233", "orders"),
        task_queue="orders-eu",
        payment_timeout_seconds=5400,
        temporal_rpc_timeout=timedelta(milliseconds=500),
    )


ENVIRONMENT = {
    "ORDER_SERVICE_HOST": "::",
    "ORDER_ALLOW_INSECURE_REMOTE": "true",
    "ORDER_SERVICE_PORT": "6000",
    "TEMPORAL_ADDRESS": "temporal.internal:7233",
    "TEMPORAL_NAMESPACE": "prod",
    "ORDER_TASK_QUEUE": "orders-prod",
    "ORDER_PAYMENT_TIMEOUT": "30m",
    "ORDER_TEMPORAL_RPC_TIMEOUT": "3s",
}


def test_environment_fallbacks() -> None:
    assert from_args([], ENVIRONMENT) == ServerConfig(
        host="::",
        allow_insecure_remote=True,
        port=6000,
        temporal=TemporalConnection("temporal.internal:7233", "prod"),
        task_queue="orders-prod",
        payment_timeout_seconds=1800,
        temporal_rpc_timeout=timedelta(seconds=3),
    )


def test_flags_win_over_the_environment() -> None:
    config = from_args(["--port", "7000", "--payment-timeout", "90s"], ENVIRONMENT)
    assert config.port == 7000
    assert config.payment_timeout_seconds == 90
    assert config.temporal.namespace == "prod"


def test_empty_environment_variable_means_unset() -> None:
    assert from_args([], {"ORDER_SERVICE_PORT": ""}).port == 50051


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDER_TASK_QUEUE", "from-os-environ")
    assert from_args([]).task_queue == "from-os-environ"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", timedelta(hours=24)),
        ("90s", timedelta(seconds=90)),
        ("30m", timedelta(minutes=30)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1h30m15s", timedelta(hours=1, minutes=30, seconds=15)),
        ("2d", timedelta(days=2)),
        ("500ms", timedelta(milliseconds=500)),
        ("1s500ms", timedelta(milliseconds=1500)),
        ("45", timedelta(seconds=45)),
        (" 10S ", timedelta(seconds=10)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["", "h", "1.5h", "-1h", "10 s", "1x", "0s", "0", "1h-30m", "tomorrow", "1h 30m"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["24h", "1h30m", "500ms", "1m1s1ms", "10s"])
def test_format_duration_round_trips(text: str) -> None:
    assert format_duration(parse_duration(text)) == text


def test_help_shows_the_environment_variables(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        from_args(["--help"], {})
    assert caught.value.code == 0
    out = capsys.readouterr().out
    for variable in ENVIRONMENT:
        assert variable in out
    assert "default 24h" in out


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--port", "x"], {}, "argument --port: invalid port 'x'"),
        (["--port", "70000"], {}, "must be 0 to 65535"),
        (["--port", "-1"], {}, "must be 0 to 65535"),
        (["--payment-timeout", "1.5h"], {}, "argument --payment-timeout: invalid duration"),
        (["--payment-timeout", "1500ms"], {}, "whole number of seconds"),
        (["--temporal-rpc-timeout", "0s"], {}, "must be greater than zero"),
        (["--host", " "], {}, "argument --host: must not be empty"),
        (["--bogus"], {}, "unrecognized arguments: --bogus"),
        (
            [],
            {"ORDER_SERVICE_PORT": "http"},
            "environment variable ORDER_SERVICE_PORT: invalid port",
        ),
        ([], {"ORDER_PAYMENT_TIMEOUT": "forever"}, "environment variable ORDER_PAYMENT_TIMEOUT"),
        ([], {"ORDER_TEMPORAL_RPC_TIMEOUT": "-5s"}, "ORDER_TEMPORAL_RPC_TIMEOUT: invalid duration"),
    ],
)
def test_bad_values_exit_2_with_a_clear_message(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        from_args(argv, environ)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_a_bad_environment_value_is_ignored_when_the_flag_is_given() -> None:
    assert from_args(["--port", "1234"], {"ORDER_SERVICE_PORT": "junk"}).port == 1234
