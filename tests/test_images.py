"""Tests for actindex.indexer.images: folder scanning, robust decoding, exact preprocessing, loading."""

from __future__ import annotations

import contextlib
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torchvision import transforms

from actindex.indexer.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    DataError,
    ImageReadError,
    crop_geometry,
    load_rgb,
    preprocess,
    resize_size,
    scan_folder,
)
from actindex.indexer.loader import Batch, ImageDataset, collate
from actindex.kernels.errors import UserError

from corpus import (  # tests/ is on sys.path under pytest's default import mode
    BLUE,
    FLOAT_VALUES,
    GRAY16_VALUES,
    GREEN,
    INT32_VALUES,
    RED,
    RGBA_COLOUR,
    WHITE,
    make_corpus,
    smooth_rgb,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(load_rgb(path)).astype(int)  # (H, W, 3)


def _touch_image(path: Path, size: tuple[int, int] = (4, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size).save(path)


# ---------------------------------------------------------------------------------------------- scanning


def test_scan_lists_corpus_sorted_with_class_labels(corpus):
    root, expected = corpus
    found = scan_folder(root)
    assert found.root == root
    assert found.paths == sorted(expected)  # hidden files, hidden folders and .txt left out
    assert found.classes == ["a", "b", "c"]
    assert found.labels == [found.classes.index(p.split("/")[0]) for p in found.paths]


def test_scan_accepts_str_and_any_case_extension(tmp_path):
    _touch_image(tmp_path / "x" / "B.JPEG")
    _touch_image(tmp_path / "x" / "a.Png")
    found = scan_folder(str(tmp_path))
    assert found.paths == ["x/B.JPEG", "x/a.Png"]  # plain string order: upper case first
    assert found.labels == [0, 0] and found.classes == ["x"]


@pytest.mark.parametrize(
    "files",
    [
        ["top.png", "cls/a.png"],  # mixed depths
        ["top.png", "other.png"],  # flat folder: no subfolder at all
        ["cls/sub/a.png", "cls/sub/b.png"],  # two levels down
    ],
)
def test_scan_other_layouts_have_no_labels(tmp_path, files):
    for rel in files:
        _touch_image(tmp_path / rel)
    found = scan_folder(tmp_path)
    assert found.paths == sorted(files)
    assert found.labels == [-1] * len(files)
    assert found.classes == []


def test_scan_does_not_follow_symlink_loops(tmp_path):
    _touch_image(tmp_path / "cls" / "a.png")
    os.symlink(tmp_path, tmp_path / "cls" / "loop")
    assert scan_folder(tmp_path).paths == ["cls/a.png"]


def test_scan_errors_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DataError, match="not a directory"):
        scan_folder(tmp_path / "file.png")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    _touch_image(empty / ".hidden" / "a.png")
    with pytest.raises(DataError, match=r"no images found .*\.jpg") as info:
        scan_folder(empty)
    assert isinstance(info.value, UserError)  # the CLI prints it as one line
    assert "\n" not in str(info.value)


def test_extensions_are_lowercase_with_dot():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"} <= IMAGE_EXTENSIONS
    assert all(e.startswith(".") and e == e.lower() for e in IMAGE_EXTENSIONS)


# ---------------------------------------------------------------------------------------------- decoding


def test_every_corpus_file_has_the_expected_outcome(corpus):
    root, expected = corpus
    for rel, keyword in expected.items():
        if keyword is None:
            im = load_rgb(root / rel)
            assert im.mode == "RGB", rel
            assert np.asarray(im).dtype == np.uint8
        else:
            with pytest.raises(ImageReadError) as info:
                load_rgb(root / rel)
            assert keyword in info.value.reason, (rel, info.value.reason)
            assert "\n" not in info.value.reason


def test_loading_leaves_pillow_globals_and_warning_filters_alone(corpus):
    root, expected = corpus
    filters_before = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing the loader does may leak a warning
        for rel in expected:
            with contextlib.suppress(ImageReadError):
                load_rgb(root / rel)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert warnings.filters == filters_before


def test_sixteen_bit_grey_is_scaled_not_clipped(corpus):
    root, _ = corpus
    expected = [round(v * 255 / 65535) for v in GRAY16_VALUES]
    assert expected == [0, 128, 255]
    for rel in ("b/gray16.png", "b/gray16be.tiff"):
        px = _pixels(root / rel)
        assert px[0, :, 0].tolist() == expected, rel
        assert (px == px[..., :1]).all()  # grey stays grey


def test_int32_is_read_as_sixteen_bit_and_float_is_clipped(corpus):
    root, _ = corpus
    clipped = [min(max(v, 0), 65535) for v in INT32_VALUES]
    assert _pixels(root / "b/int32.tif")[0, :, 0].tolist() == [round(v * 255 / 65535) for v in clipped]
    assert _pixels(root / "b/float.tif")[0, :, 0].tolist() == [0, 100, 255, 0]  # NaN -> 0
    assert len(FLOAT_VALUES) == 4


def test_sixteen_bit_rgb_png(corpus):
    root, _ = corpus
    assert (_pixels(root / "b/rgb16.png") == [255, 128, 0]).all()


def test_transparency_is_composited_on_white(corpus):
    root, _ = corpus
    rgba = _pixels(root / "a/rgba.png")
    assert rgba[0, 0].tolist() == list(RGBA_COLOUR) and rgba[0, -1].tolist() == list(WHITE)
    la = _pixels(root / "a/la.png")
    assert la[0, 0].tolist() == [50, 50, 50] and la[0, -1].tolist() == list(WHITE)
    palette = _pixels(root / "b/palette_trns.png")
    assert palette[0, ::2].tolist() == [list(RED), list(GREEN), list(WHITE)]  # index 2 (blue) transparent


def test_half_transparent_pixel_blends_with_white(tmp_path):
    Image.new("RGBA", (2, 2), (0, 0, 0, 128)).save(tmp_path / "half.png")
    assert abs(_pixels(tmp_path / "half.png")[0, 0, 0] - 127) <= 1


def test_cmyk_bilevel_grey(corpus):
    root, _ = corpus
    cmyk = _pixels(root / "b/cmyk.jpg")
    assert (cmyk[:, :4] >= 250).all() and (cmyk[:, -4:] <= 5).all()  # white left, black right, JPEG noise
    assert _pixels(root / "a/bilevel.bmp")[0, [0, -1], 0].tolist() == [0, 255]
    assert _pixels(root / "a/gray.png")[0, [0, -1]].tolist() == [[0, 0, 0], [200, 200, 200]]


def test_exif_orientation_is_applied(corpus):
    root, _ = corpus
    im = load_rgb(root / "b/exif_rotated.jpeg")
    assert im.size == (20, 40)  # stored 40 x 20
    px = np.asarray(im).astype(int)
    assert np.abs(px[5, 10] - RED).max() <= 8 and np.abs(px[-5, 10] - BLUE).max() <= 8


def test_multi_frame_gives_first_frame(corpus):
    root, _ = corpus
    assert (_pixels(root / "b/anim.gif") == RED).all()


def test_missing_file_is_a_read_error(tmp_path):
    with pytest.raises(ImageReadError, match="cannot read file"):
        load_rgb(tmp_path / "missing.png")


def test_max_pixels_is_checked_from_the_header(corpus):
    root, _ = corpus
    with pytest.raises(ImageReadError) as info:
        load_rgb(root / "a/rgb.JPG", max_pixels=1000)
    assert info.value.reason == "64×48 = 3072 pixels exceeds the limit of 1000 (--max-pixels)"
    assert load_rgb(root / "a/rgb.JPG", max_pixels=64 * 48).size == (64, 48)


def test_pillow_bomb_limits_follow_max_pixels(corpus, monkeypatch):
    """Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that; shrink it to test both cheaply."""
    root, _ = corpus
    path = root / "a/rgb.JPG"  # 3072 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 3072 only warns
        assert load_rgb(path, max_pixels=4000).size == (64, 48)  # our looser limit wins, no warning leaks
        with pytest.raises(ImageReadError, match="exceeds the limit of 1000"):
            load_rgb(path, max_pixels=1000)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 3072 > 2 * 1000: Pillow refuses
        with pytest.raises(ImageReadError, match="decompression bomb"):
            load_rgb(path, max_pixels=4000)


def test_read_error_pickles_with_reason():
    err = pickle.loads(pickle.dumps(ImageReadError("empty file")))
    assert isinstance(err, ImageReadError) and err.reason == "empty file"


# ------------------------------------------------------------------------------------------ preprocessing


def _torchvision(img: Image.Image, size: int) -> torch.Tensor:
    pipeline = transforms.Compose(
        [transforms.Resize(resize_size(size)), transforms.CenterCrop(size), transforms.PILToTensor()]
    )
    return pipeline(img)


def test_resize_size():
    assert [resize_size(s) for s in (224, 299, 384, 32)] == [256, 342, 439, 37]


@pytest.mark.parametrize("size", [224, 299, 32])
@pytest.mark.parametrize("shape", [(500, 375), (375, 500), (257, 256), (256, 256), (31, 97), (97, 5)])
def test_preprocess_equals_torchvision(size, shape):
    img = smooth_rgb(*shape)
    out = preprocess(img, size)
    assert out.dtype == torch.uint8 and out.shape == (3, size, size) and out.is_contiguous()
    assert torch.equal(out, _torchvision(img, size))


def test_preprocess_equals_torchvision_on_corpus(corpus):
    root, expected = corpus
    for rel in (r for r, k in expected.items() if k is None):
        img = load_rgb(root / rel)
        assert torch.equal(preprocess(img, 64), _torchvision(img, 64)), rel


def test_preprocess_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        preprocess(Image.new("L", (8, 8)), 4)


@pytest.mark.parametrize("size", [224, 299, 37])
def test_crop_geometry_matches_torchvision_resize(size):
    rng = np.random.default_rng(0)
    for width, height in rng.integers(1, 3000, (200, 2)).tolist():
        g = crop_geometry(width, height, size)
        h, w = transforms.functional._compute_resized_output_size((height, width), [resize_size(size)])
        assert (g.resized_height, g.resized_width) == (h, w)
        assert (g.offset_y, g.offset_x) == (int(round((h - size) / 2)), int(round((w - size) / 2)))


def test_to_original_exact_on_integer_scale():
    g = crop_geometry(512, 1024, 224)  # resized 256 x 512 (H x W), scale 2, crop at (144, 16)
    assert (g.resized_height, g.resized_width, g.offset_y, g.offset_x) == (512, 256, 144, 16)
    assert g.scale == g.scale_y == g.scale_x == 2.0
    assert g.to_original((0, 0, 224, 224)) == (288, 32, 736, 480)
    assert g.to_original((10, 20, 11, 21)) == (308, 72, 310, 74)
    assert g.to_original((-500, -500, 1000, 1000)) == (0, 0, 1024, 512)  # clipped to the image


def test_to_original_rounds_outward():
    g = crop_geometry(300, 300, 224)  # resized 256 x 256, crop at (16, 16), scale 300/256
    y0, x0, y1, x1 = g.to_original((1, 2, 3, 4))
    assert y0 == (17 * 300) // 256 and y1 == -(-(19 * 300) // 256)
    assert x0 <= 18 * 300 / 256 and x1 >= 20 * 300 / 256


@pytest.mark.parametrize("shape", [(640, 480), (333, 517)])
def test_to_original_box_shows_the_same_content(shape):
    img = smooth_rgb(*shape)
    size = 224
    net_input = preprocess(img, size)  # (3, S, S)
    g = crop_geometry(img.width, img.height, size)
    for box in [(40, 60, 104, 124), (0, 0, 224, 224), (150, 10, 200, 90)]:
        y0, x0, y1, x1 = g.to_original(box)
        patch = img.crop((x0, y0, x1, y1)).resize(
            (box[3] - box[1], box[2] - box[0]), Image.Resampling.BILINEAR
        )
        expected = net_input[:, box[0] : box[2], box[1] : box[3]]  # (3, h, w)
        got = torch.from_numpy(np.array(patch)).permute(2, 0, 1)  # (3, h, w)
        assert (got.float() - expected.float()).abs().mean() < 2.0, box


# ------------------------------------------------------------------------------------------ data loading


def _corpus_dataset(corpus, size: int = 32) -> tuple[ImageDataset, dict[int, str | None]]:
    root, expected = corpus
    found = scan_folder(root)
    ds = ImageDataset(root, found.paths, range(len(found.paths)), size, DEFAULT_MAX_PIXELS)
    return ds, {i: expected[p] for i, p in enumerate(found.paths)}


def test_dataset_items(corpus):
    ds, outcome = _corpus_dataset(corpus)
    assert len(ds) == len(outcome)
    for i, keyword in outcome.items():
        image_id, pixels, reason = ds[i]
        assert image_id == i
        if keyword is None:
            assert reason == "" and pixels is not None and pixels.shape == (3, 32, 32)
        else:
            assert pixels is None and keyword in reason


def test_dataloader_with_workers_reports_every_image(corpus):
    ds, outcome = _corpus_dataset(corpus)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=ds.collate_fn)
    loaded, skipped = [], {}
    for batch in loader:
        assert isinstance(batch, Batch)
        assert batch.pixels.shape == (len(batch.ids), 3, 32, 32) and batch.pixels.dtype == torch.uint8
        loaded += batch.ids.tolist()
        skipped.update(batch.skipped)
        for image_id, pixels in zip(batch.ids.tolist(), batch.pixels, strict=True):
            assert torch.equal(pixels, ds[image_id][1])
    assert loaded == [i for i, k in outcome.items() if k is None]  # input order kept
    assert skipped.keys() == {i for i, k in outcome.items() if k is not None}
    assert all(outcome[i] in reason for i, reason in skipped.items())


