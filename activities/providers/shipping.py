"""The simulated warehouse, which packs orders, and carrier, which ships and delivers them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import TypeVar

from temporalio import activity

from activities.providers.faults import HEARTBEAT_INTERVAL_SECONDS, simulate
from infra.settings import Options, Seconds, setting
from workflows.models import Shipment, ShipOrderInput

logger = logging.getLogger(__name__)

CARRIER = "fedex"
T = TypeVar("T")


class ShippingSettings(Options):
    """Simulated warehouse and carrier."""

    sim_prepare_seconds: Seconds = setting(5.0, "ORDER_SIM_PREPARE_SECONDS", "seconds to pack")
    sim_ship_seconds: Seconds = setting(3.0, "ORDER_SIM_SHIP_SECONDS", "seconds to ship")
    sim_deliver_seconds: Seconds = setting(10.0, "ORDER_SIM_DELIVER_SECONDS", "seconds to deliver")


class Shipping:
    """The warehouse's packages and the carrier's shipments and deliveries, in memory only."""

    def __init__(self, settings: ShippingSettings) -> None:
        self.settings = settings
        self.packages: dict[str, str] = {}  # package id by order id
        self.shipments: dict[str, Shipment] = {}  # by order id
        self.deliveries: dict[str, datetime] = {}  # when, by tracking number
        # Set by a test to hold every hand-over to the carrier until it sets the
        # event: the workflow is then in the hand-over for as long as the test needs.
        self.hand_over_gate: asyncio.Event | None = None

    async def pack(self, order_id: str) -> str:
        """Packs the order's items; returns the package id."""
        seconds = self.settings.sim_prepare_seconds
        return await _once(self.packages, order_id, order_id, "packing", seconds, self._package_id)

    async def ship(self, input: ShipOrderInput) -> Shipment:
        """Hands the package to the carrier; returns its tracking number."""
        if self.hand_over_gate is not None:
            await _held(self.hand_over_gate)
        step = "handing over to the carrier"  # no address in a log line (docs/decisions/0017)
        shipment = partial(Shipment, f"FEDEX-{input.order_id}-{input.package_id}", CARRIER)
        seconds = self.settings.sim_ship_seconds
        return await _once(self.shipments, input.order_id, input.order_id, step, seconds, shipment)

    async def deliver(self, order_id: str, tracking_number: str) -> None:
        """The carrier's journey: returns once the parcel has been delivered."""
        seconds, now = self.settings.sim_deliver_seconds, partial(datetime.now, UTC)
        await _once(self.deliveries, tracking_number, order_id, "delivery", seconds, now)

    def _package_id(self) -> str:
        # Made once the packing is done: no other order can take the same number.
        return f"PKG-{len(self.packages) + 1}"


async def _held(gate: asyncio.Event) -> None:
    """Until the gate is set, heartbeating so the activity is not taken for dead meanwhile."""
    while not gate.is_set():
        activity.heartbeat()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gate.wait(), HEARTBEAT_INTERVAL_SECONDS)


async def _once(
    done: dict[str, T], key: str, order_id: str, step: str, seconds: float, make: Callable[[], T]
) -> T:
    """The step's result for `key`: made after `seconds` the first time, the same one after."""
    if key not in done:
        await simulate(seconds, order_id, step)
    if key in done:
        logger.info("order %s: %s already done: %s", order_id, step, done[key])
    else:
        done[key] = make()
        logger.info("order %s: %s done: %s", order_id, step, done[key])
    return done[key]
