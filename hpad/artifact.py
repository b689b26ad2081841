"""Prompt artifacts: one safetensors file = learned prompt tensors + a JSON manifest. No pickle anywhere.

Layout: a standard safetensors file whose ``__metadata__`` holds ``{"manifest": "<json>"}``.

Tensors: ``text_features`` [2, D] (normal, anomalous; what the scorer uses), ``ctx`` [2, n_ctx, W] (the
learned context vectors, for warm starts; optional), ``memory`` [M, D] (few-shot normal patch features;
optional, stored as float16).

Manifest fields: format, format_version, version (prompt version, monotonic per category), category,
model, weights (tag or checkpoint sha256), model_identity, image_size, laa, n_ctx, class_name, k, seed,
threshold, pixel_threshold, calibration, training, created_at, parent_version, random_weights, sha256.

``sha256`` is the hash of the content (every tensor's name, dtype, shape and bytes, then the manifest
without the sha256 field, canonical JSON). Loading checks the format, size limits, the header, the
checksum, shapes, finiteness, and (when asked) the model identity and LAA settings, and rejects anything
wrong with an `ArtifactError` that says what.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hpad.attention import LAAConfig, config_differences
from hpad.errors import ArtifactError, ConfigError
from hpad.io import atomic_write_bytes
from hpad.prompts import PromptSet
from hpad.scorer import LEGACY_METHOD

FORMAT = "hpad-prompts"
FORMAT_VERSION = 1
MAX_ARTIFACT_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024
REQUIRED_FIELDS = ("format", "format_version", "version", "category", "model_identity", "threshold",
                   "pixel_threshold", "sha256", "created_at")


@dataclass(frozen=True)
class PromptArtifact:
    """A verified artifact: the prompt set the scorer uses, the warm-start context and the manifest."""

    prompts: PromptSet
    ctx: torch.Tensor | None
    manifest: dict[str, Any]

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def sha256(self) -> str:
        return str(self.manifest["sha256"])


def content_sha256(tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    digest.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


def _identity_parts(identity: str) -> tuple[str, str]:
    model, _, weights = identity.partition("/")
    return model, weights


def build_artifact_bytes(
    prompts: PromptSet,
    *,
    version: int,
    ctx: torch.Tensor | None = None,
    image_size: tuple[int, int] | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """Serialise a prompt set (+ context) with a fresh manifest and checksum."""
    if version < 1:
        raise ConfigError(f"artifact versions start at 1, got {version}")
    if not prompts.model_identity:
        raise ConfigError("a prompt artifact needs the model identity it was made for")
    tensors: dict[str, torch.Tensor] = {"text_features": prompts.text_features.detach().float().cpu().contiguous()}
    if ctx is not None:
        tensors["ctx"] = ctx.detach().float().cpu().contiguous()
    if prompts.memory is not None:
        tensors["memory"] = prompts.memory.detach().to(torch.float16).cpu().contiguous()
    model, weights = _identity_parts(prompts.model_identity)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": int(version),
        "category": prompts.category,
        "model": model,
        "weights": weights,
        "model_identity": prompts.model_identity,
        "random_weights": weights == "random-init",
        "image_size": list(image_size) if image_size else None,
        "laa": prompts.laa.describe() if prompts.laa is not None else None,
        "method": prompts.method,
        "fusion_scales": list(prompts.fusion_scales) if prompts.fusion_scales is not None else None,
        "threshold": float(prompts.threshold),
        "pixel_threshold": float(prompts.pixel_threshold),
        "source": prompts.source,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    manifest["sha256"] = content_sha256(tensors, manifest)
    return st_save(tensors, metadata={"manifest": json.dumps(manifest, sort_keys=True)})


def save_artifact(path: Path, data: bytes) -> Path:
    """Write atomically and durably (`hpad.io.atomic_write_bytes`: temp file, fsync, rename, fsync of the
    folder): a crash never leaves a half-written artifact at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, data)


def _header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise ArtifactError(f"artifact is truncated ({len(data)} bytes): not a safetensors file")
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER_BYTES or 8 + size > len(data):
        raise ArtifactError(f"artifact header claims {size} bytes but the file has {len(data)}: truncated or corrupt")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"artifact header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ArtifactError("artifact header is not a JSON object")
    return header


