"""Process lifecycle shared by the service commands: the one `run_main` runner, stopping, stop signals.

`run_main` is the shape of ``hpad serve``, ``hpad tune`` and ``hpad camera``: parse the settings (env <
.env < flags) -> log levels of our packages -> metrics server (``/metrics``, ``/healthz``, ``/readyz``, when
the process serves one) -> ``start`` (build the service, run it, return the exit code). Errors listed as
``fatal`` are logged and exit 1; a `ConfigError` propagates (``hpad`` prints it and exits 2); the metrics
server stops whatever happens.

`Stoppable` is the stop flag of a service loop (`request_stop` from any thread or a signal handler);
`stop_signals` installs SIGTERM/SIGINT handlers for the length of a run (main thread only) and puts the
previous ones back.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kafka.errors import KafkaError

from consumers.metrics import Health, start_metrics_server
from hpad.errors import ConfigError

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class Telemetry:
    """The metrics holder and health state a service reports to (served by the metrics server)."""

    metrics: Any
    health: Health


Parse = Callable[[list[str]], tuple[Any, argparse.Namespace]]
Start = Callable[[Any, argparse.Namespace, Telemetry | None], int]


def set_log_levels(level: str | None, packages: Sequence[str]) -> None:
    """Our packages at the settings' level; the root logger stays as the CLI set it (open_clip is chatty)."""
    if level is None:
        return
    for package in packages:
        logging.getLogger(package).setLevel(level)


def run_main(argv: Sequence[str] | None, parse: Parse, start: Start, *, packages: Sequence[str],
             metrics: Callable[[Any], object | None] | None = None,
             fatal: tuple[type[BaseException], ...] = (KafkaError,),
             describe: Callable[[BaseException], str] = str, logger: logging.Logger = log) -> int:
    """parse -> log levels -> metrics server -> ``start(settings, namespace, telemetry)`` -> exit code.

    ``metrics(settings)`` gives the process's metrics holder, or None when it serves no metrics itself
    (then ``telemetry`` is None)."""
    settings, ns = parse(list(sys.argv[1:] if argv is None else argv))
    set_log_levels(getattr(settings, "log_level", None), packages)
    holder = metrics(settings) if metrics is not None else None
    telemetry, server = None, None
    if holder is not None:
        telemetry = Telemetry(holder, Health(settings.liveness_timeout_ms / 1000))
        server = start_metrics_server(holder, telemetry.health, settings.metrics_host, settings.metrics_port)
    try:
        return start(settings, ns, telemetry)
    except ConfigError:
        raise
    except fatal as exc:
        logger.error("%s", describe(exc))
        return 1
    finally:
        if server is not None:
            server.stop()


class Stoppable:
    """The stop flag of a service loop: the first `request_stop` sets ``stop_event`` and ``stop_reason``."""

    def __init__(self) -> None:
        self.stop_event = threading.Event()
        self.stop_reason = "stop"

    def request_stop(self, reason: str = "stop") -> None:
        if not self.stop_event.is_set():
            self.stop_reason = reason
            self.stop_event.set()


@contextmanager
def stop_signals(handler: Callable[[int], None], install: bool | None = None,
                 signals: Collection[int] = STOP_SIGNALS) -> Iterator[None]:
    """``handler(signum)`` on ``signals`` inside the block; by default only on the main thread (Python
    allows handlers nowhere else). The previous handlers are restored on the way out."""
    if install is None:
        install = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, lambda signum, frame: handler(signum)) for signum in signals} \
        if install else {}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
