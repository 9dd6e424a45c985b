"""The worker's settings: command-line flags, defaulting to environment variables."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from activities.config import SimulationConfig
from infra import logs, temporal_connection
from infra.temporal_connection import TemporalConnection
from worker import tuning as worker_tuning
from workflows.models import DEFAULT_TASK_QUEUE

METRICS_PORT_ENV = "ORDER_WORKER_METRICS_PORT"
METRICS_HOST_ENV = "ORDER_WORKER_METRICS_HOST"
DEFAULT_METRICS_HOST = "localhost"


@dataclass(frozen=True)
class WorkerConfig:
    # Address, namespace, TLS and API key of Temporal (infra/temporal_connection.py).
    temporal: TemporalConnection = field(default_factory=TemporalConnection)
    task_queue: str = DEFAULT_TASK_QUEUE
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    # The Temporal SDK's Prometheus metrics at http://<metrics_host>:<metrics_port>/metrics;
    # None: not served.
    metrics_port: int | None = None
    metrics_host: str = DEFAULT_METRICS_HOST
    # Text or JSON lines, and the level (infra/logs.py).
    log: logs.LogSettings = field(default_factory=logs.LogSettings)
    # Cache size, slots and pollers (worker/tuning.py).
    tuning: worker_tuning.WorkerTuning = field(default_factory=worker_tuning.WorkerTuning)


def _parse_metrics_port(text: str) -> int:
    """1 to 65535: the SDK's endpoint cannot report a port the OS picked."""
    try:
        port = int(text.strip())
    except ValueError:
        raise ValueError(f"invalid port {text!r}: must be an integer") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid port {text!r}: must be 1 to 65535")
    return port


def _argparse_port(text: str) -> int:
    try:
        return _parse_metrics_port(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def from_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> WorkerConfig:
    """Parses `argv` (without the program name); exits with a usage message if it is invalid.

    Flags win over their variables (the Temporal connection's TEMPORAL_*,
    ORDER_TASK_QUEUE, ORDER_WORKER_METRICS_*, ORDER_LOG_*);
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
        "--task-queue",
        default=env.get("ORDER_TASK_QUEUE") or DEFAULT_TASK_QUEUE,
        help="task queue to poll (env ORDER_TASK_QUEUE; default %(default)s)",
    )
    parser.add_argument(
        "--metrics-port",
        type=_argparse_port,
        default=None,
        help="serve the Temporal SDK's Prometheus metrics at "
        f"http://<metrics host>:<port>/metrics (env {METRICS_PORT_ENV}; default: off)",
    )
    parser.add_argument(
        "--metrics-host",
        default=env.get(METRICS_HOST_ENV) or DEFAULT_METRICS_HOST,
        help=f"address the metrics listen on (env {METRICS_HOST_ENV}; default %(default)s)",
    )
    temporal_connection.add_arguments(parser)
    logs.add_arguments(parser)
    worker_tuning.add_arguments(parser)
    args = parser.parse_args(list(argv))
    for flag in ("task_queue", "metrics_host"):
        if not getattr(args, flag).strip():
            parser.error(f"--{flag.replace('_', '-')} must not be empty")
    metrics_port: int | None = args.metrics_port
    if metrics_port is None and env.get(METRICS_PORT_ENV):
        try:
            metrics_port = _parse_metrics_port(env[METRICS_PORT_ENV])
        except ValueError as err:
            parser.error(f"environment variable {METRICS_PORT_ENV}: {err}")
    try:
        temporal = temporal_connection.from_arguments(args, env)
        log = logs.from_arguments(args, env)
        tuning = worker_tuning.from_arguments(args, env)
    except ValueError as err:
        parser.error(str(err))
    try:
        simulation = SimulationConfig.from_env(env)
    except ValueError as err:
        parser.error(str(err))
    return WorkerConfig(
        temporal=temporal,
        task_queue=args.task_queue,
        simulation=simulation,
        metrics_port=metrics_port,
        metrics_host=args.metrics_host.strip(),
        log=log,
        tuning=tuning,
    )