def test_dataset_uses_parallel_ids_and_paths(corpus):
    root, _ = corpus
    ds = ImageDataset(root, ["a/rgb.JPG", "c/empty.jpg"], [70, 71], 16, DEFAULT_MAX_PIXELS)
    assert [ds[0][0], ds[1][0]] == [70, 71] and ds[1][2] == "empty file"
    with pytest.raises(ValueError, match="parallel"):
        ImageDataset(root, ["a/rgb.JPG"], [0, 1], 16, DEFAULT_MAX_PIXELS)


def test_dataset_respects_max_pixels(corpus):
    root, _ = corpus
    ds = ImageDataset(root, ["a/rgb.JPG", "a/gray.png"], [0, 1], 16, max_pixels=100)
    batch = ds.collate_fn([ds[0], ds[1]])
    assert batch.ids.tolist() == [1]
    assert batch.skipped == [(0, "64×48 = 3072 pixels exceeds the limit of 100 (--max-pixels)")]


def test_dataset_refuses_extreme_aspect_ratio(tmp_path):
    Image.new("L", (800_000, 1)).save(tmp_path / "strip.png")  # resizes to 204.8M x 256
    _, pixels, reason = ImageDataset(tmp_path, ["strip.png"], [0], 224, DEFAULT_MAX_PIXELS)[0]
    assert pixels is None and "aspect ratio too extreme" in reason


