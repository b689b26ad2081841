"""Library commands of the ``hpad`` CLI: ``score``, ``eval``, ``train``, ``weights``; shared model flags.

Argument parsing and file output only; the work is done by `hpad.scorer`, `hpad.evaluate`, `hpad.training`
and friends. The command table is `hpad.cli.LIBRARY_COMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from hpad import config as model_config
from hpad.attention import LAAConfig
from hpad.backbone import Backbone, WeightsSpec, load_backbone
from hpad.defaults import DEFAULT_MODEL
from hpad.export_cli import add_runtime_args, scorer_with_runtime
from hpad.scorer import Scorer, ScorerConfig


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model / --pretrained / --checkpoint / --random-init and scoring options, shared by every command."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL, help=f"open_clip architecture (default {DEFAULT_MODEL})")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--pretrained", help="open_clip pretrained tag, e.g. laion400m_e32")
    source.add_argument("--checkpoint", type=Path, help="local open_clip checkpoint (.safetensors/.pt)")
    source.add_argument("--random-init", action="store_true", help="random weights (tests/benchmarks only)")
    group.add_argument("--cache-dir", type=Path, help="where pretrained weights are cached")
    group.add_argument("--allow-download", action="store_true", help="let a pretrained tag download weights")
    group.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    group.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    group.add_argument("--seed", type=int, default=0, help="seed (random init, k-shot sampling, training)")
    group.add_argument("--no-laa", action="store_true", help="disable Locality-Aware Attention")
    group.add_argument("--laa-layers", type=int, default=LAAConfig().layers, help="LAA in the last N blocks")
    group.add_argument("--laa-radius", type=int, default=LAAConfig().radius, help="LAA window radius (1 = 3x3)")
    group.add_argument("--sigma", type=float, default=ScorerConfig().sigma, help="map smoothing, px")
    method = parser.add_argument_group("method choices (recorded in artifacts; the scorer must match them)")
    method.add_argument("--no-dual-path", action="store_true",
                        help="ablation: one path (the class token reads LAA-changed patches)")
    method.add_argument("--laa-kernel", choices=["vv", "qk"], default=LAAConfig().kernel,
                        help="LAA path attention: vv (CLIP Surgery) or qk (CLIP's own)")
    method.add_argument("--laa-patch-mlp", action="store_true", help="run the block MLP on the LAA path")
    method.add_argument("--memory-blocks", default="auto",
                        help="memory features: auto (blocks 3,8 of 12, scaled), final (projected tokens), or 3,8")
    method.add_argument("--memory-path", choices=["laa", "vanilla"], default=ScorerConfig().memory_path)
    method.add_argument("--fusion", choices=["harmonic", "normalized", "linear"], default=ScorerConfig().fusion)
    method.add_argument("--memory-weight", type=float, default=ScorerConfig().memory_weight)
    method.add_argument("--logit-scale", type=float, default=None, help="text softmax scale (default: the model's)")
    group.add_argument("--batch-size", type=int, default=8)


def add_tiling_args(parser: argparse.ArgumentParser) -> None:
    """ROI-less tiling of large images, with the service's defaults (HPAD_TILING, ... in `hpad serve`)."""
    from hpad.tiling import TilingPolicy

    d = TilingPolicy()
    group = parser.add_argument_group("tiling of large images (as hpad serve scores them)")
    group.add_argument("--tiling", default=d.default.describe(), help="auto (tiles at the model's input size above "
                       "--tile-min-pixels), off, or COLSxROWS[@OVERLAP]")
    group.add_argument("--tile-overlap", type=float, default=d.overlap, help="fraction shared with a neighbour tile")
    group.add_argument("--tile-min-pixels", type=int, default=d.min_pixels, help="auto scores images up to this "
                       "many pixels whole")
    group.add_argument("--max-tiles", type=int, default=d.max_tiles, help="most tiles an image is cut into")


def tiling_policy(ns: argparse.Namespace):
    from hpad.tiling import TileSpec, TilingPolicy

    return TilingPolicy(TileSpec.parse(ns.tiling), ns.tile_overlap, ns.tile_min_pixels, ns.max_tiles)