def _manifest(header: dict[str, Any]) -> dict[str, Any]:
    raw = (header.get("__metadata__") or {}).get("manifest")
    if raw is None:
        raise ArtifactError("artifact has no hpad manifest: is it a prompt artifact made by `hpad train`?")
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"artifact manifest is not valid JSON: {exc}") from exc
    missing = [name for name in REQUIRED_FIELDS if name not in manifest]
    if missing:
        raise ArtifactError(f"artifact manifest lacks {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        raise ArtifactError(f"artifact format is {manifest['format']!r}, expected {FORMAT!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"artifact format version {manifest['format_version']} is not supported (this hpad reads "
            f"{FORMAT_VERSION}); retrain or upgrade hpad"
        )
    return manifest


def _check_tensors(tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    text = tensors.get("text_features")
    if text is None or text.ndim != 2 or text.shape[0] != 2:
        shape = None if text is None else tuple(text.shape)
        raise ArtifactError(f"artifact text_features must be [2, D], got {shape}")
    ctx, memory = tensors.get("ctx"), tensors.get("memory")
    if ctx is not None and (ctx.ndim != 3 or ctx.shape[0] != 2):
        raise ArtifactError(f"artifact ctx must be [2, n_ctx, W], got {tuple(ctx.shape)}")
    if memory is not None and memory.ndim != 2:  # its width is the scorer's memory features' (checked there)
        raise ArtifactError(f"artifact memory must be [M, F], got {tuple(memory.shape)}")
    scales = manifest.get("fusion_scales")
    if scales is not None and (not isinstance(scales, list) or len(scales) != 4
                               or not all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in scales)):
        raise ArtifactError(f"artifact fusion_scales must be 4 positive finite numbers, got {scales!r}")
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor.float()).all():
            raise ArtifactError(f"artifact tensor {name} contains NaN or Inf")
    for name in ("threshold", "pixel_threshold"):
        value = manifest[name]
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ArtifactError(f"artifact {name} is not a finite number: {value!r}")


def read_artifact(
    source: bytes | Path | str,
    *,
    expected_identity: str | None = None,
    expected_laa: LAAConfig | None = None,
    expected_category: str | None = None,
    max_bytes: int = MAX_ARTIFACT_BYTES,
) -> PromptArtifact:
    """Parse and verify an artifact from bytes or a path. Raises `ArtifactError` on anything wrong."""
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ArtifactError(f"prompt artifact {path} does not exist")
        if path.stat().st_size > max_bytes:
            raise ArtifactError(f"prompt artifact {path} is larger than {max_bytes} bytes")
        data = path.read_bytes()
    if len(data) > max_bytes:
        raise ArtifactError(f"prompt artifact is {len(data)} bytes, over the {max_bytes}-byte limit")
    manifest = _manifest(_header(data))
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError / others on corrupt data
        raise ArtifactError(f"artifact tensors cannot be read (corrupt or truncated): {exc}") from exc
    _check_tensors(tensors, manifest)
    if content_sha256(tensors, manifest) != manifest["sha256"]:
        raise ArtifactError("artifact checksum does not match its content: the file was corrupted or tampered with")
    identity = manifest["model_identity"]
    if expected_identity is not None and identity != expected_identity:
        raise ArtifactError(f"artifact was made for {identity}, but this scorer runs {expected_identity}",
                            reason="wrong_model")
    if expected_category is not None and manifest["category"] != expected_category:
        raise ArtifactError(f"artifact is for category {manifest['category']!r}, expected {expected_category!r}",
                            reason="wrong_category")
    laa = LAAConfig.from_record(manifest["laa"]) if manifest.get("laa") else None
    if expected_laa is not None and laa is not None and laa != expected_laa:
        diffs = config_differences(laa.describe(), expected_laa.describe(), "laa.")
        raise ArtifactError(f"artifact was learned with other LAA choices: {'; '.join(diffs)}", reason="wrong_laa")
    method = manifest.get("method")
    if method is None:  # written before the method record: what it was learned with
        method = {**LEGACY_METHOD, **({"laa": laa.describe()} if laa is not None else {})}
    memory = tensors.get("memory")
    prompts = PromptSet(
        category=manifest["category"],
        text_features=tensors["text_features"].float(),
        threshold=float(manifest["threshold"]),
        pixel_threshold=float(manifest["pixel_threshold"]),
        version=int(manifest["version"]),
        source=str(manifest.get("source", "learned")),
        model_identity=identity,
        memory=None if memory is None else memory.float(),
        sha256=manifest["sha256"],
        laa=laa,
        method=method,
        fusion_scales=tuple(float(v) for v in scales) if (scales := manifest.get("fusion_scales")) else None,
    )
    return PromptArtifact(prompts=prompts, ctx=tensors.get("ctx"), manifest=manifest)


def load_prompt_artifact(source: bytes | Path | str, expected_identity: str | None = None,
                         expected_laa: LAAConfig | None = None) -> PromptSet:
    """Convenience: the verified prompt set of an artifact."""
    return read_artifact(source, expected_identity=expected_identity, expected_laa=expected_laa).prompts


def with_version(artifact: PromptArtifact, version: int, **extra: Any) -> bytes:
    """Re-issue an artifact's content under a new version number (rollback, registry publish)."""
    keep = {k: v for k, v in artifact.manifest.items()
            if k not in ("format", "format_version", "version", "category", "model", "weights", "model_identity",
                         "random_weights", "laa", "method", "fusion_scales", "threshold", "pixel_threshold", "source", "created_at", "sha256")}
    prompts = replace(artifact.prompts, version=version)
    image_size = artifact.manifest.get("image_size")
    return build_artifact_bytes(prompts, version=version, ctx=artifact.ctx,
                                image_size=tuple(image_size) if image_size else None, extra={**keep, **extra})
