"""The simulated providers, one a module with its settings; `ProviderSettings` mixes them all."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Self

from activities.providers.faults import FaultSettings
from activities.providers.inventory import ANY_PRODUCT, InventorySettings
from activities.providers.ledger import LedgerSettings
from activities.providers.mail import MailSettings
from activities.providers.payments import PaymentSettings
from activities.providers.shipping import ShippingSettings


class ProviderSettings(
    InventorySettings,
    PaymentSettings,
    ShippingSettings,
    MailSettings,
    FaultSettings,
    LedgerSettings,
):
    """Every simulated provider's settings."""

    @classmethod
    def instant(cls, outbox_dir: str | os.PathLike[str], **changes: Any) -> Self:
        """No simulated latency, emails in `outbox_dir`, and any other `changes`: for tests."""
        instant = {name: 0.0 for name in ProviderSettings.model_fields if name.endswith("_seconds")}
        return cls(**{**instant, "outbox_dir": Path(outbox_dir), **changes})

    def describe_failures(self) -> str:
        """For the worker's startup log: which failures are simulated ("" for none)."""
        parts = []
        if self.sim_stock:
            levels = sorted(self.sim_stock.items(), key=lambda item: (item[0] == ANY_PRODUCT, item))
            parts.append("stock " + ", ".join(f"{product}={units}" for product, units in levels))
        if self.sim_decline_methods:
            parts.append(f"declining {', '.join(sorted(self.sim_decline_methods))}")
        if self.sim_decline_over is not None:
            parts.append(f"declining charges over {self.sim_decline_over}")
        how = []
        if self.sim_fail_first_attempts:
            how.append(f"first {self.sim_fail_first_attempts} attempt(s)")
        if self.sim_failure_rate:
            how.append(f"{self.sim_failure_rate * 100:g}% of attempts")
        if how and self.sim_fail_activities:
            activities = ", ".join(sorted(self.sim_fail_activities))
            parts.append(f"failing {' and '.join(how)} of {activities}")
        if self.sim_fail_for_good:
            parts.append(f"refusing {', '.join(sorted(self.sim_fail_for_good))} for good")
        return "; ".join(parts)
