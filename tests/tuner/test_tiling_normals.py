"""The tuner keeps what the scorers score: a normal sampled with a `roi` header is stored cropped to it."""

from __future__ import annotations

import numpy as np

from consumers.camera import frame_headers
from tests.consumers.kafka_helpers import encode
from tests.tuner.test_app import offline_tuner, record


def test_normals_with_a_roi_are_stored_cropped_and_bad_rois_dropped(tmp_path, tiny_backbone):
    tuner = offline_tuner(tmp_path, tiny_backbone)
    picture = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    headers = [*frame_headers("r1", "cam-1", "widget", "image/png"), ("roi", b"10,5,40,30")]
    assert tuner.ingest(record(encode(picture), headers)) == "stored"
    (stored,) = tuner.reservoir.load(tuner.reservoir.samples("widget"))
    assert stored.shape[:2] == (30, 40)
    assert np.array_equal(stored.reshape(30, 40, -1)[..., :3], picture[5:35, 10:50])
    outside = [*frame_headers("r2", "cam-1", "widget", "image/png"), ("roi", b"60,0,40,30")]
    assert tuner.ingest(record(encode(picture), outside)) == "bad_header"
    assert len(tuner.reservoir.samples("widget")) == 1
