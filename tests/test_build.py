"""An end-to-end build on generated images with a tiny model, checked against brute force."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from actindex.indexer.build import BuildConfig, build_index
from actindex.indexer.index_file import IndexReader
from actindex.indexer.models import IMAGENET_MEAN, IMAGENET_STD

from helpers import LAYERS, SIZE, make_images, run_build
from tiny_models import tiny_net

# (size, stride, padding) per axis, worked out by hand in TinyNet's docstring; head sees the whole input.
FIELDS = {"stem": ((5, 2, 2), (5, 2, 2)), "block": ((25, 4, 12), (17, 4, 8)),
          "down": ((33, 8, 16), (25, 8, 12)), "head": ((SIZE, SIZE, 0), (SIZE, SIZE, 0))}


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


def expected_hits(maps: list[np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Per channel: sort all readable images by (-score, id), take k; first row-major argmax as position."""
    ids = [i for i, m in enumerate(maps) if m is not None]
    stack = np.stack([maps[i] for i in ids])  # (n, C, H, W)
    n, c, h, w = stack.shape
    flat = stack.reshape(n, c, h * w)
    scores = flat.max(axis=2)  # (n, C)
    argmax = flat.argmax(axis=2)  # numpy also returns the first occurrence
    out = {"value": np.full((c, k), np.nan, np.float32), "image": np.full((c, k), -1),
           "y": np.full((c, k), -1), "x": np.full((c, k), -1)}
    for ch in range(c):
        order = sorted(range(n), key=lambda j: (-scores[j, ch], ids[j]))[:k]
        out["value"][ch, :len(order)] = scores[order, ch]
        out["image"][ch, :len(order)] = [ids[j] for j in order]
        out["y"][ch, :len(order)] = argmax[order, ch] // w
        out["x"][ch, :len(order)] = argmax[order, ch] % w
    return out


def expected_box(y: int, x: int, field: tuple[tuple[int, int, int], tuple[int, int, int]]) -> list[int]:
    (ry, sy, py), (rx, sx, px) = field
    y0, x0 = y * sy - py, x * sx - px
    return [max(y0, 0), max(x0, 0), min(y0 + ry, SIZE), min(x0 + rx, SIZE)]


@pytest.fixture(scope="module")
def index(data: Path, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_build(data, weights, tmp_path_factory.mktemp("index") / "index.h5", batch_size=7, workers=2)


def test_every_value_id_position_and_box_equals_brute_force(data: Path, weights: Path, index: Path) -> None:
    paths, maps = brute_force(data, weights)
    with IndexReader(index) as reader:
        assert reader.image_paths() == paths
        assert reader.skipped() == [("class1/img_broken.jpg", reader.skipped()[0][1])]
        for name in LAYERS:
            layer = reader.layer(name)
            expected = expected_hits(maps[name], k=5)
            assert np.array_equal(layer.image, expected["image"]), name
            np.testing.assert_allclose(layer.value, expected["value"], rtol=1e-5, atol=1e-5, err_msg=name)
            assert np.array_equal(layer.y, expected["y"]) and np.array_equal(layer.x, expected["x"]), name
            field = FIELDS[name]
            assert (layer.rf_size, layer.rf_stride, layer.rf_padding) == tuple(
                (field[0][i], field[1][i]) for i in range(3)), name
            boxes = [[expected_box(y, x, field) for y, x in zip(ys, xs, strict=True)]
                     for ys, xs in zip(layer.y, layer.x, strict=True)]
            assert np.array_equal(layer.box, np.array(boxes)), name


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
                            k=5, input_size=SIZE, batch_size=7, workers=2, embed_layer="down", device="cuda"))
    with h5py.File(index) as a, h5py.File(out) as b:
        for name in LAYERS:
            for field in ("image", "y", "x", "box"):
                assert np.array_equal(a[f"layers/{name}/{field}"][()], b[f"layers/{name}/{field}"][()]), name
            np.testing.assert_allclose(a[f"layers/{name}/value"][()], b[f"layers/{name}/value"][()],
                                       rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(a["embeddings/down"][()], b["embeddings/down"][()], rtol=1e-3, atol=1e-3)
