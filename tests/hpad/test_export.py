"""Export of the LAA image tower (hpad.export) and the exported runtimes (hpad.runtime) against torch eager fp32.

Tolerances (max absolute difference from `TorchEncoder` fp32 on the same frames, tiny random model):
fp32 runtimes: tokens 1e-4, scores 1e-3, maps 1e-2. OpenVINO bf16: token cosine >= 0.999, scores 5e-3, maps
2e-2. int8 (approximations by design): scores 3e-2, maps 6e-2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpad.attention import EncoderSpec, ImageTokens, LAAConfig, default_memory_blocks
from hpad.export import MANIFEST_NAME, ExportMismatchError, export_encoder, read_manifest
from hpad.runtime import OnnxRuntimeEncoder, OpenVinoEncoder, RuntimeSpec, load_runtime
from hpad.scorer import Scorer, ScorerConfig, encoder_spec
from tests.synthetic import add_defect, make_object_image

TOKENS_TOL, SCORE_TOL, MAP_TOL = 1e-4, 1e-3, 1e-2
FORMAT = {"onnxruntime": "onnx", "openvino": "openvino"}


def spec(backbone, laa: LAAConfig, **memory) -> EncoderSpec:
    """The encoder a default scorer with ``laa`` builds (``memory``: memory_blocks / memory_path)."""
    return EncoderSpec.for_visual(backbone.model.visual, laa, **memory)


@pytest.fixture(scope="module")
def exports(tiny_backbone, tmp_path_factory):
    """fp32 + int8 exports of the session's tiny model with the default LAA, one folder per format."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for kind, fmt in FORMAT.items():
        manifest = export_encoder(tiny_backbone, spec(tiny_backbone, LAAConfig()), root / fmt, fmt, int8=True)
        out[kind] = (root / fmt, manifest)
    return out


def frames(count: int = 7, seed: int = 0) -> list[np.ndarray]:
    """Generated product photos of mixed sizes, every other one with a defect."""
    rng = np.random.default_rng(seed)
    sizes = [(70, 90), (64, 64), (120, 96), (48, 80)]
    out = []
    for i in range(count):
        picture, mask = make_object_image(rng, sizes[i % len(sizes)])
        out.append(add_defect(rng, picture, mask)[0] if i % 2 else picture)
    return out


def scorer_pair(backbone, folder, kind: str, precision: str = "fp32", max_batch: int = 3) -> tuple[Scorer, Scorer]:
    """(torch eager fp32, exported runtime) scorers with the same prompts; max_batch 3 chunks 7 frames 3+3+1,
    so the dynamic batch dimension is exercised."""
    config = ScorerConfig(max_batch=max_batch)
    reference = Scorer.zero_shot(backbone, "widget", config)
    runtime = load_runtime(RuntimeSpec(kind, folder, precision), backbone, encoder_spec(backbone, config))
    return reference, Scorer(backbone, reference.prompts, config, runtime=runtime)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def map_diff(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a.anomaly_map, b.anomaly_map, strict=True))


@pytest.mark.parametrize("kind", ["onnxruntime", "openvino"])
def test_fp32_export_matches_torch_eager(tiny_backbone, exports, kind):
    folder, manifest = exports[kind]
    reference, exported = scorer_pair(tiny_backbone, folder, kind)
    assert exported.runtime.name == kind
    batch = frames()
    ref_tokens, got_tokens = reference.encode(batch), exported.encode(batch)
    assert type(got_tokens) is ImageTokens
    for name in ImageTokens._fields:
        ref, got = getattr(ref_tokens, name), getattr(got_tokens, name)
        assert got.shape == ref.shape and got.dtype == torch.float32
        diff = max_abs(ref, got)
        print(f"{kind} fp32 {name}: max abs {diff:.2e}")
        assert diff <= TOKENS_TOL, (name, diff)
    ref, got = reference.score(batch), exported.score(batch)
    score_diff, maps = float(np.abs(ref.pred_score - got.pred_score).max()), map_diff(ref, got)
    print(f"{kind} fp32: scores max abs {score_diff:.2e}, maps max abs {maps:.2e}")
    assert score_diff <= SCORE_TOL and maps <= MAP_TOL
    assert [m.shape for m in got.anomaly_map] == [f.shape[:2] for f in batch]
    assert set(manifest.parity) == set(ImageTokens._fields)
    assert all(value <= TOKENS_TOL for value in manifest.parity.values())


