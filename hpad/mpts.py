"""MPTS: the Meta-Guiding Prompt-Tuning Scheme that learns the normal/anomalous prompts from normals alone.

Chen et al. 2024. The training set is k normal images, augmented views of them, and OAGM anomalies
synthesised on the object (`hpad.oagm`) with their exact pixel masks. Only the context vectors of the
`PromptLearner` are trained; CLIP stays frozen.

* Task loss: image-level cross-entropy of the class-token score against the (normal, anomalous) pair, plus
  pixel-level focal + dice of the patch map (upsampled to the model's input size) against the masks.
* Meta guidance: hand-written meta prompts ("a photo of a flawless {object}" / "a photo of a damaged
  {object}" ensembles) give a fixed prediction on the same batch; the guidance loss is the KL divergence
  from the meta prediction to the learnable one (image level and patch level). Its gradient ``g_m`` steers
  the task gradient ``g``: when they conflict (<g, g_m> < 0) the conflicting component is removed,
  ``g <- g - lam * <g, g_m> / ||g_m||^2 * g_m`` (ProGrad-style; lam = 1 removes it fully). This keeps the
  prompts from overfitting to the synthetic anomalies.

Cost: the image tower is frozen, so the whole pool is encoded once (with LAA) and each step runs only the
text tower for two short sequences (see `PromptLearner`), forward and backward.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from hpad.attention import ImageTokens
from hpad.calibration import Calibration, calibrate_thresholds
from hpad.errors import ConfigError
from hpad.metrics import PoolMetrics, image_auroc, pixel_auroc
from hpad.oagm import OAGMConfig, ObjectRegion, object_masks, synthesize
from hpad.prompts import PromptLearner, PromptSet, zero_shot_text_features
from hpad.scorer import Scorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (stored in the prompt artifact)."""

    n_ctx: int = 8
    class_name: str | None = None  # None: the category name; "": no class token at all
    epochs: int = 40
    steps_per_epoch: int = 8
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    seed: int = 0
    train_normals: int = 32  # augmented normal views in the training pool
    train_anomalies: int = 48  # OAGM anomalies in the training pool
    val_normals: int = 16
    val_anomalies: int = 16
    mpts: bool = True
    lam: float = 1.0
    pixel_weight: float = 1.0
    focal_gamma: float = 2.0
    patience: int = 8  # epochs without validation improvement before stopping
    min_delta: float = 1e-4
    memory: bool = True  # store the k normals' patch features as few-shot memory
    threshold_rule: str = "f1"  # "f1": F1-max on validation; "quantile": normal-score quantile
    normal_quantile: float = 0.99
    oagm: OAGMConfig = field(default_factory=OAGMConfig)

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "steps_per_epoch": self.steps_per_epoch >= 1,
            "batch_size": self.batch_size >= 2,
            "lr": self.lr > 0 and math.isfinite(self.lr),
            "lam": 0.0 <= self.lam <= 1.0,
            "optimizer": self.optimizer in ("adamw", "sgd"),
            "threshold_rule": self.threshold_rule in ("f1", "quantile"),
            "normal_quantile": 0.5 <= self.normal_quantile < 1.0,
            "train_anomalies": self.train_anomalies >= 1 and self.val_anomalies >= 1,
            "train_normals": self.train_normals >= 1 and self.val_normals >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"invalid training settings: {', '.join(bad)} ({self.describe()})")

    def describe(self) -> dict[str, object]:
        data = asdict(self)
        data["oagm"] = self.oagm.describe() if hasattr(self.oagm, "describe") else asdict(self.oagm)
        return data


@dataclass
class Pool:
    """Encoded training or validation examples. masks: [P, S, S] float in {0, 1} at model input size."""

    tokens: ImageTokens
    labels: torch.Tensor  # [P] long: 0 normal, 1 anomalous
    masks: torch.Tensor
    generators: list[str]

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, index: torch.Tensor) -> Pool:
        tokens = ImageTokens(cls=self.tokens.cls[index], patches=self.tokens.patches[index])
        return Pool(tokens, self.labels[index], self.masks[index], [self.generators[i] for i in index.tolist()])