def weights_spec(ns: argparse.Namespace) -> WeightsSpec:
    return model_config.weights_spec(model=ns.model, pretrained=ns.pretrained, checkpoint=ns.checkpoint,
                                     random_init=ns.random_init, cache_dir=ns.cache_dir,
                                     allow_download=ns.allow_download, seed=ns.seed)


def scorer_config(ns: argparse.Namespace) -> ScorerConfig:
    return model_config.scorer_config(
        laa=not ns.no_laa, laa_layers=ns.laa_layers, laa_radius=ns.laa_radius, sigma=ns.sigma,
        max_batch=ns.batch_size, dual_path=not ns.no_dual_path, kernel=ns.laa_kernel, patch_mlp=ns.laa_patch_mlp,
        memory_blocks=ns.memory_blocks, memory_path=ns.memory_path, fusion=ns.fusion,
        memory_weight=ns.memory_weight, logit_scale=ns.logit_scale)


def backbone_from_args(ns: argparse.Namespace) -> Backbone:
    return load_backbone(weights_spec(ns), device=ns.device, precision=ns.precision)


def score_main(argv: Sequence[str]) -> int:
    """Score image files; prints one JSON line per image."""
    from hpad.data import read_image
    from hpad.masks import encode_mask_png
    from hpad.tiled_scoring import score_frames
    from hpad.tiling import plan_tiles

    parser = argparse.ArgumentParser(prog="hpad score", description=score_main.__doc__)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--category", default="object", help="object name for the zero-shot prompts")
    parser.add_argument("--prompts", type=Path, help="prompt artifact (from hpad train) instead of zero-shot")
    parser.add_argument("--mask-out", type=Path, help="write <stem>_mask.png (binary) and <stem>_map.png here")
    add_model_args(parser)
    add_tiling_args(parser)
    add_runtime_args(parser)
    ns = parser.parse_args(list(argv))
    policy = tiling_policy(ns)
    backbone = backbone_from_args(ns)
    scorer = scorer_with_runtime(backbone, scorer_config(ns), ns)
    prompts = load_prompts_or_zero_shot(scorer, ns.prompts, ns.category)
    if ns.mask_out:
        ns.mask_out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(ns.images), ns.batch_size):
        paths = ns.images[start : start + ns.batch_size]
        frames = [read_image(path) for path in paths]
        plans = [plan_tiles(f.shape[:2], backbone.image_size, None, None, policy) for f in frames]
        result = score_frames(scorer, frames, prompts, plans=plans)
        for path, score, amap, tiles in zip(paths, result.pred_score, result.anomaly_maps(), result.tiles, strict=True):
            record = {
                "image": str(path),
                "pred_score": round(float(score), 6),
                "tiles": tiles,
                "pred_label": int(score >= prompts.threshold),
                "threshold": prompts.threshold,
                "prompts": prompts.label(),
                "model": backbone.identity,
                "weights": backbone.weights_label,
                "runtime": scorer.runtime.name,
            }
            if ns.mask_out:
                mask_path = ns.mask_out / f"{path.stem}_mask.png"
                mask_path.write_bytes(encode_mask_png(amap >= prompts.pixel_threshold))
                map_path = ns.mask_out / f"{path.stem}_map.png"
                map_path.write_bytes(encode_map_png(amap))
                record["mask"] = str(mask_path)
            print(json.dumps(record), flush=True)
    return 0


def encode_map_png(amap) -> bytes:
    import cv2
    import numpy as np

    ok, buf = cv2.imencode(".png", (np.clip(amap, 0, 1) * 255).astype(np.uint8))
    if not ok:  # pragma: no cover - cv2 always encodes uint8 2-D arrays
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def load_prompts_or_zero_shot(scorer: Scorer, artifact: Path | None, category: str):
    if artifact is None:
        return scorer.zero_shot_prompts(category)
    from hpad.artifact import load_prompt_artifact

    return scorer.check_prompts(load_prompt_artifact(artifact, expected_identity=scorer.backbone.identity))


