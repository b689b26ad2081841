"""Prompt artifacts: round trip, and rejection of corrupt, truncated, tampered, NaN and mismatched files."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from hpad.artifact import (
    build_artifact_bytes,
    content_sha256,
    read_artifact,
    save_artifact,
    with_version,
)
from hpad.attention import LAAConfig
from hpad.errors import ArtifactError, ConfigError
from hpad.prompts import PromptSet

IDENTITY = "hpad-tiny/random-init"


def _prompts(dim: int = 64, memory: bool = True) -> PromptSet:
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(2, dim, generator=g), dim=-1)
    mem = torch.nn.functional.normalize(torch.randn(10, dim, generator=g), dim=-1) if memory else None
    return PromptSet(category="bottle", text_features=text, threshold=0.42, pixel_threshold=0.55,
                     source="learned", model_identity=IDENTITY, memory=mem, laa=LAAConfig(layers=2))


def _artifact(**kwargs) -> bytes:
    ctx = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(1))
    return build_artifact_bytes(_prompts(**kwargs), version=3, ctx=ctx, image_size=(64, 64),
                                extra={"k": 2, "seed": 7})


def _rewrite(data: bytes, mutate) -> bytes:
    """Re-serialise with a mutated manifest/tensors (keeps the OLD checksum unless mutate changes it)."""
    (size,) = struct.unpack("<Q", data[:8])
    manifest = json.loads(json.loads(data[8 : 8 + size])["__metadata__"]["manifest"])
    artifact = read_artifact(data)
    tensors = {"text_features": artifact.prompts.text_features.clone(), "ctx": artifact.ctx.clone(),
               "memory": artifact.prompts.memory.to(torch.float16).clone()}
    mutate(tensors, manifest)
    return st_save(tensors, metadata={"manifest": json.dumps(manifest)})


def test_roundtrip(tmp_path):
    data = _artifact()
    path = save_artifact(tmp_path / "bottle.safetensors", data)
    artifact = read_artifact(path, expected_identity=IDENTITY, expected_laa=LAAConfig(layers=2))
    original = _prompts()
    assert artifact.version == 3 and artifact.prompts.version == 3
    assert torch.equal(artifact.prompts.text_features, original.text_features)
    assert torch.allclose(artifact.prompts.memory, original.memory, atol=1e-3)  # stored as float16
    assert artifact.prompts.threshold == 0.42 and artifact.prompts.pixel_threshold == 0.55
    assert artifact.prompts.laa == LAAConfig(layers=2)
    assert artifact.ctx.shape == (2, 4, 64)
    assert artifact.manifest["k"] == 2 and artifact.manifest["random_weights"] is True
    assert artifact.prompts.sha256 == artifact.manifest["sha256"] and len(artifact.sha256) == 64
    assert not list(tmp_path.glob(".*.tmp")), "atomic write leaves no temp file"


def test_no_pickle_in_artifacts():
    data = _artifact()
    assert b"\x80\x04" not in data[:16] and data[8:9] == b"{"  # safetensors: u64 length + JSON header


def test_truncated_and_garbage_are_rejected():
    data = _artifact()
    for broken in (data[:4], data[:100], data[: len(data) - 7], b"", b"\x00" * 64, b"PK\x03\x04garbage"):
        with pytest.raises(ArtifactError):
            read_artifact(broken)


def test_tampered_tensor_is_rejected():
    def flip(tensors, manifest):
        tensors["text_features"][0, 0] += 0.01

    with pytest.raises(ArtifactError, match="checksum"):
        read_artifact(_rewrite(_artifact(), flip))


def test_tampered_manifest_is_rejected():
    def lower_threshold(tensors, manifest):
        manifest["threshold"] = 0.01

    with pytest.raises(ArtifactError, match="checksum"):
        read_artifact(_rewrite(_artifact(), lower_threshold))


def test_nan_is_rejected_even_with_a_valid_checksum():
    def poison(tensors, manifest):
        tensors["text_features"][1, 3] = float("nan")
        manifest["sha256"] = content_sha256(tensors, manifest)

    with pytest.raises(ArtifactError, match="NaN"):
        read_artifact(_rewrite(_artifact(), poison))


def test_wrong_shapes_are_rejected():
    def reshape(tensors, manifest):
        tensors["text_features"] = torch.randn(3, 64)
        manifest["sha256"] = content_sha256(tensors, manifest)

    with pytest.raises(ArtifactError, match=r"\[2, D\]"):
        read_artifact(_rewrite(_artifact(), reshape))


def test_wrong_model_laa_and_category_are_rejected():
    data = _artifact()
    with pytest.raises(ArtifactError, match="made for hpad-tiny/random-init"):
        read_artifact(data, expected_identity="ViT-B-16-plus-240/laion400m_e32")
    with pytest.raises(ArtifactError, match="LAA"):
        read_artifact(data, expected_laa=LAAConfig(enabled=False))
    with pytest.raises(ArtifactError, match="category"):
        read_artifact(data, expected_category="screw")


def test_foreign_safetensors_and_future_versions_are_rejected():
    with pytest.raises(ArtifactError, match="no hpad manifest"):
        read_artifact(st_save({"w": torch.zeros(2, 2)}))

    def future(tensors, manifest):
        manifest["format_version"] = 99
        manifest["sha256"] = content_sha256(tensors, manifest)

    with pytest.raises(ArtifactError, match="not supported"):
        read_artifact(_rewrite(_artifact(), future))


def test_size_limit_and_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="limit"):
        read_artifact(_artifact(), max_bytes=100)
    with pytest.raises(ArtifactError, match="does not exist"):
        read_artifact(tmp_path / "missing.safetensors")


def test_with_version_reissues_same_content():
    original = read_artifact(_artifact())
    reissued = read_artifact(with_version(original, 9, rollback_of=3))
    assert reissued.version == 9 and reissued.manifest["rollback_of"] == 3
    assert reissued.manifest["k"] == 2
    assert torch.equal(reissued.prompts.text_features, original.prompts.text_features)
    assert reissued.sha256 != original.sha256


def test_build_refuses_bad_input():
    with pytest.raises(ConfigError):
        build_artifact_bytes(_prompts(), version=0)
    anonymous = PromptSet(category="x", text_features=_prompts().text_features)
    with pytest.raises(ConfigError, match="model identity"):
        build_artifact_bytes(anonymous, version=1)
