"""The worker's settings: command-line flags, defaulting to environment variables."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from activities.config import SimulationConfig
from workflows.models import DEFAULT_TASK_QUEUE

DEFAULT_TEMPORAL_ADDRESS = "localhost:7233"
DEFAULT_NAMESPACE = "default"


@dataclass(frozen=True)
class WorkerConfig:
    temporal_address: str = DEFAULT_TEMPORAL_ADDRESS
    namespace: str = DEFAULT_NAMESPACE
    task_queue: str = DEFAULT_TASK_QUEUE
    simulation: SimulationConfig = field(default_factory=SimulationConfig)


def from_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> WorkerConfig:
    """Parses `argv` (without the program name); exits with a usage message if it is invalid.

    Flags win over TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE and ORDER_TASK_QUEUE;
    the simulated providers and the email settings come from the environment
    only (ORDER_SIM_*, ORDER_OUTBOX_DIR, ORDER_EMAIL_FROM, ORDER_SMTP_*: see
    activities/config.py), and an invalid one exits with a usage message too.
    """
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m worker",
        description="Runs the Temporal worker for the order workflow and its activities.",
    )
    parser.add_argument(
        "--temporal-address",
        default=env.get("TEMPORAL_ADDRESS") or DEFAULT_TEMPORAL_ADDRESS,
        help="Temporal frontend host:port (env TEMPORAL_ADDRESS; default %(default)s)",
    )
    parser.add_argument(
        "--namespace",
        default=env.get("TEMPORAL_NAMESPACE") or DEFAULT_NAMESPACE,
        help="Temporal namespace (env TEMPORAL_NAMESPACE; default %(default)s)",
    )
    parser.add_argument(
        "--task-queue",
        default=env.get("ORDER_TASK_QUEUE") or DEFAULT_TASK_QUEUE,
        help="task queue to poll (env ORDER_TASK_QUEUE; default %(default)s)",
    )
    args = parser.parse_args(list(argv))
    for flag in ("temporal_address", "namespace", "task_queue"):
        if not getattr(args, flag).strip():
            parser.error(f"--{flag.replace('_', '-')} must not be empty")
    try:
        simulation = SimulationConfig.from_env(env)
    except ValueError as err:
        parser.error(str(err))
    return WorkerConfig(
        temporal_address=args.temporal_address,
        namespace=args.namespace,
        task_queue=args.task_queue,
        simulation=simulation,
    )
