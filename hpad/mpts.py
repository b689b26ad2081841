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

Reference choices (issue 17, each a `TrainConfig` field; legacy values in brackets):

* ``optimizer="sgd"`` with ``schedule="cosine"`` [adamw, constant]: ProGrad's optimiser (SGD, momentum 0.9,
  weight decay 5e-4, lr 0.002, cosine annealing per epoch after ``warmup_epochs`` at the constant
  ``warmup_lr`` 1e-5). The projection argument (the applied update never increases the guidance loss to
  first order) holds for the gradient SGD applies; Adam rescales each coordinate and can break it.
* ``selection="served"`` [loss]: the kept context is the epoch's with the best selection score on the
  validation pool scored as the service scores (memory and fusion included):
  ``image AUROC(held-out normals vs fresh synthetic anomalies) - FPR of the normals at 90 % recall`` (see
  `selection_score`). The loss on synthetic anomalies rewards exactly the fit MPTS exists to prevent.
* ``orientation="auto"`` [on]: flip / rot90 augmentation only for textures (OAGM found no object); an object
  flipped or rotated (MVTec metal_nut "flip") may be a defect.
* Memory and validation are disjoint: the few-shot memory is the k shots, and every validation image that
  derives from a shot is scored against the memory of the *other* shots (leave-one-out); real held-out
  normals (the tuner's) are scored against the whole memory. With k = 1 and no held-out normals no disjoint
  memory exists: the item is scored against its own shot and the calibration says ``memory_holdout:
  "none"`` (thresholds then come out low).
* Synthetic masks are shrunk to the model size by max-pooling (a cell is anomalous if any pixel is), so a
  one-pixel scratch survives; an anomaly whose mask is empty anyway is dropped and counted.
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
from hpad.scorer import FusionScales, Scorer, anomaly_probability, memory_distance, normal_scale, patch_maps

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
    weight_decay: float | None = None  # None: 5e-4 for SGD (ProGrad), 0 for AdamW
    optimizer: str = "sgd"
    momentum: float = 0.9
    schedule: str = "cosine"  # "cosine" (ProGrad) or "constant"
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    selection: str = "served"  # "served" (FPR + separation, as served) or "loss" (validation task loss)
    orientation: str = "auto"  # flip/rot90 views: "auto" (textures only), "on", "off"
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
            "schedule": self.schedule in ("cosine", "constant"),
            "selection": self.selection in ("served", "loss"),
            "orientation": self.orientation in ("auto", "on", "off"),
            "warmup_epochs": self.warmup_epochs >= 0,
            "warmup_lr": self.warmup_lr > 0,
            "momentum": 0.0 <= self.momentum < 1.0,
            "weight_decay": self.weight_decay is None or self.weight_decay >= 0,
            "threshold_rule": self.threshold_rule in ("f1", "quantile"),
            "normal_quantile": 0.5 <= self.normal_quantile < 1.0,
            "train_anomalies": self.train_anomalies >= 1 and self.val_anomalies >= 1,
            "train_normals": self.train_normals >= 1 and self.val_normals >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"invalid training settings: {', '.join(bad)} ({self.describe()})")

    @property
    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 5e-4 if self.optimizer == "sgd" else 0.0

    def lr_at(self, epoch: int) -> float:
        """The learning rate of ``epoch`` (from 0): warm-up at ``warmup_lr``, then cosine from ``lr`` (ProGrad's
        schedule, stepped per epoch), or ``lr`` throughout for ``schedule="constant"``."""
        if self.schedule == "constant":
            return self.lr
        warm = min(self.warmup_epochs, self.epochs - 1)  # a run always gets at least one epoch at ``lr``
        if epoch < warm:
            return self.warmup_lr
        span = max(1, self.epochs - warm)
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * (epoch - warm) / span))

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
    sources: list[int] = field(default_factory=list)  # memory image each item derives from; -1 / empty: none
    dropped: int = 0  # synthetic anomalies dropped because their mask was empty

    def __len__(self) -> int:
        return int(self.labels.numel())

    def source_list(self) -> list[int]:
        return self.sources if self.sources else [-1] * len(self)

    def subset(self, index: torch.Tensor) -> Pool:
        memory = None if self.tokens.memory is None else self.tokens.memory[index]
        tokens = ImageTokens(cls=self.tokens.cls[index], patches=self.tokens.patches[index], memory=memory)
        rows = index.tolist()
        sources = [self.sources[i] for i in rows] if self.sources else []
        return Pool(tokens, self.labels[index], self.masks[index], [self.generators[i] for i in rows], sources)


