"""Settings: typed models on pydantic-settings, with a command-line flag for every field.

A flag wins over its variable, which wins over the default; errors name both.
"""

from __future__ import annotations

import argparse
import inspect
import re
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

_T = TypeVar("_T")

# One or more <integer><unit> parts, as in Go's time.ParseDuration: "24h", "1h30m", "500ms".
_DURATION_PART = re.compile(r"(\d+)(ms|d|h|m|s)")
_UNIT_MILLISECONDS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration(text: str) -> timedelta:
    """Parses "24h", "90s", "30m", "1h30m", "500ms" or "2d"; a bare integer means seconds.

    Raises ValueError unless the text is a positive duration.
    """
    cleaned = text.strip().lower()
    if cleaned.isdigit():
        cleaned += "s"
    position = 0
    milliseconds = 0
    for match in _DURATION_PART.finditer(cleaned):
        if match.start() != position:
            break
        milliseconds += int(match.group(1)) * _UNIT_MILLISECONDS[match.group(2)]
        position = match.end()
    if not cleaned or position != len(cleaned):
        raise ValueError(
            f"invalid duration {text!r}: use a number with a unit, e.g. 24h, 90s, 30m, 1h30m"
        )
    if milliseconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be greater than zero")
    return timedelta(milliseconds=milliseconds)


def format_duration(duration: timedelta) -> str:
    """The inverse of parse_duration, for help texts and logs: 5400 s is "1h30m"."""
    milliseconds = duration // timedelta(milliseconds=1)
    parts = []
    for unit in ("h", "m", "s", "ms"):
        count, milliseconds = divmod(milliseconds, _UNIT_MILLISECONDS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def _duration(value: object) -> object:
    return parse_duration(value) if isinstance(value, str) else value


def _whole_seconds(duration: timedelta) -> timedelta:
    if duration % timedelta(seconds=1):
        raise ValueError(f"{format_duration(duration)} must be a whole number of seconds")
    return duration


def _port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise ValueError(f"invalid port {port}: must be 0 to 65535 (0 picks a free port)")
    return port


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value.strip()


def _existing_file(path: Path) -> Path:
    path = path.expanduser()
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    return path


def load_file(path: Path, parse: Callable[[str], _T], error: Callable[[str], Exception]) -> _T:
    """`parse` of a file a setting names; `error` (a message naming the file and the
    problem) when the file cannot be read or `parse` raises ValueError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"cannot read {path}: {err}") from None
    try:
        return parse(text)
    except ValueError as err:
        raise error(f"{path}: {err}") from None


def _comma_list(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


# The types settings are made of; each accepts the text of a flag or variable.
Duration = Annotated[timedelta, BeforeValidator(_duration)]
WholeSeconds = Annotated[timedelta, BeforeValidator(_duration), AfterValidator(_whole_seconds)]
Port = Annotated[int, AfterValidator(_port)]
# 1 to 65535, where an endpoint cannot report a port the OS picked.
FixedPort = Annotated[int, Field(ge=1, le=65535)]
Text = Annotated[str, AfterValidator(_text)]
ExistingFile = Annotated[Path, AfterValidator(_existing_file)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
# "a,b,c" in a flag or variable; pydantic-settings would otherwise expect JSON.
CommaList = BeforeValidator(_comma_list)
# Choices spelt in any case, e.g. "JSON" or "debug".
Lowercase = BeforeValidator(lambda v: v.strip().lower() if isinstance(v, str) else v)
Uppercase = BeforeValidator(lambda v: v.strip().upper() if isinstance(v, str) else v)


def setting(
    default: Any,
    env: str,
    help: str,
    *,
    flags: Sequence[str] = (),
    shown: str | None = None,
    **constraints: Any,
) -> Any:
    """A field that is a setting, read from the variable `env`.

    Its flag is `--<field-name>`, plus `flags`; `shown` replaces the default in help texts.
    """
    extra: dict[str, Any] = {"flags": list(flags)}
    if shown is not None:
        extra["shown"] = shown
    return Field(
        default,
        validation_alias=env,
        description=help,
        json_schema_extra=extra,
        **constraints,
    )


class Options(BaseModel):
    """A group of settings: mixed into a process's settings, or used alone in tests."""

    # SettingsConfigDict (a ConfigDict) so that ProcessSettings can mix the groups in.
    model_config = SettingsConfigDict(
        frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True
    )


class Setting:
    """What a reader of --help or the docs sees of one field."""

    def __init__(self, name: str, field: FieldInfo, group: type[BaseModel]) -> None:
        extra = field.json_schema_extra
        assert isinstance(extra, dict), f"{name} is not declared with setting()"
        self.name = name
        self.field = field
        self.group = group
        self.env = str(field.validation_alias)
        self.flags = [f"--{name.replace('_', '-')}", *extra["flags"]]  # type: ignore[misc]
        self.help = field.description or ""
        self.shown = str(extra["shown"]) if "shown" in extra else None

    @property
    def is_switch(self) -> bool:
        return self.field.annotation in (bool, bool | None)

    @property
    def default(self) -> str:
        if self.shown is not None:
            return self.shown
        value = self.field.default
        if isinstance(value, timedelta):
            return format_duration(value)
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, frozenset | list | tuple):
            return ",".join(sorted(str(item) for item in value)) or "none"
        return "none" if value is None else str(value)

    @property
    def secret(self) -> bool:
        return "SecretStr" in str(self.field.annotation)


