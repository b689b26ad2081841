"""Image-encoder runtimes: what runs the image tower with LAA for a `hpad.scorer.Scorer`.

A runtime is a callable ``pixels [B, 3, S, S] (normalised, on the scorer's device) -> ImageTokens``; the
scorer's preprocessing, prompt scoring, few-shot memory, maps and masks are the same for every runtime (they
run in torch around it), and so are batching, hot-swap and events in the service above it.

* `TorchEncoder` - PyTorch eager (`hpad.attention.LocalityAwareEncoder`), in the backbone's precision.
* `OnnxRuntimeEncoder` - ONNX Runtime's CPU execution provider on an ``hpad export --format onnx`` folder:
  fp32, or int8 (dynamic quantisation, exported with ``--int8``). ONNX Runtime's CPU provider has no bf16
  kernels for this graph, so bf16 is refused.
* `OpenVinoEncoder` - OpenVINO's CPU plugin on an ``hpad export --format openvino`` folder: fp32, bf16 (the
  plugin's inference-precision hint; needs a CPU with bf16 support) or int8 (NNCF, exported with ``--int8``).

Exported runtimes read the folder's manifest (`hpad.export.EncoderManifest`) and refuse one made for another
model, weights, input size, mean/std or LAA setting before they serve. Outputs are matched to the fields
of `ImageTokens` by name, so a new field of the encoder needs a new export (the manifest's ``outputs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from hpad.attention import EncoderSpec, ImageTokens, LocalityAwareEncoder
from hpad.backbone import Backbone
from hpad.errors import ConfigError

RUNTIMES = ("torch", "onnxruntime", "openvino")
RUNTIME_PRECISIONS = ("fp32", "bf16", "int8")
FORMAT_OF = {"onnxruntime": "onnx", "openvino": "openvino"}


@dataclass(frozen=True)
class RuntimeSpec:
    """Which runtime runs the image tower. ``model_dir``: an ``hpad export`` folder (exported runtimes);
    ``precision``: fp32 / bf16 / int8 for exported runtimes (torch runs in the backbone's precision);
    ``threads``: intra-op threads of the runtime (0 = its default)."""

    kind: str = "torch"
    model_dir: Path | None = None
    precision: str = "fp32"
    threads: int = 0

    def __post_init__(self) -> None:
        if self.kind not in RUNTIMES:
            raise ConfigError(f"unknown runtime {self.kind!r}; use one of {', '.join(RUNTIMES)}")
        if self.precision not in RUNTIME_PRECISIONS:
            raise ConfigError(f"unknown runtime precision {self.precision!r}; use one of "
                              f"{', '.join(RUNTIME_PRECISIONS)}")
        if self.threads < 0:
            raise ConfigError(f"runtime threads must be >= 0, got {self.threads}")
        if self.kind != "torch" and self.model_dir is None:
            raise ConfigError(f"runtime {self.kind} needs the folder of an exported encoder (--runtime-model DIR / "
                              f"HPAD_RUNTIME_MODEL), made with `hpad export --format {FORMAT_OF[self.kind]}`")
        if self.kind == "torch" and self.precision == "int8":
            raise ConfigError("the torch runtime has no int8 path; use --runtime onnxruntime or openvino for int8")


class ImageEncoderRuntime(Protocol):
    """pixels [B, 3, S, S] -> ImageTokens (float tensors on the pixels' device or the CPU)."""

    name: str
    precision: str

    def __call__(self, pixels: torch.Tensor) -> ImageTokens: ...

    def describe(self) -> dict[str, Any]: ...


class TorchEncoder:
    """PyTorch eager: the LAA encoder itself, in the backbone's dtype and device."""

    name = "torch"

    def __init__(self, encoder: LocalityAwareEncoder) -> None:
        self.encoder = encoder
        dtype = next(encoder.visual.parameters()).dtype
        self.precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))

    def __call__(self, pixels: torch.Tensor) -> ImageTokens:
        return self.encoder(pixels)

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.name, "precision": self.precision, "threads": torch.get_num_threads()}


