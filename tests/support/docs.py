"""`make docs`: writes docs/configuration.md from the settings models (a test keeps it current)."""

from __future__ import annotations

from pathlib import Path

from infra.settings import ProcessSettings
from server.codec_server import CodecServerSettings
from server.platform.settings import ServerSettings
from worker.settings import WorkerSettings

CONFIGURATION = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

_INTRO = """\
# Configuration reference

Generated from the settings models (server/platform/settings.py, worker/settings.py,
server/codec_server.py and the groups they mix in) by `make docs`; a test fails when this
page and the models drift.

Every setting is a flag and an environment variable. A flag wins over its variable, which
wins over the default; an empty variable counts as unset. A bad value stops the process
with exit status 2 and a message naming both. `python -m server --help`,
`python -m worker --help` and `python -m server.codec_server --help` print the same
lists. Switches take `on` or `off` (also `true`/`false`, `yes`/`no`, `1`/`0`); a switch
flag alone means `on`, and `--no-<flag>` means `off`. Durations are written like `24h`,
`90s`, `30m`, `1h30m` or `500ms`.

The Temporal connection is read as the Temporal CLI reads it (`temporalio.envconfig`):
first the profile (`TEMPORAL_PROFILE`, default `default`) of the TOML file
`TEMPORAL_CONFIG_FILE` (default `~/.config/temporalio/temporal.toml`, if there), then the
`TEMPORAL_*` variables below, including two kinds with no flag: `TEMPORAL_TLS_*_DATA` for
PEM contents instead of paths, and `TEMPORAL_GRPC_META_<NAME>` for gRPC metadata sent with
every call. The flags come last.

All three need the keys (docs/decisions/0017): a keys file (`--keys-file`, made by
`python -m infra.keys new FILE`) or the two key variables; without them they refuse to
start, with exit status 2.
"""


def _section(settings: type[ProcessSettings]) -> str:
    lines = [f"## `{settings.prog}`", "", settings.description, ""]
    group = None
    for item in settings.settings():
        if item.group is not group:
            group = item.group
            title = (group.__doc__ or group.__name__).strip().splitlines()[0].rstrip(".")
            lines += [
                "",
                f"### {title}",
                "",
                "| flag | variable | default | what |",
                "|---|---|---|---|",
            ]
        flags = ", ".join(f"`{flag}`" for flag in item.flags)
        lines.append(f"| {flags} | `{item.env}` | {item.default} | {item.help} |")
    return "\n".join(lines) + "\n"


def configuration_reference() -> str:
    return "\n".join(
        [_INTRO, _section(ServerSettings), _section(WorkerSettings), _section(CodecServerSettings)]
    )


if __name__ == "__main__":
    CONFIGURATION.write_text(configuration_reference())
    print(f"wrote {CONFIGURATION}")
