"""Operator feedback the tuner learns from (``hpad.feedback``, written by ``hpad console``).

Each record (``consumers/schemas/feedback.schema.json``) carries one verdict on one scored frame **and the
frame itself** (base64), so the tuner needs no other topic: the frames topic may have expired long before an
operator looks, and the console holds the bytes anyway.

* ``false_alarm``: the frame joins the verified-normal pool of its category and counts towards the next run.
* ``real_defect``: the frame joins the real-anomaly validation set: the gate scores it beside the OAGM
  anomalies (image level; operators give no pixel mask), and the candidate's threshold may be lowered so it
  is caught (`hpad.calibration.lower_threshold_for_defects`).

**Cap** (so one operator cannot silence a camera, or make it flag everything): per camera and operator, a
run admits at most ``floor(share * B)`` false alarms, newest first, where B is the number of other normals
(scorer samples and verified frames) in the run; feedback alone never tunes a category (B = 0 admits none).
Real defects: at most ``defects_per_operator`` per camera and operator, and the threshold they pull down
moves by at most ``max_threshold_drop``; they can only lower it (fewer false negatives), never raise it.
What is held back stays stored and is admitted when the pool grows.

On disk, beside the reservoir: ``<root>/<category>/feedback/<seq:012d>_<verdict>.png`` with a ``.json``
of the same name (camera, operator, frame id, feedback id, ...); one verdict per frame and operator (a newer
one replaces the older); at most ``max_per_verdict`` per category and verdict, oldest deleted first.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from consumers.contract import FrameMeta, parse_content_type
from hpad.errors import FrameError
from hpad.io import atomic_write_bytes, atomic_write_text
from tuner.reservoir import ReservoirWriteError, check_category

log = logging.getLogger(__name__)
VERDICTS = ("false_alarm", "real_defect")
_NAME = re.compile(r"^(\d{12})_(false_alarm|real_defect)\.json$")


@dataclass(frozen=True)
class FeedbackRef:
    category: str
    verdict: str
    seq: int
    frame_id: str
    camera_id: str
    operator: str
    feedback_id: str
    given_at: str
    path: Path  # the PNG; its metadata sits beside it as .json


def parse_feedback(value: bytes | None) -> tuple[dict[str, Any], FrameMeta, bytes]:
    """A feedback record -> (record, frame meta, frame bytes); FrameError(``bad_feedback``) when malformed."""
    def bad(why: str) -> FrameError:
        return FrameError("bad_feedback", f"feedback record refused: {why}")

    try:
        record = json.loads(value or b"")
    except ValueError:
        raise bad("not JSON") from None
    if not isinstance(record, dict) or record.get("schema_version") != 1:
        raise bad("not a schema_version 1 object")
    if record.get("verdict") not in VERDICTS:
        raise bad(f"verdict must be one of {VERDICTS}")
    for name in ("frame_id", "camera_id", "category", "operator", "feedback_id"):
        if not isinstance(record.get(name), str) or not record[name]:
            raise bad(f"{name} is missing")
    frame = record.get("frame")
    if not isinstance(frame, dict) or frame.get("encoding") != "base64" or not isinstance(frame.get("data"), str):
        raise bad("frame (base64) is missing")
    try:
        data = base64.b64decode(frame["data"], validate=True)
    except (binascii.Error, ValueError):
        raise bad("frame data is not base64") from None
    if hashlib.sha256(data).hexdigest() != frame.get("sha256"):
        raise bad("frame sha256 does not match its bytes")
    content_type = parse_content_type(str(frame.get("content_type") or ""))
    meta = FrameMeta(record["frame_id"], record["camera_id"], record["category"], content_type, None)
    return record, meta, data


def admit_false_alarms(newest_first: list[FeedbackRef], others: int, share: float) -> list[FeedbackRef]:
    """At most ``floor(share * others)`` per (camera, operator), newest first (the cap above)."""
    cap = math.floor(share * others + 1e-9)
    taken: Counter[tuple[str, str]] = Counter()
    admitted = []
    for ref in newest_first:
        key = (ref.camera_id, ref.operator)
        if taken[key] < cap:
            taken[key] += 1
            admitted.append(ref)
    return admitted


def admit_defects(newest_first: list[FeedbackRef], per_operator: int) -> list[FeedbackRef]:
    """At most ``per_operator`` confirmed defects per (camera, operator), newest first."""
    taken: Counter[tuple[str, str]] = Counter()
    admitted = []
    for ref in newest_first:
        key = (ref.camera_id, ref.operator)
        if taken[key] < per_operator:
            taken[key] += 1
            admitted.append(ref)
    return admitted


class FeedbackStore:
    """Feedback frames per category and verdict on disk. One owner thread (the tuner's main loop)."""

    def __init__(self, root: Path, max_per_verdict: int) -> None:
        self.root = Path(root)
        self.max_per_verdict = max_per_verdict
        self._refs: dict[tuple[str, str], list[FeedbackRef]] = {}
        self._next_seq = 0
        self._load()

    def _load(self) -> None:
        if not self.root.is_dir():
            return
        for folder in sorted(self.root.glob("*/feedback")):
            category = folder.parent.name
            for meta_path in sorted(folder.iterdir()):
                match = _NAME.match(meta_path.name)
                if meta_path.name.endswith(".tmp"):
                    meta_path.unlink(missing_ok=True)
                if not match:
                    continue
                png = meta_path.with_suffix(".png")
                try:
                    meta = json.loads(meta_path.read_text())
                    ref = FeedbackRef(category, match[2], int(match[1]), meta["frame_id"], meta["camera_id"],
                                      meta["operator"], meta["feedback_id"], meta.get("given_at", ""), png)
                except (OSError, ValueError, KeyError, TypeError):
                    log.warning("feedback sample %s is unreadable; skipped", meta_path)
                    continue
                if not png.is_file():
                    meta_path.unlink(missing_ok=True)  # a crash between the two writes
                    continue
                self._refs.setdefault((category, ref.verdict), []).append(ref)
                self._next_seq = max(self._next_seq, ref.seq + 1)
        for refs in self._refs.values():
            refs.sort(key=lambda r: r.seq)

    def samples(self, category: str, verdict: str) -> list[FeedbackRef]:
        """Oldest first."""
        return list(self._refs.get((category, verdict), ()))

    def size(self, category: str, verdict: str) -> int:
        return len(self._refs.get((category, verdict), ()))

    def add(self, record: dict[str, Any], image: np.ndarray) -> FeedbackRef:
        """Store one verdict (image uint8 HxW or HxWx3 RGB); replaces this operator's earlier verdict on the frame."""
        category = check_category(record["category"])
        verdict = record["verdict"]
        self._remove_where(category, lambda r: r.frame_id == record["frame_id"] and r.operator == record["operator"])
        seq = self._next_seq
        folder = self.root / category / "feedback"
        png = folder / f"{seq:012d}_{verdict}.png"
        bgr = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        ok, encoded = cv2.imencode(".png", bgr)
        if not ok:
            raise ReservoirWriteError(f"feedback frame {record['frame_id']} could not be encoded as PNG")
        keep = {k: record.get(k) for k in ("frame_id", "camera_id", "operator", "feedback_id", "given_at", "note",
                                           "score", "threshold", "prompt_version", "verdict")}
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(png, encoded.tobytes())
            atomic_write_text(png.with_suffix(".json"), json.dumps(keep, sort_keys=True))
        except OSError as exc:
            png.unlink(missing_ok=True)
            raise ReservoirWriteError(f"cannot write feedback sample {png}: {exc.strerror or exc}") from exc
        self._next_seq = seq + 1
        ref = FeedbackRef(category, verdict, seq, record["frame_id"], record["camera_id"], record["operator"],
                          record["feedback_id"], str(record.get("given_at") or ""), png)
        refs = self._refs.setdefault((category, verdict), [])
        refs.append(ref)
        while len(refs) > self.max_per_verdict:
            self._delete(refs.pop(0))
        return ref

    def _remove_where(self, category: str, predicate) -> None:
        for verdict in VERDICTS:
            refs = self._refs.get((category, verdict), [])
            for ref in [r for r in refs if predicate(r)]:
                refs.remove(ref)
                self._delete(ref)

    @staticmethod
    def _delete(ref: FeedbackRef) -> None:
        ref.path.with_suffix(".json").unlink(missing_ok=True)
        ref.path.unlink(missing_ok=True)

    def load(self, refs: list[FeedbackRef]) -> list[np.ndarray]:
        images = []
        for ref in refs:
            image = cv2.imread(str(ref.path), cv2.IMREAD_UNCHANGED)
            if image is None:
                log.warning("feedback sample %s is unreadable; skipped", ref.path)
                continue
            images.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if image.ndim == 3 else image)
        return images


def describe(refs: list[FeedbackRef]) -> list[dict[str, Any]]:
    return [{k: v for k, v in asdict(r).items() if k != "path"} for r in refs]