@pytest.mark.parametrize("kind", ["onnxruntime", "openvino"])
def test_few_shot_memory_is_built_and_scored_on_the_runtime(tiny_backbone, exports, kind):
    reference, exported = scorer_pair(tiny_backbone, exports[kind][0], kind)
    normals = frames(3, seed=5)
    memory_ref, memory_got = reference.build_memory(normals), exported.build_memory(normals)
    assert memory_got.shape == memory_ref.shape and max_abs(memory_ref, memory_got) <= TOKENS_TOL
    batch = frames(4, seed=6)
    ref = reference.score(batch, reference.prompts.with_memory(memory_ref))
    got = exported.score(batch, reference.prompts.with_memory(memory_got))
    assert float(np.abs(ref.pred_score - got.pred_score).max()) <= SCORE_TOL
    assert map_diff(ref, got) <= MAP_TOL


def test_openvino_bf16_is_close_to_fp32(tiny_backbone, exports):
    reference, exported = scorer_pair(tiny_backbone, exports["openvino"][0], "openvino", "bf16")
    batch = frames()
    ref_tokens, got_tokens = reference.encode(batch), exported.encode(batch)
    for name in ImageTokens._fields:
        cosine = F.cosine_similarity(getattr(ref_tokens, name), getattr(got_tokens, name), dim=-1).min()
        print(f"openvino bf16 {name}: min cosine {float(cosine):.6f}")
        assert cosine >= 0.999
    ref, got = reference.score(batch), exported.score(batch)
    score_diff, maps = float(np.abs(ref.pred_score - got.pred_score).max()), map_diff(ref, got)
    print(f"openvino bf16: scores max abs {score_diff:.2e}, maps max abs {maps:.2e}")
    assert score_diff <= 5e-3 and maps <= 2e-2


@pytest.mark.parametrize("kind", ["onnxruntime", "openvino"])
def test_int8_export_stays_near_fp32(tiny_backbone, exports, kind):
    folder, manifest = exports[kind]
    assert "int8" in manifest.files and (folder / manifest.files["int8"]).is_file()
    reference, exported = scorer_pair(tiny_backbone, folder, kind, "int8")
    batch = frames()
    ref, got = reference.score(batch), exported.score(batch)
    score_diff, maps = float(np.abs(ref.pred_score - got.pred_score).max()), map_diff(ref, got)
    print(f"{kind} int8: scores max abs {score_diff:.2e}, maps max abs {maps:.2e}")
    assert score_diff <= 3e-2 and maps <= 6e-2
    assert max_abs(reference.encode(batch).cls, exported.encode(batch).cls) > 0  # really the quantised model


def test_manifest_records_what_the_worker_checks(tiny_backbone, exports):
    folder, manifest = exports["openvino"]
    data = json.loads((folder / MANIFEST_NAME).read_text())
    assert data["opset"] == 18 and data["input_size"] == list(tiny_backbone.image_size)
    assert data["mean"] == list(tiny_backbone.mean) and data["std"] == list(tiny_backbone.std)
    assert data["model"] == "hpad-tiny" and data["weights_id"] == "random-init"
    assert data["weights_label"].startswith("random weights")
    assert data["laa"] == {"enabled": True, "layers": 4, "radius": 1, "dual_path": True, "kernel": "vv",
                           "patch_mlp": False}
    depth = len(tiny_backbone.model.visual.transformer.resblocks)
    assert data["memory"] == {"blocks": list(default_memory_blocks(depth)), "path": "laa"}
    assert data["outputs"] == list(ImageTokens._fields) and data["hpad_version"]
    assert read_manifest(folder, "openvino") == manifest


