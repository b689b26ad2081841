"""`hpad serve --workers N`: the children's settings, the supervisor's stop / failure rules, and two real runs
(two workers share a group and every frame once; a failing child stops the other)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from consumers.app import parse_args
from consumers.settings import WorkerSettings
from consumers.supervisor import (
    Child,
    child_argv,
    clean_exit,
    exit_status,
    plan,
    stop_timeout_s,
)
from hpad.errors import ConfigError
from tests.consumers.kafka_helpers import events_by_frame, good_frame, new_topics, publish, read_all, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_env(clean_hpad_env):
    """No HPAD_* variable or .env file of the machine leaks into the settings tests."""


# ------------------------------------------------------------------------------------------ the plan


@pytest.mark.parametrize("base,ports", [(9400, ["9400", "9401", "9402"]), (0, ["0", "0", "0"]),
                                        (-1, ["-1", "-1", "-1"])])
def test_children_get_their_own_client_id_and_metrics_port(clean_env, base, ports):
    settings = WorkerSettings(workers=3, metrics_port=base, client_id="cam-line")
    children = plan(settings, ["--workers", "3"], {"PATH": "/bin", "HPAD_GROUP_ID": "g"})
    assert [c.index for c in children] == [0, 1, 2]
    assert [c.env["HPAD_METRICS_PORT"] for c in children] == ports
    assert [c.env["HPAD_CLIENT_ID"] for c in children] == ["cam-line-0", "cam-line-1", "cam-line-2"]
    for child in children:
        assert child.env["HPAD_WORKERS"] == "1" and child.env["HPAD_GROUP_ID"] == "g"  # same group, same env
        assert child.env["PATH"] == "/bin" and "HPAD_TRANSACTIONAL_ID" not in child.env
        assert child.argv[:4] == (sys.executable, "-m", "hpad.cli", "serve")


def test_child_flags_win_over_the_supervisors_flags_and_environment(clean_env, monkeypatch):
    """The children re-parse the supervisor's own command line: the appended flags must win over the same
    flags given there, and over HPAD_* in the environment."""
    argv = ["--workers", "4", "--metrics-port", "9500", "--client-id", "line-7", "--max-batch-size", "16",
            "--transactional-id", "txn", "--max-frames", "10", "--timeout", "30"]
    supervisor, _ = parse_args(argv)
    for index, child in enumerate(plan(supervisor, argv, dict(os.environ))):
        with monkeypatch.context() as m:
            m.setenv("HPAD_WORKERS", "4")  # what the container sets for the supervisor
            m.setenv("HPAD_METRICS_PORT", "9500")
            settings, ns = parse_args(list(child.argv[4:]))
        assert (settings.workers, settings.metrics_port, settings.client_id) == (1, 9500 + index, f"line-7-{index}")
        assert settings.transactional_id == f"txn-{index}"
        assert (settings.max_batch_size, settings.group_id) == (16, supervisor.group_id)  # the rest is shared
        assert (ns.max_frames, ns.timeout) == (10, 30.0)  # --max-frames counts per child


def test_consecutive_ports_must_exist(clean_env):
    with pytest.raises(ConfigError, match="HPAD_METRICS_PORT 65535 \\+ HPAD_WORKERS 2"):
        plan(WorkerSettings(workers=2, metrics_port=65535), [], {})
    assert len(plan(WorkerSettings(workers=2, metrics_port=65534), [], {})) == 2


def test_workers_setting_is_bounded(clean_env, monkeypatch):
    from hpad.cli import main

    assert parse_args(["--workers", "3"])[0].workers == 3
    monkeypatch.setenv("HPAD_WORKERS", "2")
    assert parse_args([])[0].workers == 2
    assert main(["serve", "--workers", "0"]) == 2
    assert main(["serve", "--workers", "17"]) == 2


def test_exit_status_and_stop_timeout(clean_env):
    assert [exit_status(c) for c in (0, 1, 2, -signal.SIGKILL, -signal.SIGTERM)] == [0, 1, 2, 137, 143]
    assert clean_exit(0, set()) and clean_exit(-signal.SIGTERM, {signal.SIGTERM})
    assert not clean_exit(-signal.SIGTERM, set()) and not clean_exit(-signal.SIGKILL, {signal.SIGTERM})
    assert not clean_exit(1, {signal.SIGTERM})
    settings = WorkerSettings(shutdown_timeout_ms=30000, request_timeout_ms=20000, liveness_timeout_ms=60000)
    assert stop_timeout_s(settings) == 55.0  # drain wait + final flush + 5 s, inside the pod's grace period


# ------------------------------------------------------------------------------------------ the supervisor, on stand-in children

# a child: prints "ready <i> <pid>", then behaves as told by its mode
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    index, mode = int(sys.argv[1]), sys.argv[2]
    for signum in (signal.SIGTERM, signal.SIGINT):
        if mode == "stubborn":
            signal.signal(signum, signal.SIG_IGN)
        elif mode != "bare":
            signal.signal(signum, lambda *a: (print(f"stopped {index}", flush=True), sys.exit(0)))
    print(f"ready {index} {os.getpid()}", flush=True)
    if mode == "fail":
        time.sleep(0.3)
        sys.exit(3)
    time.sleep(60)
""")
# the supervisor under test, in its own process (signals), over children of the given modes
DRIVER = textwrap.dedent("""
    import logging, sys
    from consumers.supervisor import Child, Supervisor
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    child, timeout, *modes = sys.argv[1:]
    children = [Child(i, (sys.executable, "-c", child, str(i), mode), {}) for i, mode in enumerate(modes)]
    sys.exit(Supervisor(children, float(timeout), poll_s=0.02).run())
""")