@dataclass(frozen=True)
class TrainMetrics:
    """What a training run achieved on its validation pool, before and after training, and its calibration."""

    val_before: PoolMetrics
    val_after: PoolMetrics
    epochs_run: int
    train_seconds: float
    calibration: Calibration

    def to_json(self) -> dict[str, object]:
        return {"val_before": self.val_before.to_json(), "val_after": self.val_after.to_json(),
                "epochs_run": self.epochs_run, "train_seconds": self.train_seconds,
                "calibration": self.calibration.to_json()}


@dataclass
class TrainResult:
    prompts: PromptSet
    initial_prompts: PromptSet  # before the first step (random or warm-start context)
    ctx: torch.Tensor  # [2, n_ctx, W] learned context (warm-start state)
    history: list[dict[str, float]]
    metrics: TrainMetrics
    regions: list[ObjectRegion]
    config: TrainConfig


# ------------------------------------------------------------------------------------------ pure functions


def project_conflicting(g: torch.Tensor, g_meta: torch.Tensor, lam: float = 1.0, eps: float = 1e-12) -> torch.Tensor:
    """ProGrad-style guidance on flattened gradients.

    If <g, g_meta> < 0 the component of g along g_meta is removed (scaled by lam); otherwise g is returned
    unchanged. With lam = 1 the result is orthogonal to g_meta in the conflicting case.
    """
    dot = torch.dot(g.reshape(-1), g_meta.reshape(-1)).clamp(max=0.0)  # 0 when they agree: g unchanged
    # branch-free, so a training step never waits on the device to decide
    return g - (lam * dot / (g_meta.pow(2).sum() + eps)) * g_meta


