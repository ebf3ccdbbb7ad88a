"""An end-to-end build on generated images with a tiny model, checked against brute force."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from actindex.indexer.build import BuildConfig, build_index
from actindex.indexer.index_file import IndexReader
from actindex.indexer.models import IMAGENET_MEAN, IMAGENET_STD
from actindex.kernels.errors import UserError

from helpers import LAYERS, SIZE, make_images, run_build
from tiny_models import tiny_net

# (size, stride, padding) per axis, worked out by hand in TinyNet's docstring; head sees the whole input.
FIELDS = {"stem": ((5, 2, 2), (5, 2, 2)), "block": ((25, 4, 12), (17, 4, 8)),
          "down": ((33, 8, 16), (25, 8, 12)), "head": ((SIZE, SIZE, 0), (SIZE, SIZE, 0))}
BOTTOM_K = 3  # the shared index's --bottom-k


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_images(root)
    return root


def brute_force(data: Path, weights: Path) -> tuple[list[str], dict[str, list[np.ndarray]]]:
    """Every layer's full output for every readable image, one image at a time, with torchvision transforms."""
    paths = sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file())
    model = tiny_net()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    preprocess = transforms.Compose([transforms.Resize(round(SIZE * 256 / 224)), transforms.CenterCrop(SIZE),
                                     transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    maps: dict[str, list[np.ndarray]] = {name: [] for name in LAYERS}
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    for name in LAYERS:
        modules[name].register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o.clone()))
    for path in paths:
        try:
            image = Image.open(data / path).convert("RGB")
        except OSError:
            for name in LAYERS:
                maps[name].append(None)  # type: ignore[arg-type]
            continue
        with torch.no_grad():
            model(preprocess(image).unsqueeze(0))
        for name in LAYERS:
            out = captured[name][0]
            maps[name].append((out if out.ndim == 3 else out[:, None, None]).numpy())  # (C, H, W)
    return paths, maps


def expected_hits(maps: list[np.ndarray], k: int, lowest: bool = False) -> dict[str, np.ndarray]:
    """Per channel: sort all readable images by (-score, id), take k; first row-major argmax as position. With
    `lowest`, by (minimum, id), with the first argmin."""
    ids = [i for i, m in enumerate(maps) if m is not None]
    stack = np.stack([maps[i] for i in ids])  # (n, C, H, W)
    n, c, h, w = stack.shape
    flat = stack.reshape(n, c, h * w)
    scores = flat.min(axis=2) if lowest else flat.max(axis=2)  # (n, C)
    where = flat.argmin(axis=2) if lowest else flat.argmax(axis=2)  # numpy also returns the first occurrence
    sign = 1 if lowest else -1
    out = {"value": np.full((c, k), np.nan, np.float32), "image": np.full((c, k), -1),
           "y": np.full((c, k), -1), "x": np.full((c, k), -1)}
    for ch in range(c):
        order = sorted(range(n), key=lambda j: (sign * scores[j, ch], ids[j]))[:k]
        out["value"][ch, :len(order)] = scores[order, ch]
        out["image"][ch, :len(order)] = [ids[j] for j in order]
        out["y"][ch, :len(order)] = where[order, ch] // w
        out["x"][ch, :len(order)] = where[order, ch] % w
    return out


def expected_box(y: int, x: int, field: tuple[tuple[int, int, int], tuple[int, int, int]]) -> list[int]:
    (ry, sy, py), (rx, sx, px) = field
    y0, x0 = y * sy - py, x * sx - px
    return [max(y0, 0), max(x0, 0), min(y0 + ry, SIZE), min(x0 + rx, SIZE)]


