"""Money as exact integers: the google.type.Money shape, never a float."""

# No `from __future__ import annotations`: Temporal's data converter reads these
# dataclasses' hints with typing.get_type_hints on every payload, and string
# hints are compiled and evaluated each time (about 1 ms per get_full_state).

from dataclasses import dataclass

NANOS_PER_UNIT = 1_000_000_000


@dataclass(frozen=True)
class Money:
    """An amount of one currency; same fields and sign rules as google.type.Money."""

    currency_code: str
    units: int = 0
    nanos: int = 0

    @staticmethod
    def from_total_nanos(currency_code: str, total_nanos: int) -> "Money":
        """Builds a Money from a signed count of nanos (units and nanos share the sign)."""
        sign = -1 if total_nanos < 0 else 1
        units, nanos = divmod(abs(total_nanos), NANOS_PER_UNIT)
        return Money(currency_code, sign * units, sign * nanos)

    @property
    def total_nanos(self) -> int:
        """The whole amount as one integer count of nanos."""
        return self.units * NANOS_PER_UNIT + self.nanos

    def __add__(self, other: "Money") -> "Money":
        if other.currency_code != self.currency_code:
            raise ValueError(f"cannot add {other.currency_code} to {self.currency_code}")
        return Money.from_total_nanos(self.currency_code, self.total_nanos + other.total_nanos)

    def times(self, quantity: int) -> "Money":
        """This amount multiplied by a whole quantity."""
        return Money.from_total_nanos(self.currency_code, self.total_nanos * quantity)

    def __str__(self) -> str:
        """Decimal text with at least two places, for example "USD 999.99"."""
        sign = "-" if self.total_nanos < 0 else ""
        digits = f"{abs(self.nanos):09d}".rstrip("0").ljust(2, "0")
        return f"{self.currency_code} {sign}{abs(self.units)}.{digits}"
