"""Text side of the scorer: prompt sets (the normal/anomalous embedding pair) and the zero-shot ensemble.

A `PromptSet` is everything category-specific the scorer needs: two L2-normalised text embeddings (row 0 =
normal, row 1 = anomalous), the decision thresholds, an optional few-shot memory of normal patch features,
and where it came from (zero-shot ensemble or learned prompts) with a version number. Scorers take a prompt
set per call, so swapping one in is a pointer change between batches.

Zero-shot mode uses a hand-written ensemble of state words x templates (WinCLIP-style) so hpad scores frames
before any tuning has run. Learned prompts (CoOp-style context vectors, human-free) produce the same
`PromptSet`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from hpad.attention import LAAConfig
from hpad.errors import ConfigError

NORMAL, ANOMALOUS = 0, 1

NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "broken {}",
    "defective {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
    "{} with a scratch",
    "{} with a crack",
)
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "an industrial photo of a {}.",
    "a photo of a {} for visual inspection.",
    "a photo of a {} for anomaly detection.",
    "there is a {} in the scene.",
)

ZERO_SHOT_THRESHOLD = 0.5  # softmax probability of "anomalous": undecided point before any calibration


@dataclass(frozen=True)
class PromptSet:
    """The text embedding pair and decision rule for one category.

    text_features: [2, D] L2-normalised (row 0 normal, row 1 anomalous).
    memory: optional [M, F] L2-normalised normal patch features (few-shot nearest-neighbour reference).
    threshold: image-level decision threshold on `pred_score`; pixel_threshold: on the anomaly map.
    version: 0 for the built-in zero-shot set, >= 1 for published learned versions.
    """

    category: str
    text_features: torch.Tensor
    threshold: float = ZERO_SHOT_THRESHOLD
    pixel_threshold: float = ZERO_SHOT_THRESHOLD
    version: int = 0
    source: str = "zero-shot"
    model_identity: str = ""
    memory: torch.Tensor | None = None
    sha256: str = ""
    laa: LAAConfig | None = None  # the LAA setting the prompts were learned with (None: any)
    method: dict | None = None  # every scoring choice they were learned under (`Scorer.method_record`; None: any)
    fusion_scales: tuple[float, float, float, float] | None = None  # `hpad.scorer.FusionScales` of the memory

    def __post_init__(self) -> None:
        tf = self.text_features
        if tf.ndim != 2 or tf.shape[0] != 2:
            raise ConfigError(f"text_features must be [2, D] (normal, anomalous); got {tuple(tf.shape)}")
        # checked where sets are born (artifacts, training, zero-shot: all on the host); a device copy made by
        # `to` is not checked again, which would wait on the device
        if tf.device.type == "cpu" and not torch.isfinite(tf).all():
            raise ConfigError("text_features contain NaN or Inf")
        if self.memory is not None and self.memory.ndim != 2:  # width: the scorer's memory features (checked there)
            raise ConfigError(f"memory must be [M, F]; got {tuple(self.memory.shape)}")

    @property
    def embed_dim(self) -> int:
        return int(self.text_features.shape[1])

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> PromptSet:
        memory = None if self.memory is None else self.memory.to(device=device, dtype=dtype)
        return replace(self, text_features=self.text_features.to(device=device, dtype=dtype), memory=memory)

    def with_memory(self, memory: torch.Tensor | None,
                    fusion_scales: tuple[float, float, float, float] | None = None) -> PromptSet:
        """The set with another few-shot memory; its fusion scales belong to that memory (None: unit scales)."""
        return replace(self, memory=memory, fusion_scales=fusion_scales)

    def label(self) -> str:
        """Short human-readable identity, e.g. ``bottle v3 (learned)``."""
        return f"{self.category} v{self.version} ({self.source})"


def ensemble_sentences(object_name: str, states: tuple[str, ...]) -> list[str]:
    """Every template filled with every state of ``object_name``."""
    return [template.format(state.format(object_name)) for state in states for template in TEMPLATES]


@torch.inference_mode()
def encode_texts(model: torch.nn.Module, tokenizer: object, texts: list[str]) -> torch.Tensor:
    """Frozen text tower: sentences -> [T, D] L2-normalised float32 embeddings."""
    device = next(model.parameters()).device
    tokens = tokenizer(texts).to(device)  # [T, context_length]
    features = model.encode_text(tokens)
    return F.normalize(features.float(), dim=-1)


def ensemble_embedding(model: torch.nn.Module, tokenizer: object, sentences: list[str]) -> torch.Tensor:
    """Mean of normalised sentence embeddings, renormalised: [D]."""
    return F.normalize(encode_texts(model, tokenizer, sentences).mean(dim=0), dim=-1)


def zero_shot_text_features(model: torch.nn.Module, tokenizer: object, object_name: str) -> torch.Tensor:
    """The hand-written (normal, anomalous) ensemble pair of ``object_name``: [2, D] on the model's device.

    The zero-shot prompts of the scorer and MPTS's meta prompts are both this pair."""
    normal = ensemble_embedding(model, tokenizer, ensemble_sentences(object_name, NORMAL_STATES))
    anomalous = ensemble_embedding(model, tokenizer, ensemble_sentences(object_name, ANOMALOUS_STATES))
    return torch.stack([normal, anomalous])


