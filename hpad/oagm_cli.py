"""``hpad oagm``: contact sheet of OAGM object regions and synthetic anomalies for k normal images of a category.

Shows, per row: the normal image | the object mask OAGM derived (kind, coverage, score) | a synthetic anomaly
| its exact mask. Prints one JSON line per normal image (region kind, coverage, score, reason, generators).
Use it to check that anomalies land on the object before training (`hpad train`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from hpad.errors import ConfigError


def oagm_main(argv: Sequence[str]) -> int:
    from hpad.commands import add_model_args, backbone_from_args, scorer_config
    from hpad.data import load_category, read_image, sample_shots
    from hpad.oagm import OAGMConfig, SheetRow, object_masks, render_sheet, synthesize
    from hpad.scorer import Scorer

    parser = argparse.ArgumentParser(prog="hpad oagm", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="dataset root (MVTec layout)")
    parser.add_argument("--category", required=True)
    parser.add_argument("--out", type=Path, required=True, help="PNG contact sheet to write")
    parser.add_argument("--shots", type=int, default=4, help="k normal train/good images (default 4)")
    parser.add_argument("--per-image", type=int, default=2, help="synthetic anomalies per normal image")
    parser.add_argument("--no-oagm", action="store_true", help="ablation: place anomalies anywhere in the frame")
    parser.add_argument("--cell", type=int, default=224, help="sheet cell size in px")
    add_model_args(parser)
    ns = parser.parse_args(list(argv))
    if ns.per_image < 1:
        raise ConfigError(f"--per-image must be >= 1, got {ns.per_image}")
    if ns.out.suffix.lower() != ".png":
        raise ConfigError(f"--out must be a .png file, got {ns.out}")

    data = load_category(ns.data, ns.category)
    shots = sample_shots(data.train, ns.shots, ns.seed)
    backbone = backbone_from_args(ns)
    scorer = Scorer(backbone, config=scorer_config(ns))
    config = OAGMConfig(on_object=not ns.no_oagm)
    images = [read_image(path) for path in shots]
    regions = object_masks(scorer, images, config)

    rng = np.random.default_rng(ns.seed)
    rows: list[SheetRow] = []
    for path, image, region in zip(shots, images, regions, strict=True):
        synthetics = [synthesize(rng, image, region, config) for _ in range(ns.per_image)]
        rows += [SheetRow(image, region, syn, title=path.name) for syn in synthetics]
        print(json.dumps({
            "image": str(path), "region": region.kind, "coverage": round(region.fraction, 4),
            "score": round(region.score, 4), "reason": region.reason,
            "generators": [s.generator for s in synthetics],
            "anomaly_pixels": [int(s.mask.sum()) for s in synthetics],
        }), flush=True)

    title = f"OAGM {data.name} k={len(shots)} seed={ns.seed} model={backbone.identity}"
    title += "" if config.on_object else " | --no-oagm: anywhere in the frame"
    if backbone.random_weights:
        title += " | RANDOM WEIGHTS: object masks come from an untrained model"
    sheet = render_sheet(rows, cell=ns.cell, title=title)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - cv2 encodes any uint8 RGB image
        raise RuntimeError("PNG encoding of the contact sheet failed")
    ns.out.write_bytes(buf.tobytes())
    weights_note = backbone.weights_label
    if backbone.random_weights:
        weights_note = ("random weights: the object masks come from a random-init model "
                        "(its features and the colour cue), not from a pretrained CLIP")
    print(f"wrote {ns.out} ({len(rows)} rows); model {backbone.identity}; {weights_note}", file=sys.stderr)
    return 0