@pytest.mark.parametrize("kind", ["onnxruntime", "openvino"])
def test_export_with_other_laa_settings_is_refused(tiny_backbone, tmp_path, kind):
    folder = tmp_path / kind
    export_encoder(tiny_backbone, spec(tiny_backbone, LAAConfig(radius=2)), folder, FORMAT[kind], check=False)
    with pytest.raises(ExportMismatchError, match=r"laa is .*'radius': 2.*'radius': 1") as caught:
        load_runtime(RuntimeSpec(kind, folder), tiny_backbone, spec(tiny_backbone, LAAConfig(radius=1)))
    assert caught.value.field == "laa"
    with pytest.raises(ExportMismatchError, match="laa"):
        load_runtime(RuntimeSpec(kind, folder), tiny_backbone, spec(tiny_backbone, LAAConfig(enabled=False)))
    with pytest.raises(ExportMismatchError, match="laa"):  # issue 17's options are LAA settings too
        load_runtime(RuntimeSpec(kind, folder), tiny_backbone, spec(tiny_backbone, LAAConfig(radius=2, kernel="qk")))
    with pytest.raises(ExportMismatchError, match="memory") as caught:  # other memory taps: other outputs
        load_runtime(RuntimeSpec(kind, folder), tiny_backbone, spec(tiny_backbone, LAAConfig(radius=2),
                                                                    memory_blocks=()))
    assert caught.value.field == "memory"
    load_runtime(RuntimeSpec(kind, folder), tiny_backbone, spec(tiny_backbone, LAAConfig(radius=2)))  # matches


def test_export_without_memory_taps_serves_a_scorer_matching_projected_tokens(tiny_backbone, tmp_path):
    """memory_blocks=() (the memory matches the projected patches): the graph has no memory output, the
    runtime's tokens carry None there, and scores agree with torch."""
    config = ScorerConfig(memory_blocks=())
    torch_scorer = Scorer(tiny_backbone, config=config)
    export_encoder(tiny_backbone, torch_scorer.encoder_spec, tmp_path / "e", "onnx")
    assert read_manifest(tmp_path / "e", "onnx").outputs == ["cls", "patches"]
    runtime = load_runtime(RuntimeSpec("onnxruntime", tmp_path / "e"), tiny_backbone, torch_scorer.encoder_spec)
    exported = Scorer(tiny_backbone, config=config, runtime=runtime)
    frames = [np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8) for i in range(3)]
    tokens = exported.encode(frames)
    assert tokens.memory is None
    prompts = exported.zero_shot_prompts("widget").with_memory(exported.build_memory(frames[:2]))
    got, want = exported.score(frames, prompts), torch_scorer.score(frames, prompts)
    assert np.abs(got.pred_score - want.pred_score).max() < 1e-3


def test_export_of_other_weights_is_refused(exports):
    from hpad.backbone import WeightsSpec, load_backbone

    other = load_backbone(WeightsSpec(model="hpad-tiny", random_init=True, seed=1), device="cpu")
    assert other.identity == "hpad-tiny/random-init"  # same identity: only the fingerprint tells them apart
    with pytest.raises(ExportMismatchError, match="weights_fingerprint") as caught:
        load_runtime(RuntimeSpec("openvino", exports["openvino"][0]), other, spec(other, LAAConfig()))
    assert caught.value.field == "weights_fingerprint"


def test_wrong_format_missing_files_and_old_outputs_are_refused(tiny_backbone, exports, tmp_path):
    from hpad.errors import ConfigError

    with pytest.raises(ExportMismatchError, match="holds an export in format onnx") as caught:
        load_runtime(RuntimeSpec("openvino", exports["onnxruntime"][0]), tiny_backbone, spec(tiny_backbone, LAAConfig()))
    assert caught.value.field == "format"
    with pytest.raises(ConfigError, match=r"hpad-encoder\.json is missing"):
        load_runtime(RuntimeSpec("onnxruntime", tmp_path), tiny_backbone, spec(tiny_backbone, LAAConfig()))
    folder, _ = exports["onnxruntime"]
    copy = tmp_path / "old"
    copy.mkdir()
    data = json.loads((folder / MANIFEST_NAME).read_text())
    (copy / "encoder.onnx").write_bytes((folder / "encoder.onnx").read_bytes())
    (copy / MANIFEST_NAME).write_text(json.dumps({**data, "files": {"fp32": "encoder.onnx"}, "outputs": ["cls"]}))
    with pytest.raises(ExportMismatchError, match="outputs"):  # made before ImageTokens had its present fields
        load_runtime(RuntimeSpec("onnxruntime", copy), tiny_backbone, spec(tiny_backbone, LAAConfig()))
    with pytest.raises(ConfigError, match="no int8 model"):
        data = {**data, "files": {"fp32": "encoder.onnx"}}
        (copy / MANIFEST_NAME).write_text(json.dumps(data))
        load_runtime(RuntimeSpec("onnxruntime", copy, "int8"), tiny_backbone, spec(tiny_backbone, LAAConfig()))
    (copy / "encoder.onnx").unlink()
    with pytest.raises(ConfigError, match=r"incomplete: encoder\.onnx is missing"):
        load_runtime(RuntimeSpec("onnxruntime", copy), tiny_backbone, spec(tiny_backbone, LAAConfig()))


