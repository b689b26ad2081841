"""hpad.data on generated MVTec-layout categories: listing, labels, mask pairing, pixel reading, layout errors,
few-shot sampling; plus the synthetic generator itself and (when present) the real shared datasets."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from hpad.data import (
    IMAGE_SUFFIXES,
    CategoryData,
    Sample,
    find_categories,
    load_category,
    read_image,
    read_mask,
    sample_shots,
)
from hpad.errors import ConfigError, DataLayoutError, HpadError
from tests.synthetic import add_defect, make_object_image, write_mvtec_category

SHARED_DATA = Path(os.environ.get("HPAD_SHARED_DATA", "/work/shared/data"))


@pytest.fixture
def widget(tmp_path: Path) -> Path:
    return write_mvtec_category(tmp_path, "widget", defect_types=("scratch", "hole"), n_test_defect=3)


# ---------------------------------------------------------------------------------------------------------------
# load_category on generated data


def test_load_counts_labels_and_mask_pairing(widget: Path) -> None:
    data = load_category(widget.parent, "widget")
    assert isinstance(data, CategoryData)
    assert data.root == widget and data.name == "widget"
    assert len(data.train) == 6 and all(p.parent == widget / "train" / "good" for p in data.train)
    assert [p.name for p in data.train] == [f"{i:03d}.png" for i in range(6)]
    assert len(data.test) == 4 + 2 * 3
    assert data.defect_types == ("hole", "scratch")
    # good first, then defect types sorted, files sorted by name
    assert [s.defect_type for s in data.test] == ["good"] * 4 + ["hole"] * 3 + ["scratch"] * 3
    for sample in data.test:
        assert isinstance(sample, Sample)
        if sample.defect_type == "good":
            assert sample.label == 0 and sample.mask_path is None
        else:
            assert sample.label == 1
            assert (
                sample.mask_path
                == widget / "ground_truth" / sample.defect_type / f"{sample.path.stem}_mask.png"
            )
            image = read_image(sample.path)
            mask = read_mask(sample.mask_path, image.shape[:2])
            assert mask.dtype == bool and mask.shape == image.shape[:2] and mask.any()
    with pytest.raises(AttributeError):
        data.name = "other"  # type: ignore[misc]  # frozen


def test_load_is_deterministic_and_accepts_str_root(widget: Path) -> None:
    assert load_category(str(widget.parent), "widget") == load_category(widget.parent, "widget")


def test_root_can_be_grandparent_or_category_itself(tmp_path: Path) -> None:
    cat = write_mvtec_category(tmp_path / "mvtec", "widget")
    by_parent = load_category(tmp_path / "mvtec", "widget")
    assert load_category(tmp_path, "widget") == by_parent  # found one level down, like data/ + bottle
    assert load_category(tmp_path, "mvtec/widget") == by_parent
    assert load_category(cat, "widget") == by_parent  # root is the category folder itself
    assert by_parent.root == cat


def test_ambiguous_category_is_an_error(tmp_path: Path) -> None:
    write_mvtec_category(tmp_path / "a", "widget", n_train=1, n_test_good=1, n_test_defect=1)
    write_mvtec_category(tmp_path / "b", "widget", n_train=1, n_test_good=1, n_test_defect=1)
    with pytest.raises(DataLayoutError, match=r"ambiguous.*a/widget.*b/widget"):
        load_category(tmp_path, "widget")


def test_grayscale_category(tmp_path: Path) -> None:
    write_mvtec_category(tmp_path, "tile", grayscale=True, size=(64, 80))
    data = load_category(tmp_path, "tile")
    for path in (*data.train, *(s.path for s in data.test)):
        image = read_image(path)
        assert image.shape == (64, 80) and image.dtype == np.uint8  # stays 2-D


def test_varying_sizes_category(tmp_path: Path) -> None:
    write_mvtec_category(
        tmp_path,
        "tile",
        grayscale=True,
        varying_sizes=True,
        n_test_defect=5,
        defect_types=("crack", "blowhole"),
    )
    data = load_category(tmp_path, "tile")
    shapes = {read_image(p).shape for p in (*data.train, *(s.path for s in data.test))}
    assert len(shapes) > 5
    for sample in data.test:
        if sample.label:
            image = read_image(sample.path)
            assert read_mask(sample.mask_path, image.shape).shape == image.shape


def test_non_images_and_hidden_files_are_ignored(widget: Path) -> None:
    (widget / "train" / "good" / "notes.txt").write_text("x")
    (widget / "train" / "good" / ".hidden.png").write_bytes(b"")
    (widget / "test" / "readme.md").write_text("x")
    shutil.copy(widget / "train" / "good" / "000.png", widget / "train" / "good" / "100.PNG")
    data = load_category(widget.parent, "widget")
    assert [p.name for p in data.train] == [f"{i:03d}.png" for i in range(6)] + ["100.PNG"]
    assert len(data.test) == 10


def test_find_categories(tmp_path: Path) -> None:
    write_mvtec_category(tmp_path, "alpha", n_train=1, n_test_good=1, n_test_defect=1)
    write_mvtec_category(tmp_path / "mvtec", "beta", n_train=1, n_test_good=1, n_test_defect=1)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "a" / "b" / "too_deep" / "test").mkdir(parents=True)  # 3 levels down: not searched
    assert find_categories(tmp_path) == ["alpha", "mvtec/beta"]
    assert find_categories(str(tmp_path / "mvtec")) == ["beta"]
    assert find_categories(tmp_path / "alpha") == ["alpha"]  # root itself, as in check_layout.py
    assert find_categories(tmp_path / "missing") == []


# ---------------------------------------------------------------------------------------------------------------
# layout errors


def test_missing_category_names_path_and_lists_found(tmp_path: Path) -> None:
    write_mvtec_category(tmp_path, "alpha", n_train=1, n_test_good=1, n_test_defect=1)
    write_mvtec_category(tmp_path / "mvtec", "beta", n_train=1, n_test_good=1, n_test_defect=1)
    with pytest.raises(DataLayoutError) as info:
        load_category(tmp_path, "gamma")
    message = str(info.value)
    assert str(tmp_path / "gamma") in message
    assert "alpha" in message and "mvtec/beta" in message


def test_missing_category_with_nothing_found(tmp_path: Path) -> None:
    with pytest.raises(DataLayoutError, match="none"):
        load_category(tmp_path, "gamma")
    with pytest.raises(DataLayoutError, match=re.escape(str(tmp_path / "nowhere"))):
        load_category(tmp_path / "nowhere", "gamma")


def test_missing_mask_names_expected_mask_path(widget: Path) -> None:
    expected = widget / "ground_truth" / "scratch" / "001_mask.png"
    expected.unlink()
    with pytest.raises(DataLayoutError, match=re.escape(str(expected))) as info:
        load_category(widget.parent, "widget")
    assert str(widget / "test" / "scratch" / "001.png") in str(info.value)


def test_missing_ground_truth_folder(widget: Path) -> None:
    shutil.rmtree(widget / "ground_truth")
    with pytest.raises(
        DataLayoutError, match=re.escape(str(widget / "ground_truth" / "hole" / "000_mask.png"))
    ):
        load_category(widget.parent, "widget")


def test_mask_with_other_suffix_is_accepted(widget: Path) -> None:
    mask = widget / "ground_truth" / "hole" / "000_mask.png"
    cv2.imwrite(str(mask.with_suffix(".bmp")), cv2.imread(str(mask), cv2.IMREAD_UNCHANGED))
    mask.unlink()
    data = load_category(widget.parent, "widget")
    assert data.test[4].mask_path == mask.with_suffix(".bmp")


def test_empty_or_missing_train_good(widget: Path) -> None:
    train = widget / "train" / "good"
    for f in train.iterdir():
        f.unlink()
    with pytest.raises(DataLayoutError, match=re.escape(str(train)) + ".*no image"):
        load_category(widget.parent, "widget")
    train.rmdir()
    with pytest.raises(DataLayoutError, match=re.escape(str(train)) + ".*not found"):
        load_category(widget.parent, "widget")


def test_missing_or_empty_test(tmp_path: Path) -> None:
    cat = write_mvtec_category(tmp_path, "widget", n_test_good=0, n_test_defect=0)
    with pytest.raises(DataLayoutError, match=re.escape(str(cat / "test")) + ".*no test image"):
        load_category(tmp_path, "widget")
    shutil.rmtree(cat / "test")
    # without test/ the folder is still found by name (it is root/<category>), and the error names test/
    with pytest.raises(DataLayoutError, match=re.escape(str(cat / "test")) + ".*not found"):
        load_category(tmp_path, "widget")


def test_mask_size_mismatch(widget: Path) -> None:
    mask = widget / "ground_truth" / "hole" / "002_mask.png"
    cv2.imwrite(str(mask), np.zeros((50, 40), np.uint8))
    with pytest.raises(DataLayoutError, match=re.escape(str(mask)) + r".*40x50.*96x96"):
        load_category(widget.parent, "widget")


def test_unreadable_defect_image_header(widget: Path) -> None:
    bad = widget / "test" / "hole" / "001.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DataLayoutError, match=re.escape(str(bad))):
        load_category(widget.parent, "widget")


def test_errors_share_the_root_type() -> None:
    assert issubclass(DataLayoutError, HpadError) and issubclass(ConfigError, HpadError)


# ---------------------------------------------------------------------------------------------------------------
# read_image / read_mask


def test_read_image_rgb_channel_order(tmp_path: Path) -> None:
    pixels = np.zeros((5, 7, 3), np.uint8)
    pixels[..., 0] = 200  # red
    pixels[2, 3] = (1, 2, 3)
    Image.fromarray(pixels, "RGB").save(tmp_path / "rgb.png")
    out = read_image(tmp_path / "rgb.png")
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, pixels)


def test_read_image_grayscale_stays_2d(tmp_path: Path) -> None:
    pixels = np.arange(35, dtype=np.uint8).reshape(5, 7)
    Image.fromarray(pixels, "L").save(tmp_path / "gray.png")
    out = read_image(str(tmp_path / "gray.png"))
    assert out.shape == (5, 7)
    np.testing.assert_array_equal(out, pixels)


def test_read_image_16_bit(tmp_path: Path) -> None:
    gray = np.array([[0, 257, 65535, 32896]], np.uint16)  # 257*v -> v; 32896 = 128*257
    cv2.imwrite(str(tmp_path / "g16.png"), gray)
    out = read_image(tmp_path / "g16.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 1, 255, 128]])

    rgb = np.zeros((2, 2, 3), np.uint16)
    rgb[..., 0] = 65535  # red, written as RGB -> BGR for cv2
    cv2.imwrite(str(tmp_path / "c16.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = read_image(tmp_path / "c16.png")
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])


def test_read_image_rgba_and_palette(tmp_path: Path) -> None:
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 1] = 180  # green
    rgba[..., 3] = 10  # almost transparent: alpha is dropped, not blended
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = read_image(tmp_path / "rgba.png")
    assert out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out, rgba[..., :3])

    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[..., 2] = 255  # blue
    rgb[0, 0] = (255, 0, 0)
    Image.fromarray(rgb, "RGB").convert("P").save(tmp_path / "palette.png")
    out = read_image(tmp_path / "palette.png")
    assert out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out, rgb)


def test_read_image_jpeg_uppercase_suffix(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8, 3), (10, 120, 240), np.uint8)).save(tmp_path / "photo.JPG", quality=95)
    out = read_image(tmp_path / "photo.JPG")
    assert out.shape == (8, 8, 3)
    assert np.abs(out.astype(int) - (10, 120, 240)).max() <= 3
    assert ".jpg" in IMAGE_SUFFIXES and ".tiff" in IMAGE_SUFFIXES


def test_read_image_errors_name_the_path(tmp_path: Path) -> None:
    for name, data in (("garbage.png", b"definitely not an image"), ("empty.png", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataLayoutError, match=re.escape(str(tmp_path / name))):
            read_image(tmp_path / name)
    with pytest.raises(DataLayoutError, match=re.escape(str(tmp_path / "missing.png"))):
        read_image(tmp_path / "missing.png")


def test_read_mask(tmp_path: Path) -> None:
    values = np.array([[0, 255, 0], [1, 0, 128]], np.uint8)
    cv2.imwrite(str(tmp_path / "m.png"), values)
    mask = read_mask(tmp_path / "m.png", (2, 3))
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, values != 0)  # any nonzero pixel is anomalous
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), values != 0)

    empty = read_mask(None, (4, 5))
    assert empty.shape == (4, 5) and empty.dtype == bool and not empty.any()
    with pytest.raises(ConfigError):
        read_mask(None, None)
    with pytest.raises(DataLayoutError, match=re.escape(str(tmp_path / "m.png"))):
        read_mask(tmp_path / "m.png", (3, 2))

    colour = np.zeros((2, 2, 3), np.uint8)
    colour[1, 1, 2] = 255
    cv2.imwrite(str(tmp_path / "c.png"), colour)
    np.testing.assert_array_equal(read_mask(tmp_path / "c.png"), [[False, False], [False, True]])


# ---------------------------------------------------------------------------------------------------------------
# sample_shots


def _paths(n: int) -> list[Path]:
    return [Path(f"/data/train/good/{i:03d}.png") for i in range(n)]


def test_sample_shots_deterministic_and_order_independent() -> None:
    paths = _paths(20)
    first = sample_shots(paths, 4, seed=7)
    assert len(first) == 4 and len(set(first)) == 4 and set(first) <= set(paths)
    assert sample_shots(paths, 4, seed=7) == first
    assert sample_shots(list(reversed(paths)), 4, seed=7) == first
    shuffled = list(np.random.default_rng(1).permutation(np.array(paths, dtype=object)))
    assert sample_shots(shuffled, 4, seed=7) == first
    assert sample_shots([str(p) for p in paths], 4, seed=7) == first
    assert len({tuple(sample_shots(paths, 4, seed=s)) for s in range(10)}) > 1  # the seed matters


def test_sample_shots_nested_and_bounds() -> None:
    paths = _paths(8)
    one, two, four = (sample_shots(paths, k, seed=3) for k in (1, 2, 4))
    assert two[:1] == one and four[:2] == two  # k-shot sets grow by prefix for one seed
    assert sorted(sample_shots(paths, 8, seed=0)) == paths
    assert sample_shots(paths + paths[:3], 8, seed=0) == sample_shots(paths, 8, seed=0)  # duplicates dropped
    for k in (0, -1, 9):
        with pytest.raises(ConfigError):
            sample_shots(paths, k, seed=0)
    with pytest.raises(ConfigError):
        sample_shots([], 1, seed=0)
    with pytest.raises(ConfigError):
        sample_shots(paths, 2.0, seed=0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# the synthetic generator


def test_make_object_image_and_defect() -> None:
    rng = np.random.default_rng(0)
    image, obj = make_object_image(rng, (60, 80), object_box=(10, 20, 50, 70))
    assert image.shape == (60, 80, 3) and image.dtype == np.uint8 and obj.dtype == bool
    ys, xs = np.nonzero(obj)
    assert ys.min() >= 10 and ys.max() < 50 and xs.min() >= 20 and xs.max() < 70
    assert abs(float(image[obj].mean()) - float(image[~obj].mean())) > 30  # object stands out

    for kind in ("scratch", "blob", None):
        bad, defect = add_defect(rng, image, obj, kind=kind)
        assert bad.shape == image.shape and defect.dtype == bool and defect.any()
        assert not (defect & ~obj).any()  # inside the object
        np.testing.assert_array_equal(bad[~defect], image[~defect])
        assert float(image[defect].mean()) - float(bad[defect].mean()) > 60  # visibly darker

    gray, gobj = make_object_image(np.random.default_rng(0), (40, 50), grayscale=True)
    assert gray.shape == (40, 50)
    gbad, gdefect = add_defect(np.random.default_rng(1), gray, gobj)
    assert gbad.shape == (40, 50) and gdefect.any() and not (gdefect & ~gobj).any()
    with pytest.raises(ValueError):
        add_defect(rng, image, obj, kind="smudge")


def test_write_mvtec_category_is_deterministic_and_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    cat = write_mvtec_category(tmp_path / "a", "widget")
    elapsed = time.perf_counter() - start
    write_mvtec_category(tmp_path / "b", "widget")
    files = sorted(p.relative_to(cat) for p in cat.rglob("*") if p.is_file())
    assert len(files) == 6 + 4 + 4 + 4 + 1  # + LICENSE.txt
    for rel in files:
        assert (cat / rel).read_bytes() == (tmp_path / "b" / "widget" / rel).read_bytes()
    mask = cv2.imread(str(cat / "ground_truth" / "scratch" / "000_mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask.ndim == 2 and set(np.unique(mask).tolist()) == {0, 255}
    assert elapsed < 1.0, f"writing a default category took {elapsed:.2f} s"


# ---------------------------------------------------------------------------------------------------------------
# the real shared datasets (extra check; skipped where they are absent)


@pytest.mark.parametrize(
    ("root", "category", "n_train", "n_test", "n_masks", "defect_types", "colour"),
    [
        ("mvtec", "bottle", 53, 83, 63, ("broken_large", "broken_small", "contamination"), True),
        (".", "magnetic_tile", 762, 578, 388, ("blowhole", "break", "crack", "fray", "uneven"), False),
    ],
)
def test_real_shared_data(
    root: str,
    category: str,
    n_train: int,
    n_test: int,
    n_masks: int,
    defect_types: tuple[str, ...],
    colour: bool,
) -> None:
    folder = SHARED_DATA / root
    if not (folder / category / "test").is_dir():
        pytest.skip(f"{folder / category} not present")
    data = load_category(folder, category)
    assert len(data.train) == n_train and len(data.test) == n_test
    assert sum(s.mask_path is not None for s in data.test) == n_masks
    assert data.defect_types == defect_types
    sample = next(s for s in data.test if s.label == 1)
    image = read_image(sample.path)
    assert image.ndim == (3 if colour else 2)
    mask = read_mask(sample.mask_path, image.shape[:2])
    assert mask.any() and not mask.all()
