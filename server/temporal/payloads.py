"""The server's JSON payloads: what temporalio's default converter gives, for less CPU.

temporalio's JSON converter encodes a dataclass with `dataclasses.asdict`, which
deep-copies every field first, and decodes one with `value_to_type`, which calls
`typing.get_type_hints` on every dataclass of every value and reaches an
optional's None or an enum through a chain of checks and a caught exception.
Here a dataclass goes to `json` one level at a time (the same bytes: keys are
sorted), and each hint's shape is looked up once (the same values, the same
TypeErrors). Encryption included: a CreateOrder's four payloads encoded in
about 175 µs instead of 320, an OrderState decoded in about 150 instead of 350
to 430 (docs/performance/README.md).
Server only: the worker's converter is imported again inside the workflow sandbox.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any

from temporalio.client import Client
from temporalio.converter import (
    AdvancedJSONEncoder,
    CompositePayloadConverter,
    DataConverter,
    DefaultPayloadConverter,
    JSONPlainPayloadConverter,
    JSONTypeConverter,
    value_to_type,
)

_Shape = tuple[tuple[dataclasses.Field[Any], ...], dict[str, Any]]
# What value_to_type gives for these hints, reached without its chain of checks.
_OPTIONAL = "optional"  # X | None: a null is None (value_to_type tries X first, which raises)
_STR_ENUM = "str-enum"  # an enum mixing in str, not int: the member of that value


class CachedDataclasses(JSONTypeConverter):
    """Dataclasses decoded as temporalio's `value_to_type` does, their fields and hints cached."""

    def __init__(self) -> None:
        # Hint -> (its fields, their resolved hints), None if not a dataclass: one entry
        # per hint ever decoded, a few dozen.
        self._shapes: dict[Any, _Shape | str | None] = {}

    @staticmethod
    def _shape(hint: Any) -> _Shape | str | None:
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            return dataclasses.fields(hint), typing.get_type_hints(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            return _OPTIONAL if type(None) in typing.get_args(hint) else None
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return _STR_ENUM if issubclass(hint, str) and not issubclass(hint, int) else None
        return None

    def to_typed_value(self, hint: type, value: Any) -> Any:
        try:
            shape = self._shapes[hint]
        except KeyError:
            shape = self._shapes[hint] = self._shape(hint)
        except TypeError:  # an unhashable hint: not a class
            return JSONTypeConverter.Unhandled
        if shape is None:
            return JSONTypeConverter.Unhandled
        if shape is _OPTIONAL:
            return None if value is None else JSONTypeConverter.Unhandled
        if shape is _STR_ENUM:
            if not isinstance(value, str):
                raise TypeError(f"Cannot convert to enum {hint}, value not a string")
            return hint(value)
        assert not isinstance(shape, str)
        if not isinstance(value, dict):
            raise TypeError(f"Cannot convert to dataclass {hint}, value is {type(value)} not dict")
        fields, hints = shape
        converters = [self]
        init_values = {}
        other_values = {}
        # As value_to_type: unknown keys ignored, a missing required field fails in __init__,
        # init=False fields converted too and set afterwards.
        for field in fields:
            raw = value.get(field.name, dataclasses.MISSING)
            if raw is dataclasses.MISSING:
                continue
            try:
                converted = value_to_type(hints[field.name], raw, converters)
            except Exception as err:
                message = f"Failed converting field {field.name} on dataclass {hint}"
                raise TypeError(message) from err
            if field.init:
                init_values[field.name] = converted
            else:
                other_values[field.name] = converted
        decoded = hint(**init_values)
        for name, converted in other_values.items():
            object.__setattr__(decoded, name, converted)
        return decoded


class ShallowDataclassEncoder(AdvancedJSONEncoder):
    """temporalio's encoder, a dataclass handed to `json` as a dict of its fields, not asdict's
    deep copy: `json` comes back here for the dataclasses and datetimes inside."""

    def default(self, o: Any) -> Any:
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return {field.name: getattr(o, field.name) for field in _fields(type(o))}
        return super().default(o)


@functools.cache
def _fields(cls: type) -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(cls)


class FastJSONPayloadConverter(CompositePayloadConverter):
    """temporalio's default payload converter, its JSON one encoding with ShallowDataclassEncoder
    and decoding through CachedDataclasses."""

    def __init__(self) -> None:
        super().__init__(
            *(
                JSONPlainPayloadConverter(
                    encoder=ShallowDataclassEncoder, custom_type_converters=_CONVERTERS
                )
                if isinstance(converter, JSONPlainPayloadConverter)
                else converter
                for converter in DefaultPayloadConverter.default_encoding_payload_converters
            )
        )


# One cache for the process: the dataclasses it decodes are a handful.
_CONVERTERS = [CachedDataclasses()]


def with_fast_json(converter: DataConverter) -> DataConverter:
    """`converter` (codec, failure converter, external storage kept) with FastJSONPayloadConverter;
    one with a payload converter of its own is returned as it is."""
    if converter.payload_converter_class is not DefaultPayloadConverter:
        return converter
    return dataclasses.replace(converter, payload_converter_class=FastJSONPayloadConverter)


def with_fast_json_client(client: Client) -> Client:
    """The same connection, namespace and interceptors as `client`, its payloads
    converted with `with_fast_json`."""
    if not isinstance(client, Client):  # a stand-in (the unit tests' fakes): as it is
        return client
    converter = with_fast_json(client.data_converter)
    if converter is client.data_converter:
        return client
    config = client.config()
    config["data_converter"] = converter
    return Client(**config)
