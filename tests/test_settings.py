"""Settings: flags over variables over defaults, durations, clear errors, the reference page."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path

import pytest

from infra.settings import ProcessSettings, format_duration, parse_duration
from server.platform.settings import ServerSettings
from tests.support import docs
from tests.support.env import ROOT, settings_from
from worker.settings import WorkerSettings
from workflows import models


def server(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> ServerSettings:
    return settings_from(ServerSettings, argv, environ or {})


def test_defaults() -> None:
    settings = server()
    assert (settings.host, settings.port, settings.task_queue) == (
        "localhost",
        50051,
        models.DEFAULT_TASK_QUEUE,
    )
    assert settings.payment_timeout_seconds == 24 * 3600
    assert settings.temporal_rpc_timeout == timedelta(seconds=10)
    assert settings.describe_temporal() == "localhost:7233 (namespace default, plain text)"


def test_flags() -> None:
    settings = server(
        [
            "--host", "0.0.0.0",
            "--allow-insecure-remote",
            "--port", "0",
            "--temporal-address", "temporal:7233",
            "--namespace", "orders",
            "--task-queue", "orders-eu",
            "--payment-timeout", "1h30m",
            "--temporal-rpc-timeout", "500ms",
        ]
    )  # fmt: skip
    assert (settings.host, settings.allow_insecure_remote, settings.port) == ("0.0.0.0", True, 0)
    assert settings.describe_temporal() == "temporal:7233 (namespace orders, plain text)"
    assert settings.task_queue == "orders-eu"
    assert settings.payment_timeout_seconds == 5400
    assert settings.temporal_rpc_timeout == timedelta(milliseconds=500)


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
    settings = server([], ENVIRONMENT)
    assert (settings.host, settings.allow_insecure_remote, settings.port) == ("::", True, 6000)
    assert settings.describe_temporal() == "temporal.internal:7233 (namespace prod, plain text)"
    assert settings.task_queue == "orders-prod"
    assert settings.payment_timeout_seconds == 1800
    assert settings.temporal_rpc_timeout == timedelta(seconds=3)


def test_flags_win_over_the_environment() -> None:
    settings = server(["--port", "7000", "--payment-timeout", "90s"], ENVIRONMENT)
    assert settings.port == 7000
    assert settings.payment_timeout_seconds == 90
    assert settings.temporal_connection.namespace == "prod"


def test_empty_environment_variable_means_unset() -> None:
    assert server([], {"ORDER_SERVICE_PORT": ""}).port == 50051


def test_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDER_TASK_QUEUE", "from-os-environ")
    assert ServerSettings.from_args([]).task_queue == "from-os-environ"


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


@pytest.mark.parametrize("settings", [ServerSettings, WorkerSettings])
def test_help_lists_every_setting_with_its_variable(
    settings: type[ServerSettings | WorkerSettings], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        settings_from(settings, ["--help"], {})
    assert caught.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for item in settings.settings():
        assert f"env {item.env};" in out
        assert all(flag in out for flag in item.flags)
    if settings is ServerSettings:
        assert "default 24h" in out


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--port", "x"], {}, "--port / ORDER_SERVICE_PORT ('x'): Input should be a valid integer"),
        (["--port", "70000"], {}, "must be 0 to 65535"),
        (["--port", "-1"], {}, "must be 0 to 65535"),
        (["--payment-timeout", "1.5h"], {}, "--payment-timeout / ORDER_PAYMENT_TIMEOUT ('1.5h')"),
        (["--payment-timeout", "1500ms"], {}, "whole number of seconds"),
        (["--temporal-rpc-timeout", "0s"], {}, "must be greater than zero"),
        (["--host", " "], {}, "--host / ORDER_SERVICE_HOST (' '): must not be empty"),
        (["--bogus"], {}, "unrecognized arguments: --bogus"),
        ([], {"ORDER_SERVICE_PORT": "http"}, "--port / ORDER_SERVICE_PORT ('http')"),
        ([], {"ORDER_PAYMENT_TIMEOUT": "forever"}, "ORDER_PAYMENT_TIMEOUT ('forever'): invalid"),
        ([], {"ORDER_TEMPORAL_RPC_TIMEOUT": "-5s"}, "ORDER_TEMPORAL_RPC_TIMEOUT ('-5s'): invalid"),
        ([], {"ORDER_REFLECTION": "maybe"}, "--reflection / ORDER_REFLECTION ('maybe')"),
    ],
)
def test_bad_values_exit_2_naming_the_flag_and_the_variable(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        server(argv, environ)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_a_bad_environment_value_is_ignored_when_the_flag_is_given() -> None:
    assert server(["--port", "1234"], {"ORDER_SERVICE_PORT": "junk"}).port == 1234


def test_a_secret_is_never_shown(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        server([], {"TEMPORAL_API_KEY": "sekrit-api-key", "TEMPORAL_TLS": "maybe"})
    settings = server([], {"TEMPORAL_API_KEY": "sekrit-api-key"})
    with pytest.raises(SystemExit):
        server(["--help"], {"TEMPORAL_API_KEY": "sekrit-api-key"})
    assert "sekrit" not in repr(settings) + capsys.readouterr().out


def test_the_configuration_reference_is_generated_from_the_models() -> None:
    """docs/configuration.md: `make docs` rewrites it; this fails when the two drift."""
    committed = Path(docs.CONFIGURATION).read_text()
    assert committed == docs.configuration_reference(), "run `make docs`"


def _decision_0014_names() -> list[tuple[str, list[str], str]]:
    """(variable, flags, process) for every row of decision 0014's "Every name" table."""
    text = (ROOT / "docs/decisions/0014-settings.md").read_text()
    rows = []
    for line in text.split("## Every name", 1)[1].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            variable, flags, processes, _ = cells
            for process in processes.split(", "):
                rows.append(
                    (variable.strip("`"), [f.strip("` ") for f in flags.split(",")], process)
                )
    return rows


_PROCESSES: dict[str, type[ProcessSettings]] = {"server": ServerSettings, "worker": WorkerSettings}


@pytest.mark.parametrize(("variable", "flags", "process"), _decision_0014_names())
def test_every_name_decision_0014_lists_still_works(
    variable: str, flags: list[str], process: str
) -> None:
    """The names users and deployments already have: dropping or renaming one fails here."""
    settings = _PROCESSES[process]
    named = {item.env: item.name for item in settings.settings()}
    assert variable in named, f"{process} no longer reads {variable}"
    # Each flag the table lists sets that same setting on the command line.
    parser = settings.parser()
    for flag in flags:
        action = parser._option_string_actions.get(flag)
        assert action is not None, f"{process} no longer takes {flag}"
        assert action.dest == named[variable], f"{process}: {flag} sets another setting"
