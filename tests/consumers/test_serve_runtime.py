"""`hpad serve` with an exported image tower (HPAD_RUNTIME=openvino / onnxruntime) on the embedded tansu broker.

* The worker suite's N-in = N-out test (`tests.consumers.test_worker.test_frames_in_events_and_dead_letters_out`:
  N good frames and one poison frame per reason -> exactly N events and one dead letter each, offsets
  committed to the end) passes with the scorer's image tower on OpenVINO.
* `hpad serve` as a process with HPAD_RUNTIME=openvino scores every frame once, logs the runtime it uses and
  drains on SIGTERM; its scores agree with torch eager within 1e-3.
* The settings refuse inconsistent runtime options, and the worker refuses an export that does not match its
  model or LAA settings before it connects to anything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from consumers.models import build_scorer, model_info, runtime_spec
from consumers.prompt_provider import StaticPromptProvider
from consumers.settings import WorkerSettings, load_settings
from consumers.worker import Worker
from hpad.attention import EncoderSpec, LAAConfig
from hpad.errors import ConfigError
from hpad.export import ExportMismatchError, export_encoder
from hpad.runtime import RuntimeSpec, load_runtime
from hpad.scorer import Scorer, ScorerConfig, encoder_spec
from tests.consumers import test_worker
from tests.consumers.kafka_helpers import (
    KafkaTools,
    assert_commits_covered,
    events_by_frame,
    good_frame,
    wait_for,
)

pytestmark = pytest.mark.kafka


def spec(backbone, laa: LAAConfig, **memory) -> EncoderSpec:
    """The encoder a default scorer with ``laa`` builds (``memory``: memory_blocks / memory_path)."""
    return EncoderSpec.for_visual(backbone.model.visual, laa, **memory)


@pytest.fixture(scope="module")
def openvino_export(tiny_backbone, tmp_path_factory):
    """The session's tiny model (hpad-tiny, random init, seed 0: what the settings below load) as OpenVINO IR."""
    folder = tmp_path_factory.mktemp("serve-export") / "openvino"
    export_encoder(tiny_backbone, spec(tiny_backbone, LAAConfig()), folder, "openvino")
    return folder


def test_n_in_n_out_on_openvino(kafka_broker, tiny_backbone, openvino_export):
    """The worker suite's N-in = N-out test, its scorer's image tower on OpenVINO (tansu)."""

    def make_worker(settings, scorer=None, provider=None, cls=Worker):
        config = ScorerConfig(max_batch=settings.max_batch_size)
        runtime = load_runtime(RuntimeSpec("openvino", openvino_export), tiny_backbone, encoder_spec(tiny_backbone, config))
        scorer = Scorer(tiny_backbone, config=config, runtime=runtime)
        assert scorer.runtime.name == "openvino"
        return cls(settings, scorer, StaticPromptProvider.build(scorer, settings.categories),
                   model_info(scorer, settings.precision))

    test_worker.test_frames_in_events_and_dead_letters_out(KafkaTools(kafka_broker), make_worker)


def serve_env(kafka, topics, folder, **extra: str) -> dict[str, str]:
    return {
        **os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
        "HPAD_BOOTSTRAP_SERVERS": kafka.bootstrap, "HPAD_INPUT_TOPIC": topics.frames,
        "HPAD_EVENTS_TOPIC": topics.events, "HPAD_DLQ_TOPIC": topics.dlq, "HPAD_GROUP_ID": topics.group,
        "HPAD_MODEL": "hpad-tiny", "HPAD_RANDOM_INIT": "true", "HPAD_DEVICE": "cpu", "HPAD_TORCH_THREADS": "1",
        "HPAD_CATEGORIES": "widget", "HPAD_SESSION_TIMEOUT_MS": "2000", "HPAD_HEARTBEAT_INTERVAL_MS": "500",
        "HPAD_METRICS_PORT": "-1", "HPAD_MAX_BATCH_SIZE": "4", "HPAD_MAX_WAIT_MS": "5", "HPAD_NORMALS_TOPIC": "",
        "HPAD_PROMPTS_TOPIC": "", "HPAD_RUNTIME": "openvino", "HPAD_RUNTIME_MODEL": str(folder),
        "HPAD_RUNTIME_THREADS": "1", **extra,
    }


