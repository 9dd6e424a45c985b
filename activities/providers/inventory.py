"""The simulated inventory service: stock per product, and reservations that take and give it back.

Stock levels are per process: a reservation another process made (found in
the ledger) took none of this one's stock, and releasing it gives none back.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BeforeValidator
from pydantic_settings import NoDecode
from temporalio.exceptions import ApplicationError

from activities.providers.faults import WholeNumber, simulate
from activities.providers.ledger import Effect, EffectKind, Effects, Ledger
from infra.settings import CommaList, Options, Seconds, setting
from workflows.models import OUT_OF_STOCK_ERROR, OrderItem

logger = logging.getLogger(__name__)

# In ORDER_SIM_STOCK: the stock of every product not listed.
ANY_PRODUCT = "*"


def _stock(entries: object) -> object:
    """["PROD-123=5", "*=100"] → {"PROD-123": "5", "*": "100"}; the units are checked after."""
    if not isinstance(entries, list):
        return entries
    stock: dict[str, str] = {}
    for entry in entries:
        product, sep, units = (part.strip() for part in str(entry).rpartition("="))
        if not sep or not product:
            raise ValueError(f"{entry!r} is not PRODUCT=UNITS (e.g. PROD-123=5,*=100)")
        if product in stock:
            raise ValueError(f"{product!r} is listed twice")
        stock[product] = units
    return stock


Stock = Annotated[dict[str, WholeNumber], NoDecode, BeforeValidator(_stock), CommaList]


class InventorySettings(Options):
    """Simulated inventory service."""

    sim_inventory_seconds: Seconds = setting(0.5, "ORDER_SIM_INVENTORY_SECONDS", "seconds per call")
    sim_stock: Stock = setting(
        {}, "ORDER_SIM_STOCK", "units per product, e.g. PROD-1=5,*=100", shown="unlimited"
    )


@dataclass
class Reservation:
    reservation_id: str
    order_id: str
    quantity: int
    released: bool = False
    # Units taken from this process's limited stock, per product id; given back on release.
    taken: dict[str, int] = field(default_factory=dict)


def _reservation(effect: Effect) -> Reservation:
    return Reservation(effect.result, effect.order_id, int(effect.params()["quantity"]))


class Inventory:
    """Stock levels, and one reservation (and release) per order."""

    def __init__(self, settings: InventorySettings, ledger: Ledger | None) -> None:
        self.settings = settings
        # Units left per product with limited stock; unlimited products are absent.
        self.stock = dict(settings.sim_stock)
        self._default_stock = self.stock.pop(ANY_PRODUCT, None)
        self.reservations = Effects(EffectKind.RESERVE, ledger, _reservation)  # by order id
        self._releases = Effects(EffectKind.RELEASE, ledger, lambda effect: effect.result)

    def stock_level(self, product_id: str) -> int | None:
        """Units of a product in stock, or None if its stock is unlimited."""
        return self.stock.get(product_id, self._default_stock)

    async def reserve(self, order_id: str, items: Iterable[OrderItem]) -> str:
        """Reserves the items, taking them from stock, once per order; returns its id."""
        reservation = await self.reservations.recall(order_id, order_id)
        if reservation is None:
            await simulate(self.settings.sim_inventory_seconds, order_id, "reserving inventory")
            reservation = self.reservations.get(order_id)
        if reservation is None:
            wanted = Counter[str]()
            for item in items:
                wanted[item.product_id] += item.quantity
            taken = self._take(order_id, wanted)
            request = {"order_id": order_id, "items": wanted, "quantity": wanted.total()}
            rid, created = f"RSV-{order_id}", False
            try:
                reservation, created = await self.reservations.record(
                    order_id, order_id, request, rid
                )
            finally:
                if not created:
                    self._add(taken)  # not recorded, or another attempt's reservation stands
            if created:
                reservation.taken = taken
                logger.info("order %s: reserved %d item(s) as %s", order_id, wanted.total(), rid)
                return rid
        logger.info("order %s: already reserved as %s", order_id, reservation.reservation_id)
        return reservation.reservation_id

    async def release(self, order_id: str, reservation_id: str) -> None:
        """Releases the order's reservation, giving its stock back, once; a no-op if never made."""
        released = await self._releases.recall(order_id, order_id)
        reservation = await self.reservations.recall(order_id, order_id, attempt=False)
        if reservation is not None and released is not None:
            self._give_back(reservation)  # released by an earlier attempt, maybe elsewhere
        if reservation is None or reservation.released:
            # Compensation must not fail: nothing held means nothing to release.
            state = "never made" if reservation is None else "already released"
            logger.info(
                "order %s: reservation %s %s, nothing to release",
                order_id,
                reservation_id or "(none)",
                state,
            )
            return
        await simulate(self.settings.sim_inventory_seconds, order_id, "releasing inventory")
        rid = reservation.reservation_id
        if rid != reservation_id:
            logger.warning("order %s: releasing %s, not %r as asked", order_id, rid, reservation_id)
        request = {"order_id": order_id, "reservation_id": rid}
        await self._releases.record(order_id, order_id, request, rid)
        self._give_back(reservation)
        logger.info("order %s: released %s", order_id, rid)

    def _take(self, order_id: str, wanted: Mapping[str, int]) -> dict[str, int]:
        """Takes the units of products with limited stock; OutOfStock, taking none, if short.

        No await between check and take, so concurrent orders cannot both get the last unit.
        """
        taken = {p: units for p, units in wanted.items() if self.stock_level(p) is not None}
        shortages = [
            f"{product} (requested {units}, available {available})"
            for product, units in taken.items()
            if units > (available := self.stock_level(product) or 0)
        ]
        if shortages:
            logger.info("order %s: out of stock: %s", order_id, ", ".join(shortages))
            raise ApplicationError(
                f"Out of stock: {', '.join(shortages)}",
                type=OUT_OF_STOCK_ERROR,
                non_retryable=True,
            )
        self._add(taken, -1)
        return taken

    def _give_back(self, reservation: Reservation) -> None:
        """Marks the reservation released and returns its stock, once."""
        if not reservation.released:
            # The flag and the stock change together, so stock is given back once.
            reservation.released = True
            self._add(reservation.taken)

    def _add(self, units: Mapping[str, int], sign: int = 1) -> None:
        for product, count in units.items():
            self.stock[product] = (self.stock_level(product) or 0) + sign * count