def test_collate_all_failed_batch():
    items = [(3, None, "empty file"), (4, None, "not a recognized image format")]
    batch = ImageDataset(Path("."), [], [], 48, DEFAULT_MAX_PIXELS).collate_fn(items)
    assert batch.pixels.shape == (0, 3, 48, 48) and batch.pixels.dtype == torch.uint8
    assert batch.ids.dtype == torch.int64 and batch.ids.shape == (0,)
    assert batch.skipped == [(3, "empty file"), (4, "not a recognized image format")]
    assert collate(items, input_size=48).pixels.shape == (0, 3, 48, 48)
    bare = collate(items)  # S unknown: still an empty batch, not an error that would end the run
    assert bare.pixels.shape[:2] == (0, 3) and bare.ids.shape == (0,) and len(bare.skipped) == 2


def test_collate_keeps_input_order():
    x = torch.zeros(3, 8, 8, dtype=torch.uint8)
    batch = collate([(5, x + 1, ""), (2, None, "empty file"), (9, x + 2, "")])
    assert batch.ids.tolist() == [5, 9]
    assert batch.pixels[:, 0, 0, 0].tolist() == [1, 2]
    assert batch.skipped == [(2, "empty file")]


def test_collate_fn_pickles():
    fn = pickle.loads(pickle.dumps(ImageDataset(Path("."), [], [], 8, 1).collate_fn))
    assert fn([(1, None, "x")]).pixels.shape == (0, 3, 8, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning memory needs CUDA")
def test_batch_pin_memory():
    batch = collate([(0, torch.zeros(3, 4, 4, dtype=torch.uint8), "")]).pin_memory()
    assert batch.pixels.is_pinned() and batch.ids.is_pinned()


def test_unconvertible_mode_is_a_read_error(corpus, monkeypatch):
    """Pillow converts every mode it can open today; a future mode it cannot must still be a skip."""
    root, _ = corpus

    def refuse(self, mode=None, *args, **kwargs):
        raise ValueError(f"conversion from {self.mode} to {mode} not supported")

    monkeypatch.setattr(Image.Image, "convert", refuse)
    with pytest.raises(ImageReadError, match="cannot convert pixel mode RGB to RGB"):
        load_rgb(root / "a/rgb.PNG")
