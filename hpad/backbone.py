"""CLIP backbone loading: open_clip pretrained tags, local checkpoints, or explicit random initialisation.

Three ways to get weights, chosen by `WeightsSpec`:

* ``pretrained="laion400m_e32"`` - an open_clip pretrained tag, looked up in ``cache_dir``. Downloads happen
  only when ``allow_download`` is true; otherwise the lookup is local-only and a missing file fails in
  milliseconds with a `WeightsNotFoundError` that names the file, the folder and the settings to change.
* ``checkpoint=Path(...)`` - a local ``.safetensors`` / ``.pt`` / ``.bin`` file (air-gapped plants). ``.pt``
  files are read with ``torch.load(weights_only=True)``: nothing is unpickled.
* ``random_init=True`` - random weights, for tests and benchmarks. `Backbone.random_weights` is then true and
  every report hpad writes says "random weights".

hpad ships small architectures (``hpad-tiny``, ``hpad-small``) as open_clip JSON configs in
``hpad/model_configs``; they are registered with open_clip on import of this module. The default model and its
default weights tag (`DEFAULT_MODEL`, `default_pretrained_tag`) live in the import-light `hpad.defaults`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model

from hpad.defaults import DEFAULT_MODEL as DEFAULT_MODEL  # re-exported: the default model and its weights tag
from hpad.defaults import default_pretrained_tag as default_pretrained_tag
from hpad.errors import ConfigError, WeightsNotFoundError

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

RANDOM_WEIGHTS_ID = "random-init"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_LOGIT_SCALE = 100.0  # CLIP clamps its learned temperature here


@dataclass(frozen=True)
class WeightsSpec:
    """Which architecture and which weights to load. Exactly one weights source must be chosen."""

    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    checkpoint: Path | None = None
    random_init: bool = False
    cache_dir: Path | None = None
    allow_download: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        chosen = [self.pretrained is not None, self.checkpoint is not None, self.random_init]
        if sum(chosen) != 1:
            raise ConfigError(
                "choose exactly one weights source: a pretrained tag (--pretrained TAG), a local checkpoint "
                f"(--checkpoint FILE) or --random-init; got pretrained={self.pretrained!r}, "
                f"checkpoint={self.checkpoint!r}, random_init={self.random_init}"
            )


@dataclass
class Backbone:
    """A loaded, frozen CLIP model plus what scoring needs to know about it."""

    model: torch.nn.Module
    tokenizer: object
    model_name: str
    weights_id: str  # pretrained tag, "sha256:<hex>" of a checkpoint, or "random-init"
    device: torch.device
    dtype: torch.dtype
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int
    logit_scale: float = 100.0  # CLIP's learned temperature, read once at load (no device sync per batch)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def random_weights(self) -> bool:
        return self.weights_id == RANDOM_WEIGHTS_ID

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def identity(self) -> str:
        """Model + weights identity, e.g. ``ViT-B-16-plus-240/laion400m_e32``; artifacts must match it."""
        return f"{self.model_name}/{self.weights_id}"

    @property
    def weights_label(self) -> str:
        """What every report prints about the weights."""
        return "random weights (not pretrained: scores carry no meaning)" if self.random_weights else self.weights_id


def available_models() -> list[str]:
    return open_clip.list_models()


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` -> cuda when present, else cpu."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but no CUDA device is available; use --device cpu")
    return dev


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Make huggingface_hub local-only for the duration (it otherwise retries the network for ~46 s)."""
    if not offline:
        yield
        return
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE",)}
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hf_constants

        old_flag = hf_constants.HF_HUB_OFFLINE
        hf_constants.HF_HUB_OFFLINE = True
    except (ImportError, AttributeError):  # pragma: no cover - hub is an open_clip dependency
        hf_constants, old_flag = None, None
    try:
        yield
    finally:
        if hf_constants is not None:
            hf_constants.HF_HUB_OFFLINE = old_flag
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs "initialized randomly" on the root logger even when we load weights right after."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _resolve_pretrained_file(spec: WeightsSpec) -> Path:
    """Find (or, when allowed, download) the weights file of an open_clip pretrained tag."""
    assert spec.pretrained is not None
    cfg = get_pretrained_cfg(spec.model, spec.pretrained)
    if not cfg:
        tags = list_pretrained_tags_by_model(spec.model)
        raise ConfigError(
            f"open_clip has no pretrained tag {spec.pretrained!r} for model {spec.model!r}; "
            f"known tags: {', '.join(tags) if tags else 'none (use --checkpoint FILE)'}"
        )
    cache = str(spec.cache_dir) if spec.cache_dir else None
    where = cfg.get("hf_hub") or cfg.get("url")
    try:
        with _hub_offline(not spec.allow_download):
            path = download_pretrained(cfg, cache_dir=cache)
            if not path:
                raise FileNotFoundError(where)
    except Exception as exc:
        raise WeightsNotFoundError(
            f"CLIP weights for {spec.model} / {spec.pretrained} are not available "
            f"(looked in cache dir {cache or '~/.cache/huggingface/hub (default)'}; source {where}). "
            "Either copy the weights file to this machine and pass it with --checkpoint FILE "
            "(HPAD_CHECKPOINT=FILE for the services), or fill the cache dir (--cache-dir DIR / "
            "HPAD_CACHE_DIR) on a machine with internet via `hpad weights fetch --model "
            f"{spec.model} --pretrained {spec.pretrained} --cache-dir DIR`, or allow downloads here with "
            f"--allow-download (HPAD_ALLOW_DOWNLOAD=true). Cause: {type(exc).__name__}: {str(exc)[:300]}"
        ) from exc
    return Path(path)


