"""How long the simulated providers take, and where the emails go."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Environment variable for each duration field, in seconds.
DURATION_ENV_VARS: Mapping[str, str] = {
    "inventory": "ORDER_SIM_INVENTORY_SECONDS",
    "payment": "ORDER_SIM_PAYMENT_SECONDS",
    "prepare": "ORDER_SIM_PREPARE_SECONDS",
    "ship": "ORDER_SIM_SHIP_SECONDS",
    "deliver": "ORDER_SIM_DELIVER_SECONDS",
    "email": "ORDER_SIM_EMAIL_SECONDS",
}
OUTBOX_DIR_ENV_VAR = "ORDER_OUTBOX_DIR"
DEFAULT_OUTBOX_DIR = "outbox"


@dataclass(frozen=True)
class SimulationConfig:
    """Simulated duration of each provider call, in seconds (durations, not money).

    The defaults are for the `make run` demo: a paid order is delivered about
    20 s after payment, and the 7 s of charging and packing leave time for a
    cancel sent right after payment to arrive before the order ships.
    """

    inventory: float = 0.5
    payment: float = 2.0
    prepare: float = 5.0
    ship: float = 3.0
    deliver: float = 10.0
    email: float = 0.2
    outbox_dir: Path = Path(DEFAULT_OUTBOX_DIR)

    def __post_init__(self) -> None:
        for name in DURATION_ENV_VARS:
            seconds = getattr(self, name)
            if not math.isfinite(seconds) or seconds < 0:
                raise ValueError(f"{name} duration must be a finite number >= 0, got {seconds}")

    @classmethod
    def instant(cls, outbox_dir: str | os.PathLike[str]) -> SimulationConfig:
        """No simulated latency at all: for tests."""
        return cls(
            inventory=0.0,
            payment=0.0,
            prepare=0.0,
            ship=0.0,
            deliver=0.0,
            email=0.0,
            outbox_dir=Path(outbox_dir),
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SimulationConfig:
        """The defaults, overridden by any ORDER_SIM_*_SECONDS and ORDER_OUTBOX_DIR set.

        Raises ValueError naming the variable when a value is not a valid duration.
        """
        env = os.environ if environ is None else environ
        durations: dict[str, float] = {}
        for name, var in DURATION_ENV_VARS.items():
            raw = env.get(var, "").strip()
            if not raw:
                continue
            try:
                durations[name] = float(raw)
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a number of seconds") from None
            if not math.isfinite(durations[name]) or durations[name] < 0:
                raise ValueError(f"{var}={raw!r} must be a finite number of seconds >= 0")
        outbox_dir = Path(env.get(OUTBOX_DIR_ENV_VAR, "").strip() or DEFAULT_OUTBOX_DIR)
        return cls(**durations, outbox_dir=outbox_dir)
