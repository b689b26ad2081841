"""Camera simulator: folder discovery, headers, unique frame ids, the `hpad camera` command."""

from __future__ import annotations

import numpy as np
import pytest

from consumers import contract as c
from consumers.camera import Camera, find_images, main
from consumers.events import headers_as_text
from hpad.errors import ConfigError
from tests.consumers.kafka_helpers import encode, image, new_topics, read_all


def write_folder(root, rng) -> list:
    paths = [root / "good" / "001.png", root / "good" / "000.png", root / "broken" / "a.jpg", root / "b.JPEG"]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(image(rng, (32, 40)), ".png" if path.suffix == ".png" else ".jpg"))
    (root / "notes.txt").write_text("not an image")
    return paths


def test_find_images_is_recursive_and_sorted(tmp_path):
    write_folder(tmp_path, np.random.default_rng(0))
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["b.JPEG", "broken/a.jpg", "good/000.png", "good/001.png"]
    with pytest.raises(ConfigError):
        find_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError):
        find_images(tmp_path / "empty")


@pytest.mark.kafka
def test_camera_command_publishes_frames_with_headers(kafka_broker, tmp_path, monkeypatch):
    write_folder(tmp_path / "images", np.random.default_rng(1))
    topics = new_topics(kafka_broker, partitions=3)
    monkeypatch.chdir(tmp_path)
    code = main(["--dir", str(tmp_path / "images"), "--rate", "0", "--loop", "--frames", "10", "--cameras", "3",
                 "--category", "bottle", "--bootstrap", kafka_broker.bootstrap, "--input-topic", topics.frames])
    assert code == 0
    records = read_all(kafka_broker, topics.frames, expected=10)
    assert len(records) == 10
    headers = [headers_as_text(r.headers) for r in records]
    assert len({h[c.FRAME_ID] for h in headers}) == 10
    assert {h[c.CAMERA_ID] for h in headers} == {"cam-1-1", "cam-1-2", "cam-1-3"}
    for record, h in zip(records, headers, strict=True):
        meta = c.parse_frame_headers(record.headers, record.key)
        assert meta.category == "bottle" and record.key.decode() == meta.camera_id
        assert h[c.CONTENT_TYPE] in ("image/png", "image/jpeg") and meta.captured_at is not None


@pytest.mark.kafka
def test_frame_ids_unique_across_runs(kafka_broker):
    from kafka import KafkaProducer

    topics = new_topics(kafka_broker, partitions=1)
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    try:
        frame = (encode(image(np.random.default_rng(2), (16, 16))), "image/png")
        first = Camera(producer, topics.frames).stream([frame] * 3)
        second = Camera(producer, topics.frames).stream([frame] * 3)
    finally:
        producer.close()
    ids = [s.frame_id for s in first + second]
    assert len(set(ids)) == 6 and [s.offset for s in first + second] == list(range(6))