@dataclass(frozen=True)
class TrainMetrics:
    """What a training run achieved on its validation pool, before and after training, and its calibration."""

    val_before: PoolMetrics
    val_after: PoolMetrics
    epochs_run: int
    train_seconds: float
    calibration: Calibration
    selection: dict[str, object] = field(default_factory=dict)  # rule, best epoch, its score / AUROC / FPR
    data: dict[str, object] = field(default_factory=dict)  # memory hold-out kind, dropped anomalies, sizes

    def to_json(self) -> dict[str, object]:
        return {"val_before": self.val_before.to_json(), "val_after": self.val_after.to_json(),
                "epochs_run": self.epochs_run, "train_seconds": self.train_seconds,
                "calibration": self.calibration.to_json(), "selection": self.selection, "data": self.data}


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


def augment_view(rng: np.random.Generator, image: np.ndarray, region: np.ndarray,
                 orientation: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A random flip/rot90 (only with ``orientation``) plus mild brightness/contrast jitter, applied to image
    and region together. The random draws are the same either way, so the jitter does not depend on it."""
    k = int(rng.integers(0, 4))
    flip = bool(rng.integers(0, 2))
    out, reg = image, region
    if orientation:
        out, reg = np.rot90(image, k), np.rot90(region, k)
        if flip:
            out, reg = out[:, ::-1], reg[:, ::-1]
    gain, bias = rng.uniform(0.9, 1.1), rng.uniform(-10, 10)
    out = np.clip(out.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out), np.ascontiguousarray(reg)


def mask_to_model(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """bool [H, W] -> float {0, 1} [S, S]: a model-size cell is anomalous when any of its pixels is (adaptive
    max-pooling), so thin defects (a one-pixel scratch on a 900 px frame) survive the shrink to 240 px."""
    tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.adaptive_max_pool2d(tensor, output_size=size)[0, 0].gt(0).float()


def orientation_allowed(rule: str, region: ObjectRegion) -> bool:
    """Flip/rot90 views: ``on`` always, ``off`` never, ``auto`` only for textures (OAGM found no object)."""
    return rule == "on" or (rule == "auto" and region.kind != "object")


def build_pool(scorer: Scorer, rng: np.random.Generator, normals: Sequence[np.ndarray],
               regions: Sequence[ObjectRegion], n_normal: int, n_anomalous: int, oagm: OAGMConfig,
               extra_normals: Sequence[np.ndarray] = (), sources: Sequence[int] | None = None,
               orientation: str = "auto") -> Pool:
    """Augmented normal views + OAGM anomalies (each from an augmented view), encoded once.

    ``sources[i]``: the memory image ``normals[i]`` is (default: image i of the memory; -1: not in it); each
    item carries its source, so scoring can leave that image out of the memory. ``extra_normals`` enter
    as they are (source -1). Anomalies whose mask comes out empty are dropped (``Pool.dropped``).
    """
    size = scorer.backbone.image_size
    owners = list(range(len(normals))) if sources is None else [int(v) for v in sources]
    images: list[np.ndarray] = list(extra_normals)
    masks: list[torch.Tensor] = [torch.zeros(size) for _ in extra_normals]  # built on the host, moved once
    generators = ["normal"] * len(extra_normals)
    item_sources = [-1] * len(extra_normals)
    dropped = 0
    for i in range(n_normal + n_anomalous):
        source = i % len(normals)
        view, region = augment_view(rng, normals[source], regions[source].mask,
                                    orientation_allowed(orientation, regions[source]))
        if i < n_normal:
            images.append(view)
            masks.append(torch.zeros(size))
            generators.append("normal")
        else:
            synthetic = synthesize(rng, view, region, oagm)
            if not np.any(synthetic.mask):  # max-pooling keeps any non-empty mask non-empty
                dropped += 1
                continue
            images.append(synthetic.image)
            masks.append(mask_to_model(synthetic.mask, size))
            generators.append(synthetic.generator)
        item_sources.append(owners[source])
    if dropped:
        log.warning("%d synthetic anomalies had an empty mask and were dropped", dropped)
    labels = torch.tensor([0 if g == "normal" else 1 for g in generators], dtype=torch.long)
    pool = pool_on_device(scorer, images, labels, torch.stack(masks), generators)
    pool.sources, pool.dropped = item_sources, dropped
    return pool


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
    decay = config.resolved_weight_decay
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr_at(0), momentum=config.momentum, weight_decay=decay)
    return torch.optim.AdamW(params, lr=config.lr_at(0), weight_decay=decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


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


def selection_score(labels: np.ndarray, scores: np.ndarray, recall: float = 0.9) -> dict[str, float]:
    """Model selection on a validation pool scored as served: ``score = image_AUROC - FPR``, where the AUROC
    separates the held-out normals from fresh synthetic anomalies and FPR is the share of held-out normals
    at or above the score that keeps ``recall`` of the anomalies (higher is better)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    auroc = image_auroc(labels.astype(np.int64), scores)
    cut = float(np.quantile(scores[labels], 1.0 - recall))
    fpr = float((scores[~labels] >= cut).mean())
    return {"score": auroc - fpr, "image_AUROC": auroc, "FPR": fpr, "recall": recall}


@dataclass
class ServedBranches:
    """A pool's branch scores as served, before fusion: text image [P], text patch [P, N], memory distance
    [P, N] (each item against the memory without its own source image) or None; ``holdout`` says how."""

    image: torch.Tensor
    patch: torch.Tensor
    distance: torch.Tensor | None
    holdout: str


@torch.inference_mode()
def memory_distances_held_out(scorer: Scorer, pool: Pool, bank: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Each pool item's memory distance [P, N] against ``bank`` [k, N, F] without the item's source image
    (leave-one-out); items from no memory image see the whole bank. Returns the kind of hold-out used:
    ``held-out`` (no item from a memory image), ``leave-one-out``, or ``none`` (k = 1: an item from the only
    shot had to see its own image)."""
    dev = scorer.backbone.device
    feats = F.normalize(scorer.memory_features(pool.tokens), dim=-1)
    bank = bank.to(dev)
    k = bank.shape[0]
    full = bank.reshape(-1, bank.shape[-1])
    out = torch.empty(feats.shape[:2], device=dev)
    sources = pool.source_list()
    kinds: set[str] = set()
    for source in sorted(set(sources)):
        rows = [i for i, s in enumerate(sources) if s == source]
        if source < 0:
            memory, kind = full, "held-out"
        elif k == 1:
            memory, kind = full, "none"
        else:
            keep = [j for j in range(k) if j != source]
            memory, kind = bank[keep].reshape(-1, bank.shape[-1]), "leave-one-out"
        kinds.add(kind)
        index = torch.tensor(rows, device=dev)
        out[index] = memory_distance(feats[index], memory)
    for kind in ("none", "leave-one-out", "held-out"):
        if kind in kinds:
            return out, kind
    return out, "held-out"


def served_branches(scorer: Scorer, pool: Pool, prompts: PromptSet, distance: torch.Tensor | None,
                    holdout: str = "held-out") -> ServedBranches:
    text = prompts.text_features.to(scorer.backbone.device)
    with torch.inference_mode():
        image = anomaly_probability(pool.tokens.cls, text, scorer.logit_scale)
        patch = anomaly_probability(pool.tokens.patches, text, scorer.logit_scale)
    return ServedBranches(image, patch, distance, holdout)


def fusion_scales_from(branches: ServedBranches, labels: torch.Tensor) -> FusionScales | None:
    """`FusionScales` from a pool's normals (each branch's 0.99 quantile); None without a memory."""
    if branches.distance is None:
        return None
    normal = (labels == 0).to(branches.image.device)
    if not bool(normal.any()):
        raise ConfigError("fusion scales need normal validation images")
    return (normal_scale(branches.image[normal]), normal_scale(branches.distance[normal].amax(dim=1)),
            normal_scale(branches.patch[normal]), normal_scale(branches.distance[normal]))


def served_scores(scorer: Scorer, branches: ServedBranches, scales: FusionScales | None,
                  with_maps: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Branch scores -> ([P] image scores, [P, S, S] maps or None) exactly as the service fuses and smooths."""
    image, patch = scorer.fused_scores(branches.image, branches.patch, branches.distance, scales)
    scores = image.clamp(0.0, 1.0).cpu().numpy().astype(np.float32)
    if not with_maps:
        return scores, None
    maps = patch_maps(patch, scorer.backbone.grid_size, scorer.backbone.image_size, scorer.config.sigma)
    return scores, maps.cpu().numpy()


def train_prompts(
    scorer: Scorer,
    normals: Sequence[np.ndarray],
    category: str,
    config: TrainConfig,
    init_ctx: torch.Tensor | None = None,
    val_normals: Sequence[np.ndarray] = (),
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Learn a prompt set for ``category`` from ``normals`` (k images). Deterministic for ``config.seed``.

    ``init_ctx`` warm-starts from earlier prompts; ``val_normals`` are real held-out normals (the tuner has
    them); without them validation normals are augmented views of the k shots, scored against the memory of
    the other shots. The k shots become the few-shot memory when ``config.memory`` is on.
    """
    if not normals:
        raise ConfigError("training needs at least one normal image")
    started = time.monotonic()
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    backbone = scorer.backbone
    regions = object_masks(scorer, normals, config.oagm)
    train_pool = build_pool(scorer, rng, normals, regions, config.train_normals, config.train_anomalies, config.oagm,
                            orientation=config.orientation)
    # validation: real held-out normals as they are (source -1), views of the shots to top up (source = shot),
    # fresh anomalies on both (a seed the training pool never uses)
    held = list(val_normals)
    held_regions = object_masks(scorer, held, config.oagm) if held else []
    base = held + list(normals)
    base_sources = [-1] * len(held) + list(range(len(normals)))
    val_pool = build_pool(scorer, np.random.default_rng(config.seed + 1_000_003), base, held_regions + list(regions),
                          0, config.val_anomalies, config.oagm, sources=base_sources, orientation=config.orientation)
    top_up = max(0, config.val_normals - len(held))
    views = build_pool(scorer, np.random.default_rng(config.seed + 2_000_003), normals, regions, top_up, 0,
                       config.oagm, orientation=config.orientation) if top_up else None
    if held:
        held_pool = pool_on_device(scorer, held, torch.zeros(len(held), dtype=torch.long),
                                   torch.zeros(len(held), *backbone.image_size), ["normal"] * len(held))
        val_pool = concat_pools([held_pool, val_pool] + ([views] if views is not None else []))
    elif views is not None:
        val_pool = concat_pools([views, val_pool])
    class_name = category if config.class_name is None else config.class_name
    object_name = (class_name or category).replace("_", " ")
    meta_text = meta_text_features(scorer, object_name)
    learner = PromptLearner(backbone.model, backbone.tokenizer, config.n_ctx, class_name, init=init_ctx,
                            generator=generator)
    optimizer = _optimizer(config, [learner.ctx])

    bank = scorer.memory_bank(list(normals)) if config.memory else None
    distance, holdout = (memory_distances_held_out(scorer, val_pool, bank) if bank is not None else (None, "n/a"))
    if holdout == "none":
        log.warning("k=1 and no held-out normals: validation views of the only shot are scored against a memory "
                    "that holds that shot; thresholds come out low (give held-out normals or k >= 2)")
    val_labels = val_pool.labels.cpu().numpy()

    def snapshot() -> PromptSet:
        return learner.prompt_set(category, backbone.identity, laa=scorer.config.laa, method=scorer.method_record())

    def select(prompts: PromptSet, val_loss: float) -> dict[str, float]:
        if config.selection == "loss":
            return {"score": -val_loss}
        branches = served_branches(scorer, val_pool, prompts, distance, holdout)
        scores, _ = served_scores(scorer, branches, fusion_scales_from(branches, val_pool.labels), with_maps=False)
        return selection_score(val_labels, scores)

    initial = snapshot()
    before = evaluate_pool(scorer, val_pool, initial, config)
    chosen = select(initial, before.loss)
    best = (chosen["score"], learner.ctx.detach().clone(), -1, chosen)
    history: list[dict[str, float]] = []
    stale = 0
    for epoch in range(config.epochs):
        set_lr(optimizer, config.lr_at(epoch))
        sums: dict[str, torch.Tensor] = {}
        for _ in range(config.steps_per_epoch):
            index = torch.randperm(len(train_pool), generator=generator)[: config.batch_size]
            for key, value in _step(learner, optimizer, train_pool.subset(index), meta_text, scorer, config).items():
                sums[key] = sums[key] + value if key in sums else value
        totals = {key: float(value) / config.steps_per_epoch for key, value in sums.items()}  # one sync an epoch
        current = snapshot()
        val = evaluate_pool(scorer, val_pool, current, config)
        picked = select(current, val.loss)
        record = {"epoch": float(epoch), **totals, "lr": config.lr_at(epoch), "val_loss": val.loss,
                  "val_image_AUROC": val.image_AUROC, "val_selection": picked["score"]}
        history.append(record)
        if progress is not None:
            progress(epoch, record)
        if not math.isfinite(record["loss"]):
            raise ConfigError(f"training diverged at epoch {epoch} (loss {record['loss']}); lower --lr")
        if picked["score"] > best[0] + config.min_delta:
            best, stale = (picked["score"], learner.ctx.detach().clone(), epoch, picked), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    with torch.no_grad():
        learner.ctx.copy_(best[1])
    prompts = snapshot()
    branches = served_branches(scorer, val_pool, prompts, distance, holdout)
    scales = fusion_scales_from(branches, val_pool.labels)
    if bank is not None:
        prompts = prompts.with_memory(bank.reshape(-1, bank.shape[-1]), scales)
    after = evaluate_pool(scorer, val_pool, prompts, config)
    scores, maps = served_scores(scorer, branches, scales)
    calibration = calibrate_thresholds(labels=val_labels, scores=scores, masks=val_pool.masks.cpu().numpy() > 0.5,
                                       maps=maps, rule=config.threshold_rule, normal_quantile=config.normal_quantile)
    prompts = replace(prompts, threshold=calibration.threshold, pixel_threshold=calibration.pixel_threshold)
    selection = {"rule": config.selection, "best_epoch": best[2], **{k: float(v) for k, v in best[3].items()}}
    data = {"memory_holdout": holdout, "memory_images": len(normals) if bank is not None else 0,
            "held_out_normals": len(held), "val_items": len(val_pool),
            "dropped_empty_masks": train_pool.dropped + val_pool.dropped}
    metrics = TrainMetrics(val_before=before, val_after=after, epochs_run=len(history),
                           train_seconds=time.monotonic() - started, calibration=calibration,
                           selection=selection, data=data)
    return TrainResult(prompts, initial, best[1].cpu(), history, metrics, list(regions), config)


def concat_pools(pools: Sequence[Pool]) -> Pool:
    """Pools (encoded by one scorer) one after another."""
    from hpad.scorer import concat_tokens

    return Pool(concat_tokens([p.tokens for p in pools]), torch.cat([p.labels for p in pools]),
                torch.cat([p.masks for p in pools]), [g for p in pools for g in p.generators],
                [s for p in pools for s in p.source_list()], sum(p.dropped for p in pools))


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
