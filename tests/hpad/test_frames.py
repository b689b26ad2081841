"""hpad.frames: the one frame validator, shared by the scorer and OAGM."""

from __future__ import annotations

import numpy as np
import pytest

from hpad.errors import FrameError
from hpad.frames import check_frame, gray_or_rgb
from hpad.oagm import synthesize
from hpad.scorer import frame_to_chw

BAD = [np.zeros((10, 10, 3), np.float32), np.zeros((10, 10, 2), np.uint8), np.zeros((0, 5, 3), np.uint8),
       np.zeros((4, 4, 4, 4), np.uint8), "not an array"]


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 1), (6, 5, 3), (6, 5, 4)])
def test_valid_layouts(shape) -> None:
    frame = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    assert check_frame(frame) is frame
    out = gray_or_rgb(frame)
    assert out.shape == ((6, 5) if len(shape) == 2 or shape[2] == 1 else (6, 5, 3))
    assert np.shares_memory(out, frame)
    assert tuple(frame_to_chw(frame).shape) == (3, 6, 5)


@pytest.mark.parametrize("bad", BAD)
def test_scorer_and_oagm_refuse_the_same_frames_with_the_same_reason(bad) -> None:
    with pytest.raises(FrameError) as own:
        check_frame(bad)
    with pytest.raises(FrameError) as scorer:
        frame_to_chw(bad)
    with pytest.raises(FrameError) as oagm:
        synthesize(np.random.default_rng(0), bad, np.ones((10, 10), bool))
    assert own.value.reason == scorer.value.reason == oagm.value.reason == "bad_image"
    assert str(own.value) == str(scorer.value) == str(oagm.value)
