"""The GPU suite (marker ``gpu``): the paths of ``tests/test_cuda_paths.py`` on a real CUDA device, against
the CPU results, plus what fake tensors cannot run (backward passes, nvJPEG, a worker on the GPU).

Run it with ``pytest -m gpu`` on a machine with a GPU (see ../shared/GPU.md); elsewhere every test is
skipped with the reason. ``HPAD_TEST_GPU_DEVICE=cpu`` runs the same suite on the CPU, which checks the
suite itself (not the GPU) before device time is spent on it.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

DEVICE = os.environ.get("HPAD_TEST_GPU_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason="no CUDA device here: the GPU suite runs where one is (pytest -m gpu)"),
]


def _frames(n: int, shape: tuple[int, ...], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def _objects(n: int, seed: int = 0) -> list[np.ndarray]:
    from tests.synthetic import make_object_image

    rng = np.random.default_rng(seed)
    return [make_object_image(rng, (96, 96))[0] for _ in range(n)]


@pytest.fixture(scope="module")
def gpu_backbone():
    from hpad.backbone import WeightsSpec, load_backbone

    return load_backbone(WeightsSpec(model="hpad-tiny", random_init=True, seed=0), device=DEVICE)


@pytest.fixture(scope="module")
def gpu_scorer(gpu_backbone, tiny_scorer):
    from hpad.scorer import Scorer

    return Scorer(gpu_backbone, tiny_scorer.prompts)


def test_model_is_on_the_device(gpu_scorer):
    assert next(gpu_scorer.backbone.model.parameters()).device.type == torch.device(DEVICE).type
    assert gpu_scorer.prompts.text_features.device.type == torch.device(DEVICE).type


def test_preprocess_matches_the_cpu(gpu_scorer, tiny_scorer):
    frames = _frames(3, (50, 70, 3)) + _frames(1, (64, 64, 3)) + _frames(1, (40, 40))
    gpu = gpu_scorer.preprocess(frames).cpu()
    cpu = tiny_scorer.preprocess(frames)
    # the CPU resizes uint8 and rounds; the GPU resizes float: at most 0.5 / 255 before normalisation
    assert (gpu - cpu).abs().max() < 0.6 / 255 / min(tiny_scorer.backbone.std)


def test_scores_maps_and_masks_match_the_cpu(gpu_scorer, tiny_scorer):
    frames = _frames(4, (90, 120, 3), seed=1) + _frames(2, (64, 64, 3), seed=2)
    gpu, cpu = gpu_scorer.score_batch(frames), tiny_scorer.score_batch(frames)
    np.testing.assert_allclose(gpu.pred_score, cpu.pred_score, atol=1e-3)
    for g, c in zip(gpu.anomaly_maps(), cpu.anomaly_maps(), strict=True):
        assert g.shape == c.shape and np.abs(g - c).max() < 1e-2
    threshold = float(np.median(np.concatenate([m.ravel() for m in cpu.anomaly_maps()])))
    gpu_masks, cpu_masks = gpu.masks(range(6), threshold), cpu.masks(range(6), threshold)
    for index in range(6):
        disagree = np.mean(gpu_masks[index].unpack() != cpu_masks[index].unpack())
        assert disagree < 0.02, (index, disagree)  # only pixels within float error of the threshold


def test_tiled_frames_with_roi_match_the_cpu(gpu_scorer, tiny_scorer):
    """ROI + tiles: crops, one encoder pass, blend and full-size masks on the device; a frame decoded there
    (uint8 [3, H, W] on the device, as nvJPEG returns it) tiles like the host array."""
    from hpad.tiled_scoring import score_frames
    from hpad.tiling import OFF, Box, TileSpec, plan_tiles

    frames = _frames(2, (300, 400, 3), seed=3)
    size = gpu_scorer.backbone.image_size
    plans = [plan_tiles((300, 400), size, TileSpec("grid", 3, 2, 0.25), None, OFF),
             plan_tiles((300, 400), size, TileSpec("grid", 2, 2, 0.1), Box(20, 10, 300, 250), OFF)]
    on_device = torch.from_numpy(frames[1]).permute(2, 0, 1).contiguous().to(gpu_scorer.backbone.device)
    gpu = score_frames(gpu_scorer, [frames[0], on_device], plans=plans)
    cpu = score_frames(tiny_scorer, frames, plans=plans)
    assert gpu.tiles == cpu.tiles == [6, 4]
    assert all(m.device.type == torch.device(DEVICE).type for m in gpu.maps)
    np.testing.assert_allclose(gpu.pred_score, cpu.pred_score, atol=1e-3)
    for g, c in zip(gpu.anomaly_maps(), cpu.anomaly_maps(), strict=True):
        assert g.shape == c.shape == (300, 400) and np.abs(g - c).max() < 1e-2
    assert np.all(gpu.anomaly_maps()[1][:10] == 0)  # outside the ROI
    threshold = float(np.median(cpu.anomaly_maps()[0]))
    gpu_masks, cpu_masks = gpu.masks([0, 1], threshold), cpu.masks([0, 1], threshold)
    for index in (0, 1):
        assert np.mean(gpu_masks[index].unpack() != cpu_masks[index].unpack()) < 0.02


def test_few_shot_memory_on_the_device(gpu_scorer, tiny_scorer):
    references = _objects(2)
    memory = gpu_scorer.build_memory(references)
    assert memory.device.type == "cpu"
    np.testing.assert_allclose(memory.numpy(), tiny_scorer.build_memory(references).numpy(), atol=1e-3)
    prompts = gpu_scorer.prompts.with_memory(memory)
    frames = _objects(3, seed=5)
    np.testing.assert_allclose(gpu_scorer.score(frames, prompts).pred_score,
                               tiny_scorer.score(frames, prompts).pred_score, atol=1e-3)


def test_oagm_regions_and_synthesis_on_the_device(gpu_scorer, tiny_scorer):
    from hpad.oagm import OAGMConfig, cls_attention, feature_saliency, object_masks

    frames = _objects(3, seed=7)
    tokens = gpu_scorer.encode(frames)
    np.testing.assert_allclose(feature_saliency(tokens.patches, gpu_scorer.backbone.grid_size),
                               feature_saliency(tiny_scorer.encode(frames).patches, tiny_scorer.backbone.grid_size),
                               atol=1e-3)
    assert cls_attention(gpu_scorer, frames).shape == (3, *gpu_scorer.backbone.grid_size)
    regions = object_masks(gpu_scorer, frames, OAGMConfig())
    assert [r.mask.shape for r in regions] == [f.shape[:2] for f in frames]


def test_mpts_training_and_calibration_on_the_device(gpu_scorer):
    from hpad.mpts import TrainConfig, train_prompts

    config = TrainConfig(epochs=3, steps_per_epoch=2, batch_size=8, train_normals=6, train_anomalies=8,
                         val_normals=4, val_anomalies=4, n_ctx=4)
    result = train_prompts(gpu_scorer, _objects(2), "widget", config)
    assert len(result.history) >= 1 and all(math.isfinite(r["loss"]) for r in result.history)
    assert result.prompts.text_features.device.type == "cpu" and result.ctx.device.type == "cpu"
    assert 0.0 <= result.prompts.threshold <= 1.0
    assert gpu_scorer.score(_objects(1, seed=9), result.prompts).pred_score.shape == (1,)


def test_tuner_run_on_the_device(gpu_scorer):
    from hpad.mpts import TrainConfig
    from tuner.job import TuneConfig, encode_labelled, tune_category

    train = TrainConfig(epochs=2, steps_per_epoch=2, batch_size=8, train_normals=4, train_anomalies=6,
                        val_normals=2, val_anomalies=4, n_ctx=4)
    config = TuneConfig(shots=2, min_normals=6, gate_normals=2, gate_anomalies=4, margin=0.05, train=train)
    labelled = encode_labelled(gpu_scorer, _objects(1, seed=3), [np.ones((96, 96), bool)])
    outcome = tune_category(gpu_scorer, "widget", _objects(8, seed=11), gpu_scorer.prompts, config,
                            labelled=labelled, seed=1)
    assert set(outcome.decision.candidate.to_json()) == {"image_AUROC", "pixel_AUROC"}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precisions_score(precision):
    from hpad.backbone import WeightsSpec, load_backbone
    from hpad.errors import ConfigError
    from hpad.scorer import Scorer

    try:
        backbone = load_backbone(WeightsSpec(model="hpad-tiny", random_init=True), device=DEVICE, precision=precision)
    except ConfigError:
        assert DEVICE == "cpu" and precision == "fp16"  # fp16 is refused on the CPU, by design
        return
    result = Scorer.zero_shot(backbone, "widget").score(_frames(4, (80, 100, 3)))
    assert np.isfinite(result.pred_score).all() and all(np.isfinite(m).all() for m in result.anomaly_map)


def test_jpeg_batch_decode_on_the_device():
    import cv2

    from consumers.decode import decode_jpeg_batch

    pictures = _frames(3, (90, 120, 3), seed=4)
    data = [cv2.imencode(".jpg", p, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for p in pictures]
    decoded = decode_jpeg_batch([*data, data[0][:150]], [(120, 90)] * 4, torch.device(DEVICE))
    for image, raw in zip(decoded[:3], data, strict=True):
        assert isinstance(image, torch.Tensor) and image.device.type == torch.device(DEVICE).type
        host = cv2.cvtColor(cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert np.abs(image.permute(1, 2, 0).cpu().numpy().astype(int) - host.astype(int)).mean() < 2.0
    assert not isinstance(decoded[3], torch.Tensor) and decoded[3].reason == "undecodable"


@pytest.mark.kafka
@pytest.mark.parametrize("gpu_decode", [False, True])
def test_worker_on_the_device_n_in_n_out(kafka_broker, gpu_scorer, gpu_decode):
    from consumers.models import model_info
    from consumers.prompt_provider import StaticPromptProvider
    from consumers.worker import Worker
    from tests.consumers.kafka_helpers import (
        events_by_frame,
        good_frame,
        new_topics,
        publish,
        read_all,
        settings,
    )

    topics = new_topics(kafka_broker, partitions=2)
    rng = np.random.default_rng(12)
    frames = [good_frame(rng, size=(200, 260), ext=(".jpg", ".png")[i % 2]) for i in range(24)]
    frames.append(good_frame(rng, size=(200, 260), ext=".jpg"))
    frames[-1].value = frames[-1].value[:300]  # a corrupt JPEG: a dead letter, never a crash
    publish(kafka_broker, topics.frames, frames)
    s = settings(kafka_broker, topics, device=DEVICE, mask_policy="always", gpu_decode=gpu_decode, max_batch_size=8)
    worker = Worker(s, gpu_scorer, StaticPromptProvider.build(gpu_scorer, s.categories),
                    model_info(gpu_scorer, s.precision))
    result = worker.run(max_frames=len(frames), timeout=120, install_signals=False)
    assert result.exit_code == 0 and result.completed == len(frames)
    events = events_by_frame(read_all(kafka_broker, topics.events, expected=len(frames) - 1))
    assert set(events) == {f.frame_id for f in frames[:-1]}
    assert all(len(v) == 1 and v[0]["mask"]["width"] == 260 for v in events.values())
    assert len(read_all(kafka_broker, topics.dlq, expected=1)) == 1
