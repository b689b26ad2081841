"""``hpad serve --workers N``: N worker processes in one container (one pod), sharing its GPU.

Each child is a plain ``hpad serve`` with the supervisor's own command line (so the same settings), plus
the settings that must differ between children, given both as ``HPAD_*`` variables and as flags after the
caller's (flags beat the environment, and argparse keeps the last of a repeated flag):

* ``workers=1``: a child never supervises;
* ``client_id=<client_id>-<i>``: broker logs, events' ``batch_id`` and dead letters' ``hpad-worker`` header
  tell the children apart;
* ``metrics_port=<base>+<i>`` for a fixed base port (0 = any free port and -1 = off stay as they are);
* ``transactional_id=<id>-<i>`` when one is set (two producers with one transactional id fence each other).

Every child is its own consumer-group member: the group spreads the partitions over all children of all
pods, and each child loads its own copy of the model on the same device.

Lifecycle. SIGTERM / SIGINT are forwarded to every child (a second signal too: the children then abandon
their in-flight batches, uncommitted); the supervisor waits up to HPAD_SHUTDOWN_TIMEOUT_MS +
HPAD_REQUEST_TIMEOUT_MS + 5 s (what a child needs to drain and flush), then SIGKILLs what is left. When a
child exits non-zero on its own, the others get SIGTERM and the supervisor exits with that child's status
(killed by signal N: 128 + N), so the orchestrator restarts the whole set. It exits 0 when every child
exited 0, or was stopped, while still loading its model, by the signal the supervisor forwarded. Children
run in their own process group (a terminal's Ctrl-C reaches them once, through the supervisor) and, on
Linux, get SIGTERM when the supervisor dies, so nothing it started outlives it.

``--max-frames`` and ``--timeout`` go to every child unchanged: ``--timeout`` bounds each child (so the
whole run), ``--max-frames`` counts the frames of each child.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from consumers.service import stop_signals
from consumers.settings import ENV_PREFIX, WorkerSettings
from hpad.errors import ConfigError

log = logging.getLogger(__name__)

STOP_MARGIN_S = 5.0  # on top of the children's own shutdown wait and final flush
FORWARDED = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Child:
    """One worker process to start: its index, command line and complete environment."""

    index: int
    argv: tuple[str, ...]
    env: Mapping[str, str]


# ------------------------------------------------------------------------------------------ the plan (pure)


def child_port(base: int, index: int) -> int:
    """Metrics port of child ``index``: base + index; 0 (any free port) and -1 (off) are kept."""
    return base + index if base > 0 else base


def check_ports(settings: WorkerSettings) -> None:
    last = child_port(settings.metrics_port, settings.workers - 1)
    if last > 65535:
        raise ConfigError(f"HPAD_METRICS_PORT {settings.metrics_port} + HPAD_WORKERS {settings.workers} - 1 = "
                          f"{last} is not a port: the workers use consecutive ports")


def child_settings(settings: WorkerSettings, index: int) -> dict[str, str]:
    """The settings child ``index`` gets on top of the supervisor's (field name -> value as text)."""
    values = {
        "workers": "1",
        "client_id": f"{settings.client_id}-{index}",
        "metrics_port": str(child_port(settings.metrics_port, index)),
    }
    if settings.transactional_id is not None:
        values["transactional_id"] = f"{settings.transactional_id}-{index}"
    return values


def child_env(environ: Mapping[str, str], values: Mapping[str, str]) -> dict[str, str]:
    """The supervisor's environment with ``values`` as HPAD_* variables (secrets reach children this way)."""
    return {**environ, **{f"{ENV_PREFIX}{name.upper()}": value for name, value in values.items()}}


def child_argv(argv: Sequence[str], values: Mapping[str, str], python: str = sys.executable) -> list[str]:
    """``python -m hpad.cli serve <argv> --name=value ...``: the appended flags win over any in ``argv``."""
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in values.items()]
    return [python, "-m", "hpad.cli", "serve", *argv, *flags]


def plan(settings: WorkerSettings, argv: Sequence[str], environ: Mapping[str, str]) -> list[Child]:
    """The ``settings.workers`` children of a supervisor started with ``argv`` in ``environ``."""
    check_ports(settings)
    children = []
    for index in range(settings.workers):
        values = child_settings(settings, index)
        children.append(Child(index, tuple(child_argv(argv, values)), child_env(environ, values)))
    return children