def zero_shot_prompt_set(
    model: torch.nn.Module, tokenizer: object, category: str, model_identity: str, object_name: str | None = None
) -> PromptSet:
    """Hand-written ensemble prompts for ``category`` (object name defaults to the category, '_' -> ' ')."""
    name = (object_name or category).replace("_", " ").strip() or "object"
    return PromptSet(
        category=category,
        text_features=zero_shot_text_features(model, tokenizer, name).cpu(),
        source="zero-shot",
        model_identity=model_identity,
    )


# ------------------------------------------------------------------------------------------ learnable prompts

PLACEHOLDER = "X"


def _text_tower(model: torch.nn.Module) -> torch.nn.Module:
    """open_clip's CLIP keeps the text tower's parts on the model itself; refuse anything else."""
    for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask"):
        if not hasattr(model, name):
            raise ConfigError(f"learnable prompts need an open_clip CLIP with a native text tower (missing {name})")
    if getattr(model, "text_pool_type", "argmax") != "argmax":
        raise ConfigError("learnable prompts need a text tower that pools at the end-of-text token (argmax)")
    return model


class PromptLearner(torch.nn.Module):
    """CoOp-style learnable context vectors for the normal and the anomalous class (human-free prompts).

    Each class's sentence is ``"X X ... X [class_name]."`` with ``n_ctx`` placeholder tokens whose token
    embeddings are replaced by that class's learnable context [n_ctx, W]. Nothing else is learned: CLIP's
    text tower is frozen and only ``ctx`` receives gradients.

    Speed: the text transformer is causal, so the end-of-text token's output does not depend on positions
    after it. ``forward`` therefore runs only the first ``eot + 1`` positions (about n_ctx + 3 of CLIP's 77),
    which gives exactly the same embeddings at a fraction of the cost.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: object,
        n_ctx: int = 8,
        class_name: str = "",
        init: torch.Tensor | None = None,
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
        truncate: bool = True,
    ) -> None:
        super().__init__()
        self.model = _text_tower(model)
        if not 1 <= n_ctx <= 32:
            raise ConfigError(f"n_ctx must be in [1, 32], got {n_ctx}")
        self.n_ctx = n_ctx
        self.class_name = class_name.replace("_", " ").strip()
        sentence = " ".join([PLACEHOLDER] * n_ctx + ([self.class_name] if self.class_name else [])) + "."
        tokens = tokenizer([sentence, sentence])  # [2, L]; both classes share the template
        eot = int(tokens[0].argmax())
        if eot <= n_ctx:
            raise ConfigError(f"template {sentence!r} does not fit the text tower's context length")
        device = model.token_embedding.weight.device
        keep = eot + 1 if truncate else tokens.shape[1]  # truncate=False only to measure what it saves
        self.register_buffer("tokens", tokens[:, :keep].to(device), persistent=False)  # [2, T]
        with torch.no_grad():
            embedded = model.token_embedding(self.tokens).float()  # [2, T, W]
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=False)  # start-of-text
        self.register_buffer("suffix", embedded[:, 1 + n_ctx :].clone(), persistent=False)  # name, ".", EOT, ...
        width = embedded.shape[-1]
        if init is None:
            init = torch.randn(2, n_ctx, width, generator=generator) * init_std
        if tuple(init.shape) != (2, n_ctx, width):
            raise ConfigError(f"initial context must be [2, {n_ctx}, {width}], got {tuple(init.shape)}")
        self.ctx = torch.nn.Parameter(init.detach().clone().float().to(device))  # [2, n_ctx, W]

    @property
    def sentence(self) -> str:
        return " ".join([PLACEHOLDER] * self.n_ctx + ([self.class_name] if self.class_name else [])) + "."

    def forward(self) -> torch.Tensor:
        """-> [2, D] L2-normalised text embeddings (row 0 normal, row 1 anomalous), differentiable in ctx."""
        model = self.model
        dtype = model.transformer.get_cast_dtype()
        x = torch.cat([self.prefix, self.ctx, self.suffix], dim=1).to(dtype)  # [2, T, W]
        length = x.shape[1]
        x = x + model.positional_embedding[:length].to(dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = model.ln_final(x)
        x = x[torch.arange(2, device=x.device), self.tokens.argmax(dim=-1)]  # end-of-text position
        projection = model.text_projection
        x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
        return F.normalize(x.float(), dim=-1)

    def prompt_set(self, category: str, model_identity: str, **fields: object) -> PromptSet:
        with torch.no_grad():
            features = self().detach().cpu()
        return PromptSet(category=category, text_features=features, source="learned",
                         model_identity=model_identity, **fields)
