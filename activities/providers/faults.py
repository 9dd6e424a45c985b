"""What makes the simulated providers act like remote ones: calls take time, and some fail.

A call cut off part-way, or failed by an outage before it reaches the
provider, leaves nothing behind: providers record an effect once a call is over.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Annotated

from pydantic import BeforeValidator, Field
from pydantic_settings import NoDecode
from temporalio import activity
from temporalio.exceptions import ApplicationError

from infra.settings import CommaList, Options, setting

logger = logging.getLogger(__name__)

# Often enough that a cancel or heartbeat timeout is noticed within about a
# second; the SDK throttles what it actually sends to the server.
HEARTBEAT_INTERVAL_SECONDS = 1.0
PROVIDER_UNAVAILABLE = "ProviderUnavailable"
PROVIDER_REFUSED = "ProviderRefused"  # not retryable

# Every activity, by its registered name, and who an outage of it is blamed on.
ACTIVITY_PROVIDERS: dict[str, str] = {
    "reserve_inventory": "inventory service",
    "release_inventory": "inventory service",
    "charge_payment": "payment gateway",
    "refund_payment": "payment gateway",
    "prepare_shipment": "warehouse",
    "ship_order": "carrier",
    "deliver_order": "carrier",
    "send_notification": "mail service",
}
ALL_ACTIVITIES = frozenset(ACTIVITY_PROVIDERS)
FORWARD_ACTIVITIES = frozenset(
    {"reserve_inventory", "charge_payment", "prepare_shipment", "ship_order", "deliver_order"}
)
COMPENSATION_ACTIVITIES = frozenset({"release_inventory", "refund_payment"})


def _digits(value: object) -> object:
    # Digits only: int() would also take "+2", "2.0" and "٣".
    if isinstance(value, str) and not (value.strip().isascii() and value.strip().isdecimal()):
        raise ValueError("not a whole number >= 0")
    return value


# A count written as plain digits, for the settings of every provider.
WholeNumber = Annotated[int, Field(ge=0), BeforeValidator(_digits)]


def _activity_names(names: object) -> object:
    if isinstance(names, list | set | frozenset):
        # "all" (any case): every activity, compensation and email included.
        if {str(name).lower() for name in names} == {"all"}:
            return ALL_ACTIVITIES
        if unknown := sorted(set(names) - ALL_ACTIVITIES):
            known = ", ".join(sorted(ALL_ACTIVITIES))
            raise ValueError(f"unknown activities {', '.join(unknown)}; known: {known}, or all")
    return names


ActivityNames = Annotated[frozenset[str], NoDecode, BeforeValidator(_activity_names), CommaList]


class FaultSettings(Options):
    """Simulated outages of the providers (retryable ProviderUnavailable errors)."""

    sim_failure_rate: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = setting(
        0.0, "ORDER_SIM_FAILURE_RATE", "chance (0 to 1) that an attempt fails"
    )
    sim_fail_first_attempts: WholeNumber = setting(
        0, "ORDER_SIM_FAIL_FIRST_ATTEMPTS", "the first N attempts of each activity execution fail"
    )
    sim_fail_activities: ActivityNames = setting(
        FORWARD_ACTIVITIES, "ORDER_SIM_FAIL_ACTIVITIES", "activities that fail so, or all"
    )
    sim_fail_for_good: ActivityNames = setting(
        frozenset(),
        "ORDER_SIM_FAIL_FOR_GOOD",
        "activities whose provider refuses every call for good (not retryable), or all",
        shown="none",
    )


class Faults:
    """Decides which attempts fail, as the settings ask."""

    def __init__(self, settings: FaultSettings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._random = rng if rng is not None else random.Random()

    def check(self, name: str, order_id: str) -> None:
        """Raises ProviderUnavailable if this attempt of activity `name` is to fail.

        Retryable, so that each failure shows as one more attempt in the Temporal UI.
        """
        settings = self.settings
        if name in settings.sim_fail_for_good:
            logger.info("order %s: %s refused for good (simulated)", order_id, name)
            raise ApplicationError(
                f"The {ACTIVITY_PROVIDERS[name]} refuses it for good (simulated)",
                type=PROVIDER_REFUSED,
                non_retryable=True,
            )
        if name not in settings.sim_fail_activities:
            return
        attempt = activity.info().attempt
        if attempt <= settings.sim_fail_first_attempts:
            why = f"the first {settings.sim_fail_first_attempts} attempt(s) fail"
        elif settings.sim_failure_rate and self._random.random() < settings.sim_failure_rate:
            why = f"{settings.sim_failure_rate * 100:g}% of attempts fail"
        else:
            return
        logger.info("order %s: %s attempt %d: simulated outage", order_id, name, attempt)
        raise ApplicationError(
            f"The {ACTIVITY_PROVIDERS[name]} is unavailable (simulated: attempt {attempt}, {why})",
            type=PROVIDER_UNAVAILABLE,
        )


async def simulate(seconds: float, order_id: str, step: str) -> None:
    """Takes `seconds` like a remote call would, heartbeating so a cancel can reach it."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        while (remaining := started + seconds - loop.time()) > 0:
            activity.heartbeat()
            await asyncio.sleep(min(remaining, HEARTBEAT_INTERVAL_SECONDS))
    except asyncio.CancelledError:
        # Cancelled, timed out or the worker is stopping: nothing was done.
        elapsed = loop.time() - started
        logger.info("order %s: %s interrupted after %.1f s, nothing done", order_id, step, elapsed)
        raise
