"""The model factory of every process that loads CLIP (``hpad serve``, ``hpad tune``): settings -> `Scorer`.

Scorers and tuner must load the very same model (prompt artifacts name their model and scorers refuse
artifacts of another one), so both build it here from their `consumers.settings.ModelSettings`.
"""

from __future__ import annotations

import logging

import torch

from consumers.events import ModelInfo
from consumers.settings import ModelSettings, WorkerSettings
from hpad.backbone import load_backbone
from hpad.config import scorer_config, weights_spec
from hpad.runtime import RuntimeSpec, load_runtime
from hpad.scorer import Scorer, encoder_spec

log = logging.getLogger(__name__)


def runtime_spec(settings: WorkerSettings) -> RuntimeSpec:
    """The image-tower runtime of ``hpad serve`` (HPAD_RUNTIME, HPAD_RUNTIME_MODEL, ...)."""
    return RuntimeSpec(kind=settings.runtime, model_dir=settings.runtime_model, precision=settings.runtime_precision,
                       threads=settings.runtime_threads)


def build_scorer(settings: ModelSettings, max_batch: int = 8, runtime: RuntimeSpec | None = None) -> Scorer:
    """The model named by the settings, wrapped in a Scorer with the settings' LAA, sigma and batch size.

    ``runtime``: an exported image-tower runtime (`hpad.runtime`) instead of torch eager; the export is checked
    against the loaded model and LAA settings, then the torch image tower's weights are released (the text
    tower stays for zero-shot prompts)."""
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    spec = weights_spec(
        model=settings.model, pretrained=settings.pretrained, checkpoint=settings.checkpoint,
        random_init=settings.random_init, cache_dir=settings.cache_dir, allow_download=settings.allow_download,
        seed=settings.seed,
    )
    exported = runtime is not None and runtime.kind != "torch"
    backbone = load_backbone(spec, device="cpu" if exported else settings.device, precision=settings.precision)
    config = scorer_config(
        laa=settings.laa, laa_layers=settings.laa_layers, laa_radius=settings.laa_radius, sigma=settings.sigma,
        max_batch=max_batch, dual_path=settings.laa_dual_path, kernel=settings.laa_kernel,
        patch_mlp=settings.laa_patch_mlp, memory_blocks=settings.memory_blocks, memory_path=settings.memory_path,
        fusion=settings.fusion, logit_scale=settings.logit_scale)
    if not exported:
        return Scorer(backbone, config=config)
    assert runtime is not None
    encoder = load_runtime(runtime, backbone, encoder_spec(backbone, config), release_tower=True)
    log.info("image tower runs on %s", encoder.describe())
    return Scorer(backbone, config=config, runtime=encoder)


def model_info(scorer: Scorer, precision: str) -> ModelInfo:
    """What events and metrics say about the model in use."""
    b = scorer.backbone
    return ModelInfo(model=b.model_name, weights=b.weights_id, identity=b.identity, random_weights=b.random_weights,
                     device=str(b.device), precision=precision)