@pytest.mark.slow
def test_hpad_serve_process_on_openvino_scores_every_frame_once(kafka_broker, tiny_backbone, openvino_export,
                                                                tmp_path):
    kafka = KafkaTools(kafka_broker)
    topics = kafka.new_topics(partitions=2)
    rng = np.random.default_rng(3)
    frames = [good_frame(rng, "widget", f"cam-{i % 2}", (64 + 8 * (i % 3), 80), (".png", ".jpg")[i % 2])
              for i in range(24)]
    for i, frame in enumerate(frames):
        frame.partition = i % 2
    sent = kafka.publish(topics.frames, frames)
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "hpad.cli", "serve"], stdout=log, stderr=subprocess.STDOUT,
                                   env=serve_env(kafka, topics, openvino_export), cwd=tmp_path)
        try:
            wait_for(lambda: len(kafka.read_all(topics.events, idle=0.3)) >= len(frames) or process.poll() is not None,
                     timeout=120, interval=0.5, what="an event for every frame")
            assert process.poll() is None, log_path.read_text()[-3000:]
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    assert "image tower runs on {'runtime': 'openvino'" in text
    events = events_by_frame(kafka.read_all(topics.events, expected=len(frames)))
    assert set(events) == {f.frame_id for f in frames} and all(len(v) == 1 for v in events.values())
    committed = kafka.committed_offsets(topics.group, topics.frames)
    assert committed == {0: 12, 1: 12}
    assert_commits_covered(committed, sent, set(events))

    import cv2

    reference = Scorer.zero_shot(tiny_backbone, "widget")  # torch eager fp32 on the same frames
    pictures = [cv2.cvtColor(cv2.imdecode(np.frombuffer(f.value, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                for f in frames]
    expected = reference.score(pictures).pred_score
    got = np.array([events[f.frame_id][0]["score"] for f in frames])
    assert np.abs(expected - got).max() <= 1e-3


def test_runtime_settings_are_validated(clean_hpad_env, monkeypatch):
    base = {"model": "hpad-tiny", "random_init": True}
    with pytest.raises(ConfigError, match="HPAD_RUNTIME_MODEL"):
        load_settings(WorkerSettings, {**base, "runtime": "openvino"})
    with pytest.raises(ConfigError, match="HPAD_PRECISION=fp32"):
        load_settings(WorkerSettings, {**base, "runtime": "openvino", "runtime_model": "x", "precision": "bf16"})
    with pytest.raises(ConfigError, match="HPAD_DEVICE=cpu"):
        load_settings(WorkerSettings, {**base, "runtime": "onnxruntime", "runtime_model": "x", "device": "cuda"})
    with pytest.raises(ConfigError, match="no bf16"):
        load_settings(WorkerSettings, {**base, "runtime": "onnxruntime", "runtime_model": "x",
                                       "runtime_precision": "bf16"})
    with pytest.raises(ConfigError, match="int8 needs"):
        load_settings(WorkerSettings, {**base, "runtime_precision": "int8"})
    monkeypatch.setenv("HPAD_RUNTIME", "openvino")  # undone after the test (later subprocesses inherit os.environ)
    monkeypatch.setenv("HPAD_RUNTIME_MODEL", "/models/encoder")
    settings = load_settings(WorkerSettings, {**base, "runtime_precision": "bf16", "runtime_threads": 2})
    assert runtime_spec(settings) == RuntimeSpec("openvino", settings.runtime_model, "bf16", 2)


def test_worker_refuses_an_export_for_other_laa_settings(clean_hpad_env, openvino_export):
    settings = load_settings(WorkerSettings, {"model": "hpad-tiny", "random_init": True, "device": "cpu",
                                              "runtime": "openvino", "runtime_model": str(openvino_export),
                                              "laa_radius": 2})
    with pytest.raises(ExportMismatchError, match="laa is") as caught:
        build_scorer(settings, 4, runtime_spec(settings))
    assert caught.value.field == "laa"
    ok = load_settings(WorkerSettings, {"model": "hpad-tiny", "random_init": True, "device": "cpu",
                                        "runtime": "openvino", "runtime_model": str(openvino_export)})
    scorer = build_scorer(ok, 4, runtime_spec(ok))  # its own backbone: releasing its image tower is safe
    assert scorer.runtime.name == "openvino"
    assert scorer.backbone.model.visual.conv1.weight.device.type == "meta"  # torch image tower released
    prompts = scorer.zero_shot_prompts("widget")  # the text tower still works
    assert scorer.score([np.zeros((40, 50, 3), np.uint8)], prompts).pred_score.shape == (1,)