class ProcessSettings(BaseSettings):
    """Every setting of one process: flags, then environment variables, then defaults."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        case_sensitive=True,
        env_ignore_empty=True,
        validate_by_name=True,
        validate_by_alias=True,
    )
    # For --help: the command and what the process is.
    prog: ClassVar[str] = "python -m app"
    description: ClassVar[str] = ""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags arrive as constructor arguments: they win over the environment.
        return (init_settings, env_settings)

    @classmethod
    def settings(cls) -> Iterator[Setting]:
        """Every setting, grouped by the Options class that declares it."""
        for group in cls.__mro__:
            if not (isinstance(group, type) and issubclass(group, Options)):
                continue
            for name in inspect.get_annotations(group):
                field = cls.model_fields.get(name)
                if field is not None and isinstance(field.json_schema_extra, dict):
                    yield Setting(name, field, group)

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog=cls.prog,
            description=cls.description,
            epilog="A flag wins over its environment variable; an empty variable counts as unset.",
        )
        groups: dict[type[BaseModel], argparse._ArgumentGroup] = {}
        for item in cls.settings():
            if item.group not in groups:
                title = (item.group.__doc__ or item.group.__name__).strip().splitlines()[0]
                groups[item.group] = parser.add_argument_group(title.rstrip("."))
            group = groups[item.group]
            help_text = f"{item.help} (env {item.env}; default {item.default})"
            if item.is_switch:
                group.add_argument(
                    *item.flags, dest=item.name, nargs="?", const="on", metavar="on|off",
                    help=help_text,
                )  # fmt: skip
                group.add_argument(
                    f"--no-{item.flags[0][2:]}", dest=item.name, action="store_const",
                    const="off", help=argparse.SUPPRESS,
                )  # fmt: skip
            else:
                metavar = item.name.upper().removeprefix("TEMPORAL_")
                group.add_argument(*item.flags, dest=item.name, metavar=metavar, help=help_text)
        return parser

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> Self:
        """The settings from `argv` (default sys.argv[1:]) and the environment.

        Exits with status 2 and a message naming the flag and the variable on a
        bad value, or with status 0 after --help.
        """
        parser = cls.parser()
        flags = vars(parser.parse_args(argv))
        given = {name: value for name, value in flags.items() if value is not None}
        try:
            return cls(**given)
        except ValidationError as err:
            parser.error(cls.explain(err))

    @classmethod
    def explain(cls, err: ValidationError) -> str:
        """The first error, naming the setting's flag and variable."""
        first = err.errors()[0]
        message = str(first["msg"]).removeprefix("Value error, ")
        if first["loc"]:
            key = str(first["loc"][0])
            for item in cls.settings():
                if key in (item.name, item.env):
                    shown = "" if item.secret else f" ({first['input']!r})"
                    return f"{item.flags[0]} / {item.env}{shown}: {message}"
        return message


def secret_value(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()