class Driven:
    """A stand-in supervisor run: the process, and the pids its children reported."""

    def __init__(self, *modes: str, timeout: float = 10.0) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen([sys.executable, "-c", DRIVER, CHILD, str(timeout), *modes], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.pids: list[int] = []
        while len(self.pids) < len(modes):
            line = self.process.stdout.readline()
            assert line, f"supervisor ended early: {self.process.stderr.read()}"
            self.lines.append(line.strip())
            if line.startswith("ready "):
                self.pids.append(int(line.split()[2]))

    def wait(self, timeout: float = 15.0) -> tuple[int, str]:
        try:
            out, err = self.process.communicate(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        self.lines += out.splitlines()
        return self.process.returncode, err


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return _zombie(pid)


def _zombie(pid: int) -> bool:  # an exited child not yet reaped by its (new) parent counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def test_stop_signal_is_forwarded_and_clean_stops_exit_zero():
    run = Driven("trap", "trap", "bare")  # "bare": killed by the forwarded SIGTERM (no handler yet): clean
    run.process.send_signal(signal.SIGTERM)
    code, err = run.wait()
    assert code == 0, err
    assert {"stopped 0", "stopped 1"} <= set(run.lines)
    assert all(gone(pid) for pid in run.pids)


def test_a_failing_child_stops_the_others_and_sets_the_exit_status():
    start = time.monotonic()
    run = Driven("trap", "fail", "trap")
    code, err = run.wait()
    assert code == 3, err
    assert "worker 1 failed (exit status 3)" in err
    assert time.monotonic() - start < 10
    assert all(gone(pid) for pid in run.pids)


def test_a_child_killed_from_outside_is_a_failure():
    run = Driven("trap", "trap")
    os.kill(run.pids[0], signal.SIGKILL)
    code, err = run.wait()
    assert code == 128 + signal.SIGKILL, err
    assert all(gone(pid) for pid in run.pids)


def test_children_that_ignore_the_stop_are_killed_after_the_timeout():
    run = Driven("stubborn", "trap", timeout=1.0)
    start = time.monotonic()
    run.process.send_signal(signal.SIGINT)
    code, err = run.wait()
    assert code == 128 + signal.SIGKILL, err
    assert "killing them" in err and 1.0 <= time.monotonic() - start < 8
    assert all(gone(pid) for pid in run.pids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_children_do_not_outlive_a_killed_supervisor():
    run = Driven("trap", "bare")
    run.process.kill()
    run.process.wait()
    wait_for(lambda: all(gone(pid) for pid in run.pids), timeout=10, what="children to stop")


def test_child_spec_is_plain_data():
    child = Child(0, tuple(child_argv(["--timeout", "5"], {"workers": "1"}, python="py")), {"A": "1"})
    assert child.argv == ("py", "-m", "hpad.cli", "serve", "--timeout", "5", "--workers=1")


# ------------------------------------------------------------------------------------------ `hpad serve --workers 2`, for real


def free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise AssertionError("no two consecutive free ports")


def serve(broker, topics, tmp_path, name: str, base_port: int) -> tuple[subprocess.Popen, object]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("HPAD_")}
    env.update({
        "HF_HUB_OFFLINE": "1", "HPAD_BOOTSTRAP_SERVERS": broker.bootstrap, "HPAD_INPUT_TOPIC": topics.frames,
        "HPAD_EVENTS_TOPIC": topics.events, "HPAD_DLQ_TOPIC": topics.dlq, "HPAD_GROUP_ID": topics.group,
        "HPAD_MODEL": "hpad-tiny", "HPAD_RANDOM_INIT": "true", "HPAD_DEVICE": "cpu", "HPAD_TORCH_THREADS": "1",
        "HPAD_CATEGORIES": "widget", "HPAD_SESSION_TIMEOUT_MS": "2000", "HPAD_HEARTBEAT_INTERVAL_MS": "500",
        "HPAD_METRICS_HOST": "127.0.0.1", "HPAD_MAX_BATCH_SIZE": "2", "HPAD_MAX_WAIT_MS": "5",
        "HPAD_NORMALS_TOPIC": "", "HPAD_PROMPTS_TOPIC": "", "HPAD_CLIENT_ID": "line",
    })
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed by the caller
    command = [sys.executable, "-m", "hpad.cli", "serve", "--workers", "2", "--metrics-port", str(base_port)]
    return subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT), log


def child_pids(log_path: Path) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker \d+ started: pid (\d+)", log_path.read_text())]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


def assigned(port: int) -> int:
    code, text = get(port, "/metrics")
    found = re.search(r"^hpad_assigned_partitions (\S+)$", text, re.M) if code == 200 else None
    return int(float(found.group(1))) if found else 0


@pytest.mark.kafka
def test_two_workers_share_the_group_and_score_every_frame_once(kafka_broker, tmp_path):
    topics = new_topics(kafka_broker, partitions=4)
    port = free_port_pair()
    process, log = serve(kafka_broker, topics, tmp_path, "two", port)
    pids: list[int] = []
    try:
        # both children own partitions (each serves its own port), the four split between them
        wait_for(lambda: assigned(port) > 0 and assigned(port + 1) > 0 and assigned(port) + assigned(port + 1) == 4,
                 timeout=45, interval=0.2, what="both workers to own partitions")
        pids = child_pids(tmp_path / "two.log")
        assert len(pids) == 2 and process.pid not in pids
        rng = np.random.default_rng(3)
        frames = [good_frame(rng, camera=f"cam-{i % 4}") for i in range(24)]
        for i, frame in enumerate(frames):
            frame.partition = i % 4
        publish(kafka_broker, topics.frames, frames)
        events = events_by_frame(read_all(kafka_broker, topics.events, expected=len(frames), timeout=45))
        assert set(events) == {f.frame_id for f in frames}
        assert all(len(copies) == 1 for copies in events.values()), "a frame was scored twice"
        workers = {e["batch_id"].split("@")[0] for copies in events.values() for e in copies}
        assert workers == {"line-0", "line-1"}, workers  # both children scored, under their own client ids
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=40)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    text = (tmp_path / "two.log").read_text()
    assert code == 0, text[-3000:]
    assert all(gone(pid) for pid in pids), "a worker outlived the supervisor"
    assert text.count("received SIGTERM: finishing in-flight batches") == 2  # each child drained


@pytest.mark.kafka
def test_a_child_that_cannot_start_stops_the_supervisor(kafka_broker, tmp_path):
    """The second child's metrics port is taken: it exits 1, the supervisor stops the first and exits 1."""
    topics = new_topics(kafka_broker, partitions=2)
    port = free_port_pair()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port + 1))
        taken.listen()
        process, log = serve(kafka_broker, topics, tmp_path, "clash", port)
        try:
            code = process.wait(timeout=45)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    text = (tmp_path / "clash.log").read_text()
    assert code == 1, text[-3000:]
    assert "worker 1 failed (exit status 1): stopping the other workers" in text
    pids = child_pids(tmp_path / "clash.log")
    assert len(pids) == 2 and all(gone(pid) for pid in pids)
