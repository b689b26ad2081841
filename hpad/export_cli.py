"""``hpad export``: the image tower with LAA as ONNX or OpenVINO IR plus its manifest (`hpad.export`).

Also the runtime flags of ``hpad score`` / ``hpad eval`` (``--runtime``, ``--runtime-model``,
``--runtime-precision``, ``--runtime-threads``) and the scorer they build (`hpad.runtime`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from hpad.backbone import Backbone
from hpad.runtime import RUNTIME_PRECISIONS, RUNTIMES, RuntimeSpec, load_runtime
from hpad.scorer import Scorer, ScorerConfig, encoder_spec


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime of the image tower")
    group.add_argument("--runtime", choices=RUNTIMES, default="torch",
                       help="torch (eager), onnxruntime or openvino (CPU; needs --runtime-model)")
    group.add_argument("--runtime-model", type=Path, help="folder made by `hpad export` (exported runtimes)")
    group.add_argument("--runtime-precision", choices=RUNTIME_PRECISIONS, default="fp32",
                       help="exported runtimes: fp32, bf16 (openvino) or int8 (an export made with --int8)")
    group.add_argument("--runtime-threads", type=int, default=0, help="runtime intra-op threads (0 = its default)")


def runtime_spec(ns: argparse.Namespace) -> RuntimeSpec:
    return RuntimeSpec(kind=ns.runtime, model_dir=ns.runtime_model, precision=ns.runtime_precision,
                       threads=ns.runtime_threads)


def scorer_with_runtime(backbone: Backbone, config: ScorerConfig, ns: argparse.Namespace) -> Scorer:
    """A scorer whose image tower runs on the runtime the flags name (torch eager by default)."""
    spec = runtime_spec(ns)
    if spec.kind == "torch":
        return Scorer(backbone, config=config)
    return Scorer(backbone, config=config, runtime=load_runtime(spec, backbone, encoder_spec(backbone, config)))


def export_main(argv: Sequence[str]) -> int:
    """Export the image tower with Locality-Aware Attention (ONNX or OpenVINO IR) plus hpad-encoder.json."""
    from hpad.commands import add_model_args, backbone_from_args, scorer_config
    from hpad.export import DEFAULT_OPSET, EXPORT_FORMATS, MANIFEST_NAME, export_encoder

    parser = argparse.ArgumentParser(prog="hpad export", description=export_main.__doc__)
    parser.add_argument("--format", choices=EXPORT_FORMATS, required=True)
    parser.add_argument("--out", type=Path, required=True, help="output folder (model files + manifest)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--int8", action="store_true",
                        help="also write an int8 model (onnx: dynamic quantisation; openvino: NNCF, calibrated "
                             "on generated frames)")
    parser.add_argument("--no-check", action="store_true", help="skip the parity check against torch eager")
    add_model_args(parser)
    ns = parser.parse_args(list(argv))
    if ns.device == "auto":
        ns.device = "cpu"  # exports are traced on the CPU in fp32
    backbone = backbone_from_args(ns)
    manifest = export_encoder(backbone, encoder_spec(backbone, scorer_config(ns)), ns.out, ns.format, opset=ns.opset, int8=ns.int8,
                              check=not ns.no_check)
    print(json.dumps({"out": str(ns.out), "manifest": str(ns.out / MANIFEST_NAME), "format": manifest.format,
                      "files": manifest.files, "opset": manifest.opset, "model": f"{manifest.model}/{manifest.weights_id}",
                      "weights": manifest.weights_label, "laa": manifest.laa, "memory": manifest.memory, "parity_max_abs": manifest.parity}))
    print(f"exported {manifest.format} encoder to {ns.out}", file=sys.stderr)
    return 0