def class_logits(features: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """features [..., D] (any norm), text [2, D] normalised -> logits [..., 2]."""
    return scale * F.normalize(features, dim=-1) @ text.T


def focal_loss(prob: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """Binary focal loss on probabilities (mean over pixels)."""
    prob = prob.clamp(eps, 1 - eps)
    pt = torch.where(target > 0.5, prob, 1 - prob)
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft dice on [B, H, W] over the whole batch (normal images contribute false positives only)."""
    inter = (prob * target).sum()
    return 1 - (2 * inter + eps) / (prob.sum() + target.sum() + eps)


def patch_probability_maps(patches: torch.Tensor, text: torch.Tensor, scale: float,
                           grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """patches [B, N, D] -> P(anomalous) maps [B, S, S] (bilinear from the patch grid)."""
    prob = class_logits(patches, text, scale).softmax(dim=-1)[..., 1]  # [B, N]
    maps = prob.reshape(-1, 1, grid[0], grid[1])
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0]


def task_loss(pool: Pool, text: torch.Tensor, scale: float, grid: tuple[int, int], size: tuple[int, int],
              pixel_weight: float, gamma: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Image cross-entropy + pixel focal and dice; the parts come back detached, on the device."""
    image_ce = F.cross_entropy(class_logits(pool.tokens.cls, text, scale), pool.labels)
    maps = patch_probability_maps(pool.tokens.patches, text, scale, grid, size)
    focal = focal_loss(maps, pool.masks, gamma)
    dice = dice_loss(maps, pool.masks)
    loss = image_ce + pixel_weight * (focal + dice)
    return loss, {"image_ce": image_ce.detach(), "focal": focal.detach(), "dice": dice.detach()}


def guidance_loss(pool: Pool, text: torch.Tensor, meta_text: torch.Tensor, scale: float) -> torch.Tensor:
    """KL(meta || learnable) of the class distributions, image level + patch level."""
    def kl(features: torch.Tensor) -> torch.Tensor:
        log_p = class_logits(features, text, scale).log_softmax(dim=-1)
        q = class_logits(features, meta_text, scale).softmax(dim=-1)
        return F.kl_div(log_p.reshape(-1, 2), q.reshape(-1, 2), reduction="batchmean")

    return kl(pool.tokens.cls) + kl(pool.tokens.patches)


# ------------------------------------------------------------------------------------------ data


def augment_view(rng: np.random.Generator, image: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A random flip/rot90 plus mild brightness/contrast jitter, applied to image and region together."""
    k = int(rng.integers(0, 4))
    flip = bool(rng.integers(0, 2))
    out, reg = np.rot90(image, k), np.rot90(region, k)
    if flip:
        out, reg = out[:, ::-1], reg[:, ::-1]
    gain, bias = rng.uniform(0.9, 1.1), rng.uniform(-10, 10)
    out = np.clip(out.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out), np.ascontiguousarray(reg)


def _mask_to_model(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.interpolate(tensor, size=size, mode="area")[0, 0] > 0.5).float()


def build_pool(scorer: Scorer, rng: np.random.Generator, normals: Sequence[np.ndarray],
               regions: Sequence[ObjectRegion], n_normal: int, n_anomalous: int, oagm: OAGMConfig,
               extra_normals: Sequence[np.ndarray] = ()) -> Pool:
    """Augmented normal views + OAGM anomalies (each from an augmented view), encoded once."""
    size = scorer.backbone.image_size
    images: list[np.ndarray] = list(extra_normals)
    masks: list[torch.Tensor] = [torch.zeros(size) for _ in extra_normals]  # built on the host, moved once
    generators = ["normal"] * len(extra_normals)
    for i in range(n_normal + n_anomalous):
        source = i % len(normals)
        view, region = augment_view(rng, normals[source], regions[source].mask)
        if i < n_normal:
            images.append(view)
            masks.append(torch.zeros(size))
            generators.append("normal")
        else:
            synthetic = synthesize(rng, view, region, oagm)
            images.append(synthetic.image)
            masks.append(_mask_to_model(synthetic.mask, size))
            generators.append(synthetic.generator)
    labels = torch.tensor([0 if g == "normal" else 1 for g in generators], dtype=torch.long)
    return pool_on_device(scorer, images, labels, torch.stack(masks), generators)


def pool_on_device(scorer: Scorer, images: Sequence[np.ndarray], labels: torch.Tensor, masks: torch.Tensor,
                   generators: list[str]) -> Pool:
    """Encode ``images`` and keep labels and masks beside the tokens, on the scorer's device."""
    dev = scorer.backbone.device
    return Pool(scorer.encode(list(images)), labels.to(dev), masks.to(dev), generators)


# ------------------------------------------------------------------------------------------ training


def meta_text_features(scorer: Scorer, object_name: str) -> torch.Tensor:
    """Frozen embeddings of the hand-written meta prompts (the zero-shot pair): [2, D] (used only to guide
    gradients)."""
    model, tokenizer = scorer.backbone.model, scorer.backbone.tokenizer
    return zero_shot_text_features(model, tokenizer, object_name).to(scorer.backbone.device)


def _optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def step_losses(learner: PromptLearner, batch: Pool, meta_text: torch.Tensor, scorer: Scorer,
                config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """Forward half of a step: (task loss, guidance loss or None without MPTS, detached parts on the device)."""
    backbone = scorer.backbone
    text = learner()
    loss, parts = task_loss(batch, text, scorer.logit_scale, backbone.grid_size, backbone.image_size,
                            config.pixel_weight, config.focal_gamma)
    guide = guidance_loss(batch, text, meta_text, scorer.logit_scale) if config.mpts else None
    return loss, guide, parts


def apply_guided_step(optimizer: torch.optim.Optimizer, ctx: torch.nn.Parameter, g_task: torch.Tensor,
                      g_meta: torch.Tensor, lam: float) -> torch.Tensor:
    """Set ``ctx.grad`` to the task gradient with its conflict with the meta gradient removed, step; returns
    1.0 where they conflicted (a device tensor: nothing waits on the device)."""
    conflict = (torch.dot(g_task.reshape(-1), g_meta.reshape(-1)) < 0).float()
    ctx.grad = project_conflicting(g_task, g_meta, lam)
    optimizer.step()
    return conflict


def _step(learner: PromptLearner, optimizer: torch.optim.Optimizer, batch: Pool, meta_text: torch.Tensor,
          scorer: Scorer, config: TrainConfig) -> dict[str, torch.Tensor]:
    """One optimiser step; returns the detached loss parts on the device (read once per epoch, not per step)."""
    loss, guide, parts = step_losses(learner, batch, meta_text, scorer, config)
    optimizer.zero_grad(set_to_none=True)
    if guide is not None:
        g_task, = torch.autograd.grad(loss, learner.ctx, retain_graph=True)
        g_meta, = torch.autograd.grad(guide, learner.ctx)
        conflict = apply_guided_step(optimizer, learner.ctx, g_task, g_meta, config.lam)
        parts.update(guidance=guide.detach(), conflict=conflict)
    else:
        loss.backward()
        optimizer.step()
    return {"loss": loss.detach(), **parts}


@torch.no_grad()
def evaluate_pool(scorer: Scorer, pool: Pool, prompts: PromptSet, config: TrainConfig | None = None) -> PoolMetrics:
    """Task loss, image AUROC and pixel AUROC of a prompt set's text pair on an encoded pool (no memory)."""
    config = config or TrainConfig()
    text = prompts.text_features.to(scorer.backbone.device)
    grid, size = scorer.backbone.grid_size, scorer.backbone.image_size
    loss, _ = task_loss(pool, text, scorer.logit_scale, grid, size, config.pixel_weight, config.focal_gamma)
    scores = class_logits(pool.tokens.cls, text, scorer.logit_scale).softmax(dim=-1)[:, 1]
    maps = patch_probability_maps(pool.tokens.patches, text, scorer.logit_scale, grid, size)
    return PoolMetrics(
        image_AUROC=image_auroc(pool.labels.cpu().numpy(), scores.cpu().numpy()),
        pixel_AUROC=pixel_auroc(pool.masks.cpu().numpy() > 0.5, maps.cpu().numpy()),
        loss=loss.item(),
    )


def train_prompts(
    scorer: Scorer,
    normals: Sequence[np.ndarray],
    category: str,
    config: TrainConfig,
    init_ctx: torch.Tensor | None = None,
    val_normals: Sequence[np.ndarray] = (),
    progress: Callable[[int, dict[str, float]], None] | None = None,
    memory_frames: Sequence[np.ndarray] | None = None,
) -> TrainResult:
    """Learn a prompt set for ``category`` from ``normals`` (k images). Deterministic for ``config.seed``.

    ``init_ctx`` warm-starts from earlier prompts; ``val_normals`` are real held-out normals (the tuner has
    them); without them validation normals are augmented views of the k shots. ``memory_frames`` (default:
    ``normals``) become the few-shot memory when ``config.memory`` is on.
    """
    if not normals:
        raise ConfigError("training needs at least one normal image")
    started = time.monotonic()
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    backbone = scorer.backbone
    regions = object_masks(scorer, normals, config.oagm)
    train_pool = build_pool(scorer, rng, normals, regions, config.train_normals, config.train_anomalies, config.oagm)
    val_pool = build_pool(scorer, np.random.default_rng(config.seed + 1_000_003), normals, regions,
                          max(0, config.val_normals - len(val_normals)), config.val_anomalies, config.oagm,
                          extra_normals=val_normals)
    class_name = category if config.class_name is None else config.class_name
    object_name = (class_name or category).replace("_", " ")
    meta_text = meta_text_features(scorer, object_name)
    learner = PromptLearner(backbone.model, backbone.tokenizer, config.n_ctx, class_name, init=init_ctx,
                            generator=generator)
    optimizer = _optimizer(config, [learner.ctx])

    def snapshot() -> PromptSet:
        return learner.prompt_set(category, backbone.identity, laa=scorer.config.laa)

    initial = snapshot()
    before = evaluate_pool(scorer, val_pool, initial, config)
    best = (before.loss, learner.ctx.detach().clone())
    history: list[dict[str, float]] = []
    stale = 0
    for epoch in range(config.epochs):
        sums: dict[str, torch.Tensor] = {}
        for _ in range(config.steps_per_epoch):
            index = torch.randperm(len(train_pool), generator=generator)[: config.batch_size]
            for key, value in _step(learner, optimizer, train_pool.subset(index), meta_text, scorer, config).items():
                sums[key] = sums[key] + value if key in sums else value
        totals = {key: float(value) / config.steps_per_epoch for key, value in sums.items()}  # one sync an epoch
        val = evaluate_pool(scorer, val_pool, snapshot(), config)
        record = {"epoch": float(epoch), **totals, "val_loss": val.loss, "val_image_AUROC": val.image_AUROC}
        history.append(record)
        if progress is not None:
            progress(epoch, record)
        if not math.isfinite(record["loss"]):
            raise ConfigError(f"training diverged at epoch {epoch} (loss {record['loss']}); lower --lr")
        if val.loss < best[0] - config.min_delta:
            best, stale = (val.loss, learner.ctx.detach().clone()), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    with torch.no_grad():
        learner.ctx.copy_(best[1])
    prompts = snapshot()
    memory = scorer.build_memory(list(memory_frames or normals)) if config.memory else None
    prompts = prompts.with_memory(memory)
    after = evaluate_pool(scorer, val_pool, prompts, config)
    calibration = calibrate_on_pool(scorer, val_pool, prompts, config)
    prompts = replace(prompts, threshold=calibration.threshold, pixel_threshold=calibration.pixel_threshold)
    metrics = TrainMetrics(val_before=before, val_after=after, epochs_run=len(history),
                           train_seconds=time.monotonic() - started, calibration=calibration)
    return TrainResult(prompts, initial, best[1].cpu(), history, metrics, list(regions), config)


def score_pool(scorer: Scorer, pool: Pool, prompts: PromptSet) -> tuple[np.ndarray, np.ndarray]:
    """Score an encoded pool exactly as the service scores (memory included): ([P] scores, [P, S, S] maps)."""
    size = scorer.backbone.image_size
    result = scorer.score_tokens(pool.tokens, [size] * len(pool), scorer.check_prompts(prompts))
    return result.pred_score, np.stack(result.anomaly_map)


def evaluate_as_served(scorer: Scorer, pool: Pool, prompts: PromptSet) -> PoolMetrics:
    """Image and pixel AUROC of a prompt set on a pool, scored as the service scores (the tuner's gate)."""
    scores, maps = score_pool(scorer, pool, prompts)
    return PoolMetrics(
        image_AUROC=image_auroc(pool.labels.cpu().numpy(), scores),
        pixel_AUROC=pixel_auroc(pool.masks.cpu().numpy() > 0.5, maps),
    )


def calibrate_on_pool(scorer: Scorer, pool: Pool, prompts: PromptSet, config: TrainConfig) -> Calibration:
    """Decision thresholds from the validation pool scored exactly as the service scores (memory included)."""
    scores, maps = score_pool(scorer, pool, prompts)
    return calibrate_thresholds(
        labels=pool.labels.cpu().numpy(),
        scores=scores,
        masks=pool.masks.cpu().numpy() > 0.5,
        maps=maps,
        rule=config.threshold_rule,
        normal_quantile=config.normal_quantile,
    )