def _require(module: str):
    """Import an optional runtime package, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"runtime needs the Python package {module!r}: pip install 'hpad[export]' ({exc})") from exc


def _host_pixels(pixels: torch.Tensor) -> np.ndarray:
    return pixels.detach().to("cpu", torch.float32).contiguous().numpy()


def _tokens(names: list[str], arrays: list[np.ndarray]) -> ImageTokens:
    by_name = dict(zip(names, arrays, strict=True))
    return ImageTokens(**{name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in by_name.items()
                          if name in ImageTokens._fields})


def _check_outputs(found: list[str], path: Path) -> None:
    missing = [name for name in ImageTokens._fields if name not in found and name != "memory"]  # manifest: memory
    if missing:
        raise ConfigError(f"exported encoder {path} lacks outputs {missing} of this hpad's ImageTokens "
                          f"(it has {found}); re-export it with `hpad export`")


class OnnxRuntimeEncoder:
    """ONNX Runtime, CPU execution provider (fp32 graph, or its int8 dynamically quantised copy)."""

    name = "onnxruntime"

    def __init__(self, path: Path, precision: str = "fp32", threads: int = 0) -> None:
        if precision == "bf16":
            raise ConfigError("ONNX Runtime's CPU provider has no bf16 path for this model; use "
                              "HPAD_RUNTIME_PRECISION=fp32 or int8, or HPAD_RUNTIME=openvino for bf16")
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.path, self.precision, self.threads = Path(path), precision, threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        _check_outputs(self.output_names, self.path)

    def __call__(self, pixels: torch.Tensor) -> ImageTokens:
        arrays = self.session.run(self.output_names, {self.input_name: _host_pixels(pixels)})
        return _tokens(self.output_names, arrays)

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.name, "precision": self.precision, "threads": self.threads, "model": str(self.path)}


class OpenVinoEncoder:
    """OpenVINO CPU plugin (fp32 graph with an f32 or bf16 inference-precision hint, or the NNCF int8 model)."""

    name = "openvino"

    def __init__(self, path: Path, precision: str = "fp32", threads: int = 0) -> None:
        ov = _require("openvino")
        core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise ConfigError("this CPU has no bf16 support in OpenVINO (OPTIMIZATION_CAPABILITIES lacks BF16); "
                              "use HPAD_RUNTIME_PRECISION=fp32 or int8")
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY",
                                  "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.path, self.precision, self.threads = Path(path), precision, threads
        self.compiled = core.compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.output_names = [port.get_any_name() for port in self.compiled.outputs]
        _check_outputs(self.output_names, self.path)

    def __call__(self, pixels: torch.Tensor) -> ImageTokens:
        result = self.request.infer({0: _host_pixels(pixels)})
        arrays = [np.array(result[port], copy=True) for port in self.compiled.outputs]
        return _tokens(self.output_names, arrays)

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.name, "precision": self.precision, "threads": self.threads, "model": str(self.path)}


def load_exported(spec: RuntimeSpec, manifest: Any, folder: Path) -> ImageEncoderRuntime:
    """The runtime of ``spec`` on the model file of ``manifest`` for ``spec.precision`` (no identity check)."""
    path = manifest.model_file(Path(folder), spec.precision)
    if spec.kind == "onnxruntime":
        return OnnxRuntimeEncoder(path, spec.precision, spec.threads)
    if spec.kind == "openvino":
        return OpenVinoEncoder(path, spec.precision, spec.threads)
    raise ConfigError(f"runtime {spec.kind} does not run exported models")


def load_runtime(spec: RuntimeSpec, backbone: Backbone, encoder: EncoderSpec, release_tower: bool = False
                 ) -> ImageEncoderRuntime:
    """The image-encoder runtime of ``spec`` for ``backbone`` with ``encoder``; an exported one only after its
    manifest matched the backbone and the LAA settings (`hpad.export.check_manifest`).

    ``release_tower``: for an exported runtime, free the torch image tower's weights (`release_torch_tower`)
    between the check and loading the runtime, so the two copies of the tower are never resident together."""
    if spec.kind == "torch":
        return TorchEncoder(encoder.build(backbone.model.visual))
    from hpad.export import check_manifest, read_manifest

    if backbone.device.type != "cpu":
        raise ConfigError(f"runtime {spec.kind} runs on the CPU; load the model with --device cpu (HPAD_DEVICE=cpu)")
    if backbone.dtype != torch.float32:
        raise ConfigError(f"runtime {spec.kind} is checked against the fp32 weights: load the model with "
                          "--precision fp32 (HPAD_PRECISION=fp32) and choose the runtime's precision with "
                          "--runtime-precision (HPAD_RUNTIME_PRECISION)")
    assert spec.model_dir is not None
    folder = Path(spec.model_dir)
    manifest = read_manifest(folder, FORMAT_OF[spec.kind])
    check_manifest(manifest, backbone, encoder, folder)
    if release_tower:
        release_torch_tower(backbone)
    return load_exported(spec, manifest, folder)


def release_torch_tower(backbone: Backbone) -> None:
    """Free the torch image tower's weights (moved to the ``meta`` device) once an exported runtime serves:
    the text tower stays for zero-shot prompts. The scorer's torch encoder (`Scorer.encoder`) and anything
    that runs it (OAGM region proposals in training) cannot be used afterwards."""
    backbone.model.visual.to("meta")
    try:  # glibc keeps freed heap pages resident until trimmed (the tower's tensors may live on the heap)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
