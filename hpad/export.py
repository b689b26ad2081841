"""Export of the image tower with Locality-Aware Attention to ONNX and OpenVINO IR, with a manifest.

What is exported: the `hpad.attention.LocalityAwareEncoder` of an `EncoderSpec` (LAA settings and memory taps,
`Scorer.encoder_spec`) on the backbone's ``visual`` tower, i.e. normalised pixels ``[B, 3, S, S]`` float32 ->
the `ImageTokens` fields it fills (``cls`` [B, D], ``patches`` [B, N, D], ``memory`` [B, N, F] when blocks are
tapped for the few-shot memory). The LAA mask is built during tracing from
the tower's grid and radius and so sits inside the graph as a constant; the batch dimension is dynamic.
Prompt embeddings (they change at every hot-swap) and the scoring math (`hpad.scorer`) stay outside: one
implementation for every runtime.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export-based; the TorchScript exporter is
deprecated since torch 2.9). OpenVINO IR is converted from that ONNX model with ``openvino.convert_model``
(weights kept fp32: ``compress_to_fp16=False``).

Optional int8 models (``int8=True``): ONNX Runtime dynamic quantization (int8 weights, activations
quantised per batch at run time; no calibration data) and, for OpenVINO, NNCF post-training static
quantisation calibrated on generated frames (`calibration_pixels`). Both are approximations of the fp32
graph; the parity tolerances of the README hold for fp32 (and bf16) only.

Next to the model, ``hpad-encoder.json`` (`EncoderManifest`) records what a runtime must match before it
serves: model and weights identity, a fingerprint of the tower's weights, input size, mean/std, patch grid,
LAA settings, memory taps, output names, opset and the hpad version. `check_manifest` refuses a mismatch with an error
that names the differing field.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpad.attention import EncoderSpec, LAAConfig
from hpad.backbone import Backbone
from hpad.errors import ConfigError

EXPORT_FORMATS = ("onnx", "openvino")
MANIFEST_NAME = "hpad-encoder.json"
MANIFEST_SCHEMA = 1
INPUT_NAME = "pixels"
DEFAULT_OPSET = 18
MODEL_FILES = {"onnx": "encoder.onnx", "openvino": "encoder.xml"}
INT8_FILES = {"onnx": "encoder.int8.onnx", "openvino": "encoder.int8.xml"}
# fields a runtime must match exactly (in this order, so the first difference is the one reported)
CHECKED_FIELDS = ("schema", "model", "weights_id", "weights_fingerprint", "input_size", "mean", "std", "grid",
                  "embed_dim", "laa", "memory", "outputs")


class ExportMismatchError(ConfigError):
    """An exported encoder does not match the scorer that would run it. ``field``: the first differing field."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class EncoderManifest:
    """``hpad-encoder.json``: how an exported image tower was made (see the module docstring)."""

    format: str
    files: dict[str, str]  # precision ("fp32", "int8") -> model file in the export folder
    opset: int
    model: str
    weights_id: str
    weights_label: str
    weights_fingerprint: str  # sha256 of the visual tower's fp32 weights (random-init seeds differ here)
    input_name: str
    input_size: list[int]  # [H, W]
    mean: list[float]
    std: list[float]
    grid: list[int]
    embed_dim: int
    laa: dict[str, Any]  # {"enabled", "layers", "radius", "dual_path", "kernel", "patch_mlp"}
    memory: dict[str, Any]  # {"blocks": tapped blocks (from 1), "path": laa | vanilla}
    outputs: list[str]  # ImageTokens fields the graph fills, in order
    hpad_version: str
    torch_version: str
    schema: int = MANIFEST_SCHEMA
    parity: dict[str, float] = field(default_factory=dict)  # max abs diff vs torch eager fp32 at export time

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def model_file(self, folder: Path, precision: str) -> Path:
        """The model file for ``precision`` (fp32 and bf16 run the fp32 graph; int8 its quantised copy)."""
        key = "fp32" if precision in ("fp32", "bf16") else precision
        if key not in self.files:
            raise ConfigError(
                f"the {self.format} export in {folder} has no {precision} model (it has: "
                f"{', '.join(sorted(self.files))}); re-export with `hpad export --format {self.format} --int8`"
                if key == "int8" else f"the {self.format} export in {folder} has no {precision} model")
        return folder / self.files[key]