@pytest.fixture(scope="module")
def index(data: Path, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_build(data, weights, tmp_path_factory.mktemp("index") / "index.h5", batch_size=7, workers=2,
                     bottom_k=BOTTOM_K, patch_layer="block")


@pytest.mark.parametrize("lowest", [False, True], ids=["top", "bottom"])
def test_every_value_id_position_and_box_equals_brute_force(data: Path, weights: Path, index: Path,
                                                            lowest: bool) -> None:
    """The top-k table, and the lowest-k table of --bottom-k (every layer here goes negative: stem and down
    before their ReLUs, block's residual sum, head's logits)."""
    paths, maps = brute_force(data, weights)
    with IndexReader(index) as reader:
        assert reader.image_paths() == paths
        assert reader.skipped() == [("class1/img_broken.jpg", reader.skipped()[0][1])]
        for name in LAYERS:
            layer = reader.layer(name, lowest=lowest)
            expected = expected_hits(maps[name], k=BOTTOM_K if lowest else 5, lowest=lowest)
            if lowest:
                assert (layer.value[:, 0] < 0).any(), f"{name}: no negative minimum, nothing to test"
            assert np.array_equal(layer.image, expected["image"]), name
            np.testing.assert_allclose(layer.value, expected["value"], rtol=1e-5, atol=1e-5, err_msg=name)
            assert np.array_equal(layer.y, expected["y"]) and np.array_equal(layer.x, expected["x"]), name
            field = FIELDS[name]
            assert (layer.grid.rf_size, layer.grid.rf_stride, layer.grid.rf_padding) == tuple(
                (field[0][i], field[1][i]) for i in range(3)), name
            boxes = [[expected_box(y, x, field) for y, x in zip(ys, xs, strict=True)]
                     for ys, xs in zip(layer.y, layer.x, strict=True)]
            assert np.array_equal(layer.box, np.array(boxes)), name


def test_the_lowest_table_is_recorded_and_an_index_without_it_says_how_to_get_it(index: Path, data: Path,
                                                                                   weights: Path,
                                                                                   tmp_path: Path) -> None:
    from click.testing import CliRunner

    from actindex.indexer.cli import cli

    with IndexReader(index) as reader:
        assert reader.info.bottom_k == BOTTOM_K and reader.describe()["bottom_k"] == BOTTOM_K
        assert reader.config["bottom_k"] == BOTTOM_K
    shown = CliRunner().invoke(cli, ["info", str(index)])
    assert shown.exit_code == 0 and f"k = 5, bottom-k = {BOTTOM_K}" in shown.output, shown.output
    plain = run_build(data, weights, tmp_path / "plain.h5", batch_size=16, layers=("head",), embed_layer="")
    with h5py.File(plain) as f:
        assert "layers/head/bottom" not in f and f.attrs["bottom_k"] == 0
    with IndexReader(plain) as reader:
        assert reader.info.bottom_k == 0 and reader.layer("head").image.shape == (5, 5)
        with pytest.raises(UserError, match=r"built without --bottom-k\); rebuild it with --bottom-k K") as caught:
            reader.layer("head", lowest=True)
    assert "\n" not in str(caught.value)
    shown = CliRunner().invoke(cli, ["info", str(plain)])
    assert shown.exit_code == 0 and "bottom-k" not in shown.output, shown.output


class Signed(nn.Module):
    """One channel: red × (1 − 2·green) on inputs in [0, 1], so 0.0 where red and green are 0, and -0.0 where
    red is 0 and green is 255 (0 × -1): minima that tie across signs, as a network's can."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x[:, :1] * (1 - 2 * x[:, 1:2]))


def test_lowest_minima_ascend_with_ties_to_the_lower_id_across_signed_zeros_and_ranks() -> None:
    from actindex.indexer.accumulate import IndexAccumulator

    # Per image: red (2x2) and green (constant); the minimum of red/255 × (1 − 2·green/255) is written beside.
    images = [([[0, 0], [0, 0]], 0),  # 0: +0.0 at (0, 0)
              ([[10, 200], [200, 30]], 255),  # 1: -200/255 at (0, 1)
              ([[0, 0], [0, 0]], 255),  # 2: -0.0 at (0, 0)
              ([[5, 0], [7, 0]], 0),  # 3: +0.0 at (0, 1)
              ([[200, 1], [2, 200]], 255),  # 4: -200/255 at (0, 0), a tie with image 1
              ([[50, 60], [70, 80]], 0),  # 5: 50/255
              ([[0, 0], [0, 0]], 255),  # 6: -0.0
              ([[255, 255], [255, 255]], 255)]  # 7: -1.0, the lowest
    pixels = torch.zeros(len(images), 3, 2, 2, dtype=torch.uint8)
    for i, (red, green) in enumerate(images):
        pixels[i, 0], pixels[i, 1] = torch.tensor(red), green

    def accumulator() -> IndexAccumulator:
        return IndexAccumulator(Signed(), {"out": 1}, 2, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), None,
                                torch.device("cpu"), bottom_k=len(images) + 2)

    first, second = accumulator(), accumulator()  # two ranks' shards, merged as a build merges them
    for ids in ([0, 1, 2], [3, 4]):
        first.add_batch(pixels[ids], torch.tensor(ids))
    second.add_batch(pixels[5:], torch.arange(5, 8))
    second.merge_state(first.state_dict())
    result = second.lowest()["out"]
    assert result.ids[0].tolist() == [7, 1, 4, 0, 2, 3, 6, 5, -1, -1]
    assert result.positions[0].tolist() == [0, 1, 0, 0, 0, 1, 0, 0, -1, -1]
    values = result.values[0].numpy()
    assert np.array_equal(values[:8], np.float32([-1, -200 / 255, -200 / 255, 0, 0, 0, 0, 50 / 255]))
    # each minimum as the network gave it, sign of zero included; empty slots a plain NaN
    assert np.signbit(values).tolist() == [True, True, True, False, True, False, True, False, False, False]
    assert np.isnan(values[8:]).all()


def test_each_units_mean_is_the_exact_mean_of_its_scores_over_readable_images(data: Path, weights: Path,
                                                                               index: Path) -> None:
    _, maps = brute_force(data, weights)
    with IndexReader(index) as reader:
        for name in LAYERS:
            scores = np.stack([m.reshape(m.shape[0], -1).max(axis=1) for m in maps[name] if m is not None])
            recorded = reader.layer_mean(name)
            assert recorded is not None and recorded.dtype == np.float64 and recorded.shape == (scores.shape[1],)
            # float32 scores may differ from the brute force's in the last bits; the mean is of those scores
            np.testing.assert_allclose(recorded, scores.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-6)


def test_each_units_histogram_quantiles_and_firing_rate_follow_its_brute_force_scores(data: Path, weights: Path,
                                                                                      index: Path) -> None:
    from actindex.kernels.histogram import BINS, bin_index

    _, maps = brute_force(data, weights)
    with IndexReader(index) as reader, h5py.File(index) as f:
        for name in LAYERS:
            scores = np.stack([m.reshape(m.shape[0], -1).max(axis=1) for m in maps[name] if m is not None])  # (n, C)
            counts = f[f"layers/{name}/hist"][()]  # (C, BINS)
            expected = np.stack([np.bincount(bin_index(torch.from_numpy(scores[:, c])).numpy(), minlength=BINS)
                                 for c in range(scores.shape[1])])
            assert np.array_equal(counts, expected), name
            for unit in range(scores.shape[1]):
                d = reader.distribution(name, unit)
                assert d is not None and d.count == scores.shape[0]
                assert d.firing_rate == (scores[:, unit] > 0).mean()
                for q, value in d.quantiles.items():
                    exact = np.quantile(scores[:, unit], q, method="inverted_cdf")
                    assert value == pytest.approx(exact, rel=1 / 128, abs=2.0**-20), (name, unit, q)


def test_in_place_relu_after_a_hooked_layer_changes_nothing(data: Path, weights: Path, index: Path) -> None:
    _, maps = brute_force(data, weights)
    stem_scores = np.stack([m.reshape(m.shape[0], -1).max(axis=1) for m in maps["stem"] if m is not None])
    assert (stem_scores[:, -1] < 0).all(), "tiny_net's last stem unit is negative everywhere before its ReLU"
    with IndexReader(index) as reader:
        recorded = reader.layer("stem").value[-1]
    assert (recorded < 0).all()  # after the in-place ReLU they would all read 0.0


def test_embeddings_are_spatial_means_and_skipped_rows_are_nan(data: Path, weights: Path, index: Path) -> None:
    paths, maps = brute_force(data, weights)
    with IndexReader(index) as reader:
        embeddings = reader.embeddings("down")[()]
        labels = reader.image_labels()
    assert embeddings.shape == (len(paths), 16)
    for i, m in enumerate(maps["down"]):
        if m is None:
            assert np.isnan(embeddings[i]).all()
        else:
            np.testing.assert_allclose(embeddings[i], m.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    assert labels.tolist() == [int(p.split("/")[0][-1]) for p in paths]


def test_patch_vectors_are_every_position_of_the_layer_and_skipped_rows_are_nan(data: Path, weights: Path,
                                                                                index: Path) -> None:
    """/patches/block row image * H * W + y * W + x is the layer's (C,) vector at (y, x), in float16; its grid's
    receptive field is the layer's, as the top-k table records it."""
    paths, maps = brute_force(data, weights)
    with IndexReader(index) as reader:
        grid = reader.patch_grid("block")
        stored = reader.patches("block")[()]
        table = reader.layer("block")
        assert reader.info.patch_layer == "block" and reader.describe()["patches"] == {"block": [len(paths) * 144, 8]}
    assert grid == table.grid and (grid.height, grid.width, grid.channels) == (12, 12, 8)  # one grid, stored twice
    assert stored.dtype == np.float16 and stored.shape == (len(paths) * grid.positions, 8)
    for i, m in enumerate(maps["block"]):
        rows = stored[grid.ids(i, 0, 0):grid.ids(i, 0, 0) + grid.positions]
        if m is None:
            assert np.isnan(rows).all()
            continue
        for y, x in ((0, 0), (3, 7), (11, 11)):
            np.testing.assert_allclose(stored[grid.ids(i, y, x)], m[:, y, x], rtol=2e-3, atol=1e-4)
        np.testing.assert_allclose(rows.astype(np.float32), m.transpose(1, 2, 0).reshape(-1, 8), rtol=2e-3, atol=1e-4)
    image, y, x = grid.unravel(np.array([grid.ids(5, 3, 7)]))
    assert (image[0], y[0], x[0]) == (5, 3, 7)


def test_batch_size_and_workers_do_not_change_the_index(data: Path, weights: Path, index: Path,
                                                         tmp_path: Path) -> None:
    for batch_size, workers in ((1, 0), (64, 0)):
        other = run_build(data, weights, tmp_path / f"b{batch_size}.h5", batch_size, workers)
        with h5py.File(index) as a, h5py.File(other) as b:
            for name in LAYERS:
                for field in ("image", "y", "x", "box"):
                    assert np.array_equal(a[f"layers/{name}/{field}"][()], b[f"layers/{name}/{field}"][()])
                np.testing.assert_allclose(a[f"layers/{name}/value"][()], b[f"layers/{name}/value"][()],
                                           rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(a["embeddings/down"][()], b["embeddings/down"][()], rtol=1e-5, atol=1e-6)


def test_fewer_images_than_k_pads(data: Path, weights: Path, tmp_path: Path) -> None:
    out = run_build(data, weights, tmp_path / "k50.h5", batch_size=16, workers=0, k=50)
    with IndexReader(out) as reader:
        layer = reader.layer("down")
        mean = reader.layer_mean("down")
        readable = reader.attrs["num_images"] - reader.attrs["num_skipped"]
    assert (layer.image[:, readable:] == -1).all() and np.isnan(layer.value[:, readable:]).all()
    # every readable image is a hit here, so the mean is the exactly rounded mean of the table's scores
    assert mean is not None
    assert mean.tolist() == [math.fsum(row[:readable].astype(np.float64).tolist()) / readable for row in layer.value]
    assert (layer.box[:, readable:] == -1).all()
    assert (layer.image[:, :readable] >= 0).all()


def test_attributes_follow_the_format(index: Path, data: Path) -> None:
    with IndexReader(index) as reader:
        attrs = reader.attrs
        config = reader.config
    assert attrs["format"] == "actindex" and attrs["format_version"] == 1
    assert attrs["model"] == "tiny_models:tiny_net" and attrs["weights"].endswith("tiny.pt")
    assert attrs["input_size"] == SIZE and attrs["k"] == 5 and attrs["num_images"] == 38
    assert attrs["data_root"] == str(data.resolve())
    assert config["layers"] == list(LAYERS) and config["batch_size"] == 7


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_build_equals_cpu_build(data: Path, weights: Path, index: Path, tmp_path: Path) -> None:
    out = tmp_path / "cuda.h5"
    build_index(BuildConfig(data=data, model="tiny_models:tiny_net", out=out, weights=str(weights), layers=LAYERS,
                            k=5, bottom_k=BOTTOM_K, input_size=SIZE, batch_size=7, workers=2, embed_layer="down",
                            device="cuda"))
    with h5py.File(index) as a, h5py.File(out) as b:
        for table in [f"layers/{name}" for name in LAYERS] + [f"layers/{name}/bottom" for name in LAYERS]:
            for field in ("image", "y", "x", "box"):
                assert np.array_equal(a[f"{table}/{field}"][()], b[f"{table}/{field}"][()]), (table, field)
            np.testing.assert_allclose(a[f"{table}/value"][()], b[f"{table}/value"][()], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(a["embeddings/down"][()], b["embeddings/down"][()], rtol=1e-3, atol=1e-3)