def weights_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="hpad weights", description="fetch: download an open_clip tag")
    parser.add_argument("action", choices=["fetch"])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    ns = parser.parse_args(list(argv))
    spec = WeightsSpec(model=ns.model, pretrained=ns.pretrained, cache_dir=ns.cache_dir, allow_download=True)
    backbone = load_backbone(spec, device="cpu")
    print(f"weights for {backbone.identity} are in {ns.cache_dir}", file=sys.stderr)
    return 0


def eval_main(argv: Sequence[str]) -> int:
    """Evaluate on an MVTec-layout category: metrics.json, metrics.md, overlays."""
    from tqdm import tqdm

    from hpad.data import load_category, read_image, sample_shots
    from hpad.evaluate import markdown_table, run_evaluation, write_report

    parser = argparse.ArgumentParser(prog="hpad eval", description=eval_main.__doc__)
    parser.add_argument("--data", type=Path, required=True, help="dataset root (MVTec layout)")
    parser.add_argument("--category", required=True)
    parser.add_argument("--shots", type=int, default=0,
                        help="k normal train images as few-shot memory (0: none, or the artifact's own)")
    parser.add_argument("--prompts", type=Path, help="prompt artifact from `hpad train` (default: zero-shot)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--overlays", type=int, default=8, help="overlay PNGs of the worst-scored images")
    add_model_args(parser)
    add_runtime_args(parser)
    ns = parser.parse_args(list(argv))
    data = load_category(ns.data, ns.category)
    backbone = backbone_from_args(ns)
    scorer = scorer_with_runtime(backbone, scorer_config(ns), ns)
    prompts = load_prompts_or_zero_shot(scorer, ns.prompts, ns.category)
    shots: list[Path] = []
    if ns.shots > 0:
        shots = sample_shots(data.train, ns.shots, ns.seed)
        prompts = prompts.with_memory(*scorer.memory_with_scales([read_image(p) for p in shots], prompts))
    with tqdm(total=len(data.test), desc=f"eval {ns.category}", unit="img", disable=None) as bar:
        report = run_evaluation(scorer, data, prompts, ns.batch_size, progress=bar.update)
    report.info.update({"shots": ns.shots, "shot_images": [str(p) for p in shots], "seed": ns.seed,
                        "data": str(ns.data), "runtime": scorer.runtime.describe()})
    write_report(report, ns.out, ns.overlays)
    print(markdown_table(report))
    print(f"wrote {ns.out / 'metrics.json'}, {ns.out / 'metrics.md'} and {ns.out / 'overlays'}", file=sys.stderr)
    return 0


def add_train_args(parser: argparse.ArgumentParser) -> None:
    from hpad.mpts import TrainConfig

    d = TrainConfig()
    group = parser.add_argument_group("training (MPTS + OAGM)")
    group.add_argument("--n-ctx", type=int, default=d.n_ctx, help="learnable context tokens per class")
    group.add_argument("--class-name", default=None,
                       help="class token after the context (default: the category; '' for none)")
    group.add_argument("--epochs", type=int, default=d.epochs)
    group.add_argument("--steps-per-epoch", type=int, default=d.steps_per_epoch)
    group.add_argument("--train-batch", type=int, default=d.batch_size, help="examples per step")
    group.add_argument("--lr", type=float, default=d.lr)
    group.add_argument("--optimizer", choices=["adamw", "sgd"], default=d.optimizer,
                       help="sgd (ProGrad: momentum 0.9, weight decay 5e-4) or adamw")
    group.add_argument("--schedule", choices=["cosine", "constant"], default=d.schedule,
                       help="cosine after one warm-up epoch at 1e-5 (ProGrad), or constant")
    group.add_argument("--selection", choices=["served", "loss"], default=d.selection,
                       help="keep the epoch with the best served AUROC - FPR on held-out normals, or lowest loss")
    group.add_argument("--orientation", choices=["auto", "on", "off"], default=d.orientation,
                       help="flip/rot90 views: auto = textures only")
    group.add_argument("--lam", type=float, default=d.lam, help="MPTS guidance weight (1 = full projection)")
    group.add_argument("--patience", type=int, default=d.patience, help="early-stop patience in epochs")
    group.add_argument("--train-normals", type=int, default=d.train_normals)
    group.add_argument("--train-anomalies", type=int, default=d.train_anomalies)
    group.add_argument("--no-mpts", action="store_true", help="ablation: plain gradient, no meta guidance")
    group.add_argument("--no-oagm", action="store_true", help="ablation: synthesize anywhere in the frame")
    group.add_argument("--no-memory", action="store_true", help="do not store few-shot memory")
    group.add_argument("--threshold-rule", choices=["f1", "quantile"], default=d.threshold_rule)
    group.add_argument("--normal-quantile", type=float, default=d.normal_quantile)