def stop_timeout_s(settings: WorkerSettings) -> float:
    """How long stopping children may take before SIGKILL: their drain wait + final flush + a margin."""
    return (settings.shutdown_timeout_ms + settings.request_timeout_ms) / 1000 + STOP_MARGIN_S


def exit_status(returncode: int) -> int:
    """Popen return code -> exit status (killed by signal N -> 128 + N, as shells and Kubernetes show it)."""
    return 128 - returncode if returncode < 0 else returncode


def clean_exit(returncode: int, forwarded: Collection[int]) -> bool:
    """Exit 0, or killed by a signal the supervisor forwarded (a child still loading its model has no
    handler yet, and has nothing in flight)."""
    return returncode == 0 or (returncode < 0 and -returncode in forwarded)


# ------------------------------------------------------------------------------------------ running


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec function that makes the child get SIGTERM when the supervisor dies (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the supervisor died between fork and prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


class Supervisor:
    """Starts the children, forwards stop signals, and stops all of them when one fails (`run`)."""

    def __init__(self, children: Sequence[Child], stop_timeout_s: float, poll_s: float = 0.1) -> None:
        self.children = list(children)
        self.stop_timeout_s = stop_timeout_s
        self.poll_s = poll_s
        self.processes: dict[int, subprocess.Popen] = {}
        self.returncodes: dict[int, int] = {}
        self.forwarded: set[int] = set()
        self.failure: tuple[int, int] | None = None  # (child index, exit status) of the first failure
        self._pending: list[int] = []
        self._deadline: float | None = None

    def run(self) -> int:
        """Until every child has exited; the exit status of the first failed child, else 0."""
        with stop_signals(self._on_signal, install=True, signals=FORWARDED):
            try:
                preexec = _parent_death_signal()
                for child in self.children:
                    if self._pending:  # asked to stop while starting: start no more
                        break
                    self.processes[child.index] = subprocess.Popen(
                        child.argv, env=dict(child.env), stdin=subprocess.DEVNULL, process_group=0,
                        preexec_fn=preexec)
                    log.info("worker %d started: pid %d", child.index, self.processes[child.index].pid)
                self._watch()
            finally:
                self._kill_running()  # also on an unexpected error: nothing started here outlives it
        return 0 if self.failure is None else self.failure[1]

    def _on_signal(self, signum: int) -> None:
        self._pending.append(signum)  # forwarded by the loop (no process calls inside a handler)

    def _running(self) -> list[tuple[int, subprocess.Popen]]:
        return [(i, p) for i, p in self.processes.items() if i not in self.returncodes]

    def _watch(self) -> None:
        while True:
            while self._pending:
                signum = self._pending.pop(0)
                log.info("received %s: stopping %d workers", signal.Signals(signum).name, len(self._running()))
                self._forward(signum)
            for index, process in self._running():
                code = process.poll()
                if code is not None:
                    self._exited(index, code)
            if not self._running():
                return
            if self._deadline is not None and time.monotonic() > self._deadline:
                log.error("workers still running %.0f s after the stop signal: killing them", self.stop_timeout_s)
                self._kill_running()
                continue
            time.sleep(self.poll_s)

    def _forward(self, signum: int) -> None:
        self.forwarded.add(signum)
        if self._deadline is None:
            self._deadline = time.monotonic() + self.stop_timeout_s
        for _, process in self._running():
            with contextlib.suppress(ProcessLookupError):  # exited just now: the loop collects it
                process.send_signal(signum)

    def _exited(self, index: int, code: int) -> None:
        self.returncodes[index] = code
        if clean_exit(code, self.forwarded):
            log.info("worker %d exited (%d)", index, code)
            return
        status = exit_status(code)
        if self.failure is None:
            self.failure = (index, status)
            log.error("worker %d failed (exit status %d): stopping the other workers", index, status)
            self._forward(signal.SIGTERM)
        else:
            log.warning("worker %d exited with status %d", index, status)

    def _kill_running(self) -> None:
        for _, process in self._running():
            process.kill()
        for index, process in self._running():
            self._exited(index, process.wait())


def supervise(settings: WorkerSettings, argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """``hpad serve`` with ``settings.workers`` > 1: run that many children of the same command line."""
    children = plan(settings, argv, os.environ if environ is None else environ)
    log.info("starting %d workers (client ids %s-0..%d, group %s)", len(children), settings.client_id,
             len(children) - 1, settings.group_id)
    return Supervisor(children, stop_timeout_s(settings)).run()