def test_runtime_specs_and_precisions_are_validated(exports, tiny_backbone):
    from hpad.errors import ConfigError

    with pytest.raises(ConfigError, match="needs the folder"):
        RuntimeSpec("openvino")
    with pytest.raises(ConfigError, match="unknown runtime"):
        RuntimeSpec("tensorrt", exports["onnxruntime"][0])
    with pytest.raises(ConfigError, match="no int8 path"):
        RuntimeSpec("torch", precision="int8")
    with pytest.raises(ConfigError, match="no bf16"):
        load_runtime(RuntimeSpec("onnxruntime", exports["onnxruntime"][0], "bf16"), tiny_backbone, spec(tiny_backbone, LAAConfig()))
    folder, manifest = exports["onnxruntime"]
    assert isinstance(OnnxRuntimeEncoder(folder / manifest.files["fp32"], threads=1), OnnxRuntimeEncoder)
    ov_folder, ov_manifest = exports["openvino"]
    assert OpenVinoEncoder(ov_folder / ov_manifest.files["fp32"], threads=1).describe()["threads"] == 1


def test_cli_export_then_score_on_each_runtime(tiny_backbone, tmp_path, capsys):
    """`hpad export` then `hpad score --runtime ...`: the same scores as torch; a mismatched export exits 2."""
    import cv2

    from hpad.cli import main

    paths = []
    for i, picture in enumerate(frames(3, seed=9)):
        paths.append(tmp_path / f"f{i}.png")
        cv2.imwrite(str(paths[-1]), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    model = ["--model", "hpad-tiny", "--random-init", "--device", "cpu"]
    assert main(["export", "--format", "onnx", "--out", str(tmp_path / "onnx"), *model]) == 0
    exported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert exported["format"] == "onnx" and exported["laa"]["radius"] == 1
    scores = {}
    for runtime in ("torch", "onnxruntime"):
        extra = ["--runtime", runtime] + (["--runtime-model", str(tmp_path / "onnx")] if runtime != "torch" else [])
        assert main(["score", *map(str, paths), *model, "--category", "widget", *extra]) == 0
        records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
        assert [r["runtime"] for r in records] == [runtime] * len(paths)
        scores[runtime] = np.array([r["pred_score"] for r in records])
    assert np.abs(scores["torch"] - scores["onnxruntime"]).max() <= SCORE_TOL
    code = main(["score", str(paths[0]), *model, "--laa-radius", "2", "--runtime", "onnxruntime",
                 "--runtime-model", str(tmp_path / "onnx")])
    assert code == 2 and "laa is" in capsys.readouterr().err


def test_cli_eval_with_few_shot_memory_on_openvino(tmp_path, capsys):
    """`hpad eval --shots 2 --runtime openvino`: per-image scores as torch's within 1e-3, runtime recorded."""
    from hpad.cli import main
    from tests.synthetic import write_mvtec_category

    write_mvtec_category(tmp_path / "data", "widget", n_train=3, n_test_good=2, n_test_defect=2,
                         defect_types=("scratch",))
    model = ["--model", "hpad-tiny", "--random-init", "--device", "cpu"]
    assert main(["export", "--format", "openvino", "--out", str(tmp_path / "ov"), "--no-check", *model]) == 0
    scores = {}
    for runtime in ("torch", "openvino"):
        extra = ["--runtime", runtime] + (["--runtime-model", str(tmp_path / "ov")] if runtime != "torch" else [])
        out = tmp_path / runtime
        assert main(["eval", "--data", str(tmp_path / "data"), "--category", "widget", "--shots", "2", *model,
                     "--out", str(out), "--overlays", "0", *extra]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["runtime"]["runtime"] == runtime
        scores[runtime] = {image["path"]: image["pred_score"] for image in metrics["images"]}
    capsys.readouterr()
    assert scores["torch"].keys() == scores["openvino"].keys() and len(scores["torch"]) == 4
    assert max(abs(scores["torch"][k] - scores["openvino"][k]) for k in scores["torch"]) <= SCORE_TOL