def train_config(ns: argparse.Namespace):
    from hpad.mpts import TrainConfig
    from hpad.oagm import OAGMConfig

    return TrainConfig(
        n_ctx=ns.n_ctx, class_name=ns.class_name, epochs=ns.epochs, steps_per_epoch=ns.steps_per_epoch,
        batch_size=ns.train_batch, lr=ns.lr, optimizer=ns.optimizer, seed=ns.seed, lam=ns.lam,
        schedule=ns.schedule, selection=ns.selection, orientation=ns.orientation,
        patience=ns.patience, train_normals=ns.train_normals, train_anomalies=ns.train_anomalies,
        mpts=not ns.no_mpts, memory=not ns.no_memory, threshold_rule=ns.threshold_rule,
        normal_quantile=ns.normal_quantile, oagm=OAGMConfig(on_object=not ns.no_oagm),
    )


def train_main(argv: Sequence[str]) -> int:
    """Learn human-free prompts from k normal images (OAGM + MPTS) -> artifact."""
    from tqdm import tqdm

    from hpad.artifact import save_artifact
    from hpad.data import load_category, read_image, sample_shots
    from hpad.training import build_artifact, train

    parser = argparse.ArgumentParser(prog="hpad train", description=train_main.__doc__)
    parser.add_argument("--data", type=Path, required=True, help="dataset root (MVTec layout)")
    parser.add_argument("--category", required=True)
    parser.add_argument("--shots", type=int, required=True, help="k normal images (1, 2, 4 in the protocol)")
    parser.add_argument("--out", type=Path, required=True, help="prompt artifact to write (.safetensors)")
    parser.add_argument("--version", type=int, default=1, help="prompt version stored in the artifact")
    add_model_args(parser)
    add_train_args(parser)
    add_tiling_args(parser)
    ns = parser.parse_args(list(argv))
    config = train_config(ns)
    policy = tiling_policy(ns)
    data = load_category(ns.data, ns.category)
    shots = sample_shots(data.train, ns.shots, ns.seed)
    backbone = backbone_from_args(ns)
    scorer = Scorer(backbone, config=scorer_config(ns))
    normals = [read_image(p) for p in shots]
    with tqdm(total=config.epochs, desc=f"train {ns.category} k={ns.shots}", unit="epoch", disable=None) as bar:
        def progress(epoch: int, record: dict[str, float]) -> None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", val=f"{record['val_loss']:.4f}")
            bar.update(1)

        result = train(scorer, normals, ns.category, config, progress=progress, tiling=policy)
    data_bytes = build_artifact(result, k=ns.shots, image_size=backbone.image_size, version=ns.version,
                                extra={"shots": [str(p) for p in shots]})
    save_artifact(ns.out, data_bytes)
    summary = {"artifact": str(ns.out), "bytes": len(data_bytes), "category": ns.category, "k": ns.shots,
               "model": backbone.identity, "weights": backbone.weights_label, **result.metrics.to_json(),
               "threshold": result.prompts.threshold, "pixel_threshold": result.prompts.pixel_threshold}
    print(json.dumps(summary, indent=2))
    return 0