def weights_fingerprint(visual: torch.nn.Module) -> str:
    """sha256 over the tower's parameter and buffer names, shapes and fp32 values (order of the state dict)."""
    digest = hashlib.sha256()
    for name, tensor in visual.state_dict().items():
        value = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(value.shape)};".encode())
        digest.update(value.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def expected_fields(backbone: Backbone, encoder: EncoderSpec, fingerprint: str | None = None) -> dict[str, Any]:
    """What a manifest must say to be served by ``backbone`` with ``encoder`` (the fields of `CHECKED_FIELDS`)."""
    return {
        "schema": MANIFEST_SCHEMA,
        "model": backbone.model_name,
        "weights_id": backbone.weights_id,
        "weights_fingerprint": fingerprint or weights_fingerprint(backbone.model.visual),
        "input_size": [int(v) for v in backbone.image_size],
        "mean": [float(v) for v in backbone.mean],
        "std": [float(v) for v in backbone.std],
        "grid": [int(v) for v in backbone.grid_size],
        "embed_dim": int(backbone.embed_dim),
        "laa": _laa_fields(encoder.laa),
        "memory": {"blocks": [int(b) for b in encoder.memory_blocks],
                   "path": encoder.memory_path if encoder.memory_blocks else "none"},
        "outputs": encoder.outputs,
    }


def _laa_fields(laa: LAAConfig) -> dict[str, Any]:
    """LAA settings as exported: with LAA off, layers and radius do not matter and are recorded as 0."""
    if not laa.enabled or laa.layers == 0:
        return {"enabled": False, "layers": 0, "radius": 0, "dual_path": False, "kernel": "none", "patch_mlp": True}
    return {"enabled": True, "layers": int(laa.layers), "radius": int(laa.radius), "dual_path": bool(laa.dual_path),
            "kernel": str(laa.kernel), "patch_mlp": bool(laa.patch_mlp)}


def check_manifest(manifest: EncoderManifest, backbone: Backbone, encoder: EncoderSpec, folder: Path | str = "",
                   fingerprint: str | None = None) -> None:
    """Refuse an export made for another model, weights, preprocessing, LAA setting, memory taps or encoder
    version."""
    expected = expected_fields(backbone, encoder, fingerprint)
    got = manifest.to_json()
    for name in CHECKED_FIELDS:
        if got.get(name) != expected[name]:
            raise ExportMismatchError(
                f"exported encoder in {folder or 'the export folder'} does not match this scorer: {name} is "
                f"{got.get(name)!r} in {MANIFEST_NAME} but {expected[name]!r} here; re-export with `hpad export` "
                "and the same model, weights and LAA settings as the scorer", field=name)


def read_manifest(folder: Path, fmt: str | None = None) -> EncoderManifest:
    """Load ``folder/hpad-encoder.json``; ``fmt``: the format the caller needs (onnx or openvino)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ConfigError(f"no exported encoder in {folder}: {MANIFEST_NAME} is missing "
                          "(make one with `hpad export --format onnx|openvino --out DIR`)")
    try:
        data = json.loads(path.read_text())
        manifest = EncoderManifest(**data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not a valid hpad encoder manifest: {exc}") from exc
    if fmt is not None and manifest.format != fmt:
        raise ExportMismatchError(f"{folder} holds an export in format {manifest.format}, but the runtime needs "
                                  f"{fmt}: export with `hpad export --format {fmt}`", field="format")
    for name in manifest.files.values():
        model_path = Path(folder) / name
        if not model_path.is_file() or (model_path.suffix == ".xml" and not model_path.with_suffix(".bin").is_file()):
            raise ConfigError(f"exported encoder in {folder} is incomplete: {name} is missing")
    return manifest


# ----------------------------------------------------------------------------------------------- export


class EncoderGraph(torch.nn.Module):
    """The traced module: pixels -> tuple of `ImageTokens` fields. A fresh `LocalityAwareEncoder` (its mask
    cache is filled during tracing, so it must not be a scorer's live one)."""

    def __init__(self, visual: torch.nn.Module, encoder: EncoderSpec) -> None:
        super().__init__()
        self.visual = visual
        self._encoder = encoder.build(visual)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(value for value in self._encoder(pixels) if value is not None)


def _check_exportable(backbone: Backbone) -> None:
    if backbone.dtype != torch.float32 or backbone.device.type != "cpu":
        raise ConfigError(f"export from fp32 weights on the CPU (got {backbone.dtype} on {backbone.device}): "
                          "use --precision fp32 --device cpu; runtimes choose bf16/int8 themselves")


def export_onnx_file(backbone: Backbone, encoder: EncoderSpec, path: Path, opset: int = DEFAULT_OPSET) -> int:
    """Write the LAA image tower as ONNX (weights in ``path.data`` beside it when large); returns the opset."""
    _check_exportable(backbone)
    graph = EncoderGraph(backbone.model.visual, encoder).eval()
    example = torch.zeros(2, 3, *backbone.image_size)  # batch 2: torch.export would specialise a batch of 1
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            graph, (example,), None, dynamo=True, input_names=[INPUT_NAME], output_names=encoder.outputs,
            dynamic_shapes={"pixels": {0: batch}}, opset_version=opset, verbose=False,
        )
    if program is None:  # pragma: no cover - dynamo=True always returns the program
        raise ConfigError("torch.onnx.export returned no program")
    program.save(str(path), external_data=_param_bytes(backbone.model.visual) > (1 << 30))
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def calibration_pixels(backbone: Backbone, count: int = 16, seed: int = 0) -> np.ndarray:
    """Normalised [count, 3, S, S] float32 pixels of generated product-like frames (for int8 calibration)."""
    rng = np.random.default_rng(seed)
    size = backbone.image_size
    ys, xs = np.mgrid[0 : size[0], 0 : size[1]]
    frames = []
    for _ in range(count):
        base = rng.uniform(40, 200, 3)
        cy, cx, r = rng.uniform(0.3, 0.7) * size[0], rng.uniform(0.3, 0.7) * size[1], rng.uniform(0.15, 0.35) * size[0]
        inside = ((ys - cy) ** 2 + (xs - cx) ** 2) < r * r
        img = np.broadcast_to(base, (*size, 3)).copy()
        img[inside] = rng.uniform(40, 230, 3)
        img += rng.normal(0, 8, img.shape)
        frames.append(np.clip(img, 0, 255) / 255.0)
    pixels = np.stack(frames).transpose(0, 3, 1, 2)
    mean = np.asarray(backbone.mean).reshape(1, 3, 1, 1)
    std = np.asarray(backbone.std).reshape(1, 3, 1, 1)
    return ((pixels - mean) / std).astype(np.float32)


def export_encoder(backbone: Backbone, encoder: EncoderSpec, out: Path, fmt: str, opset: int = DEFAULT_OPSET,
                   int8: bool = False, check: bool = True) -> EncoderManifest:
    """Export the LAA image tower of ``backbone`` in ``fmt`` (onnx / openvino) to folder ``out`` + manifest.

    ``check``: run the exported fp32 model once on calibration frames and record its max abs difference
    from torch eager fp32 in the manifest (``parity``).
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    _check_exportable(backbone)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # a half-written export is never taken for a whole one
    files = {"fp32": MODEL_FILES[fmt]}
    with tempfile.TemporaryDirectory(prefix="hpad-export-") as tmp:
        onnx_path = (out if fmt == "onnx" else Path(tmp)) / "encoder.onnx"
        opset_used = export_onnx_file(backbone, encoder, onnx_path, opset)
        if fmt == "onnx":
            if int8:
                _quantize_onnx(onnx_path, out / INT8_FILES["onnx"])
                files["int8"] = INT8_FILES["onnx"]
        else:
            import openvino as ov

            model = ov.convert_model(str(onnx_path))
            ov.save_model(model, str(out / MODEL_FILES["openvino"]), compress_to_fp16=False)
            if int8:
                _quantize_openvino(model, calibration_pixels(backbone), out / INT8_FILES["openvino"])
                files["int8"] = INT8_FILES["openvino"]
    if fmt == "onnx" and (out / "encoder.onnx.data").is_file():
        files["fp32_data"] = "encoder.onnx.data"
    fingerprint = weights_fingerprint(backbone.model.visual)
    fields = expected_fields(backbone, encoder, fingerprint)
    from hpad import __version__

    manifest = EncoderManifest(
        format=fmt, files=files, opset=opset_used, weights_label=backbone.weights_label, input_name=INPUT_NAME,
        hpad_version=__version__, torch_version=torch.__version__,
        **{k: v for k, v in fields.items() if k != "schema"},
    )
    if check:
        manifest = EncoderManifest(**{**manifest.to_json(), "parity": _parity(manifest, out, backbone, encoder)})
    (out / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest


def _parity(manifest: EncoderManifest, out: Path, backbone: Backbone, encoder: EncoderSpec) -> dict[str, float]:
    """Max abs difference of each output of the exported fp32 model from torch eager fp32 (4 frames)."""
    from hpad.runtime import RuntimeSpec, load_exported

    pixels = torch.from_numpy(calibration_pixels(backbone, count=4, seed=1))
    runtime = load_exported(RuntimeSpec(kind=_RUNTIME_OF[manifest.format], model_dir=out), manifest, out)
    with torch.inference_mode():
        ref = encoder.build(backbone.model.visual)(pixels)
        got = runtime(pixels)
    return {name: float((getattr(got, name).float() - getattr(ref, name).float()).abs().max())
            for name in encoder.outputs}


_RUNTIME_OF = {"onnx": "onnxruntime", "openvino": "openvino"}


def _quantize_onnx(src: Path, dst: Path) -> None:
    """ONNX Runtime dynamic quantisation: int8 weights of MatMul/Gemm, activations quantised at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])


def _quantize_openvino(model: Any, pixels: np.ndarray, dst: Path) -> None:
    """NNCF post-training static int8 quantisation (transformer preset) calibrated on ``pixels``."""
    try:
        import nncf
    except ImportError as exc:
        raise ConfigError("OpenVINO int8 needs NNCF: pip install 'hpad[export]' (nncf)") from exc
    import openvino as ov

    dataset = nncf.Dataset([pixels[i : i + 1] for i in range(len(pixels))])
    quantized = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(pixels))
    ov.save_model(quantized, str(dst), compress_to_fp16=False)