def _load_checkpoint_into(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise WeightsNotFoundError(
            f"checkpoint file {path} does not exist; pass an open_clip .safetensors/.pt file with "
            "--checkpoint (HPAD_CHECKPOINT for the services), or use --pretrained TAG / --random-init"
        )
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except Exception as exc:
        raise WeightsNotFoundError(
            f"checkpoint {path} could not be loaded into {type(model).__name__}: {type(exc).__name__}: "
            f"{str(exc)[:400]}. Is it an open_clip checkpoint of the same architecture (--model)?"
        ) from exc


def load_backbone(spec: WeightsSpec, device: str | None = None, precision: str = "fp32") -> Backbone:
    """Build the model named in ``spec`` with its weights, frozen, in eval mode, on ``device``."""
    if spec.model not in open_clip.list_models():
        raise ConfigError(
            f"unknown model {spec.model!r}; choose one of open_clip's configs, e.g. ViT-B-16-plus-240, "
            "ViT-B-16, ViT-L-14-336, or hpad's small test models hpad-tiny / hpad-small"
        )
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    dev = resolve_device(device)
    if precision == "fp16" and dev.type == "cpu":
        raise ConfigError("fp16 is for GPUs; on CPU use --precision bf16 (about 2x faster than fp32) or fp32")

    weights_file: Path | None = None
    if spec.pretrained is not None:
        weights_file = _resolve_pretrained_file(spec)
        weights_id = spec.pretrained
    elif spec.checkpoint is not None:
        weights_file = Path(spec.checkpoint)
        weights_id = "sha256:" + file_sha256(weights_file) if weights_file.is_file() else "missing"
    else:
        weights_id = RANDOM_WEIGHTS_ID

    with torch.random.fork_rng(devices=[]), _quiet_open_clip():
        torch.manual_seed(spec.seed)  # random init is reproducible and leaves the caller's RNG alone
        model = open_clip.create_model(spec.model, pretrained=None, load_weights=False, device="cpu")
    if weights_file is not None:
        _load_checkpoint_into(model, weights_file)
    model.eval().requires_grad_(False)
    logit_scale = float(model.logit_scale.detach().float().exp().clamp(max=MAX_LOGIT_SCALE))
    dtype = PRECISIONS[precision]
    model.to(device=dev, dtype=dtype)

    visual = model.visual
    if not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
        raise ConfigError(f"model {spec.model!r} has no ViT image tower; hpad needs a ViT-based CLIP model")
    pp = open_clip.get_model_preprocess_cfg(model)
    if spec.pretrained is not None:
        tag_cfg = get_pretrained_cfg(spec.model, spec.pretrained)
        pp = {**pp, **{k: tag_cfg[k] for k in ("mean", "std") if k in tag_cfg}}
    tokenizer = open_clip.get_tokenizer(spec.model)
    backbone = Backbone(
        model=model,
        tokenizer=tokenizer,
        model_name=spec.model,
        weights_id=weights_id,
        device=dev,
        dtype=dtype,
        image_size=tuple(visual.image_size),
        patch_size=tuple(visual.patch_size),
        mean=tuple(float(v) for v in pp["mean"]),
        std=tuple(float(v) for v in pp["std"]),
        embed_dim=int(visual.output_dim),
        logit_scale=logit_scale,
    )
    if backbone.random_weights:
        log.warning("model %s uses RANDOM weights: scores carry no meaning", spec.model)
    return backbone


def save_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """Write a model's weights as safetensors (used to make local-checkpoint fixtures and exports)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return path
