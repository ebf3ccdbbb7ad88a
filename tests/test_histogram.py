"""Per-unit score histograms (kernels/histogram.py): bins against float64 arithmetic, quantiles against numpy,
exact under any batching and merge, and stored by a build and shown by `neuron`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from actindex.indexer.index_file import IndexReader
from actindex.kernels import histogram
from actindex.kernels.histogram import BINS, UnitHistogram, bin_index, bin_midpoints, firing_rate, quantiles
from actindex.query.cli import main as cli

from helpers import LAYERS, tiny_index

QS = [0.0, 0.01, 0.5, 0.9, 0.99, 0.999, 1.0]


def reference_bin(v: float) -> int:
    """The bin of one value by float64 arithmetic (frexp is exact), independent of the float32 bit tricks."""
    p = histogram.PER_SIGN
    if np.isnan(v):
        return histogram.NAN
    if v == 0:
        return histogram.ZERO
    mantissa, exponent = np.frexp(abs(v))  # |v| = mantissa · 2^exponent, mantissa in [0.5, 1)
    octave = int(exponent) - 1  # |v| in [2^octave, 2^(octave + 1))
    if octave < histogram.MIN_EXPONENT and not np.isinf(v):
        offset = 1
    elif octave >= histogram.MAX_EXPONENT or np.isinf(v):
        offset = p + 2
    else:
        offset = 2 + (octave - histogram.MIN_EXPONENT) * histogram.SUB_BINS + int((2 * mantissa - 1) * 64)
    return histogram.ZERO + offset if v > 0 else histogram.ZERO - offset


def scores(seed: int, n: int = 4000) -> np.ndarray:
    """(n,) float32 scores over many orders of magnitude, both signs, zeros, and the edges of the range."""
    rng = np.random.default_rng(seed)
    parts = [rng.lognormal(0, 4, n // 2), -rng.lognormal(-1, 3, n // 4), np.zeros(n // 20),
             rng.uniform(0, 1, n // 4), [2.0**-20, -(2.0**-20), 2.0**20, -(2.0**20), 1e-30, -1e-30, 3e38, 1.4e-45]]
    return rng.permutation(np.concatenate(parts)).astype(np.float32)


def test_bins_match_float64_arithmetic_and_are_ordered_by_value() -> None:
    v = np.concatenate([scores(0), np.array([np.inf, -np.inf, np.nan], dtype=np.float32)])
    got = bin_index(torch.from_numpy(v)).numpy()
    assert got.tolist() == [reference_bin(float(x)) for x in v]
    assert got.min() >= 0 and got.max() < BINS
    finite = v[~np.isnan(v)]
    assert (np.diff(bin_index(torch.from_numpy(np.sort(finite))).numpy()) >= 0).all()
    mid = bin_midpoints().numpy()
    in_range = (np.abs(v) >= 2.0**histogram.MIN_EXPONENT) & (np.abs(v) < 2.0**histogram.MAX_EXPONENT)
    assert (np.abs(mid[got[in_range]] - v[in_range]) <= np.abs(v[in_range]) / 128).all()  # the 0.78 % bound


def test_counts_are_exact_whatever_the_batching_and_the_merge_order() -> None:
    values = torch.from_numpy(np.stack([scores(1), scores(2), scores(3)], axis=1))  # (N, 3)
    whole = UnitHistogram(3)
    whole.add(values)
    shards = []
    for chunk in torch.tensor_split(values, [7, 1000, 2500]):
        part = UnitHistogram(3)
        for batch in torch.split(chunk, 33):
            part.add(batch)
        shards.append(part)
    merged = UnitHistogram(3)
    for part in reversed(shards):
        merged.merge(part)
    assert torch.equal(merged.counts, whole.counts)
    for unit in range(3):
        expected = np.bincount([reference_bin(float(x)) for x in values[:, unit]], minlength=BINS)
        assert np.array_equal(whole.counts[unit].numpy(), expected)


def test_quantiles_are_within_0_78_percent_of_numpy_and_firing_rates_exact() -> None:
    values = np.stack([scores(4), scores(5), np.maximum(scores(6), 0)], axis=1)  # (N, 3): the last is ReLU'd
    h = UnitHistogram(3)
    h.add(torch.from_numpy(values))
    got = quantiles(h.counts, QS).numpy()  # (3, Q)
    for unit in range(3):
        exact = np.quantile(values[:, unit], QS, method="inverted_cdf")
        for q, ours, theirs in zip(QS, got[unit], exact, strict=True):
            if 2.0**histogram.MIN_EXPONENT <= abs(theirs) < 2.0**histogram.MAX_EXPONENT:
                assert abs(ours - theirs) <= abs(theirs) / 128, (unit, q)
            elif theirs == 0:
                assert ours == 0
    assert np.array_equal(firing_rate(h.counts).numpy(), (values > 0).mean(axis=0))


def test_nan_scores_are_counted_apart_and_a_unit_without_scores_has_no_quantiles() -> None:
    h = UnitHistogram(2)
    h.add(torch.tensor([[float("nan"), 1.0], [float("nan"), 3.0]]))
    assert h.counts[0, histogram.NAN] == 2 and torch.isnan(quantiles(h.counts, [0.5])[0]).all()
    assert quantiles(h.counts, [1.0])[1, 0] == pytest.approx(3.0, rel=1 / 128)


# -------------------------------------------------------------------------------------------- in an index


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return tiny_index(tmp_path_factory.mktemp("hist"), LAYERS, k=4, n=30, seed=3)


def test_a_build_stores_the_histogram_of_every_unit_s_scores(built: tuple[Path, Path, Path]) -> None:
    """Against the scores of the index's own brute force: the top-k values are the largest scores, so the
    highest occupied bins hold them, and every readable image is counted once per unit."""
    index = built[0]
    with IndexReader(index) as reader, h5py.File(index) as f:
        readable = reader.info.num_images - reader.info.num_skipped
        for name in LAYERS:
            counts = f[f"layers/{name}/hist"][()]  # (C, BINS)
            hits = reader.layer(name)
            assert counts.shape == (hits.grid.channels, BINS) and (counts.sum(axis=1) == readable).all()
            top_bins = bin_index(torch.from_numpy(hits.value[:, 0])).numpy()  # the best score's bin, per unit
            highest = BINS - 1 - np.argmax((counts[:, ::-1] > 0), axis=1)  # highest occupied bin, per unit
            assert np.array_equal(top_bins, highest), name
            d = reader.distribution(name, 0)
            assert d is not None and d.count == readable
            assert d.quantiles[0.999] == pytest.approx(float(hits.value[0, 0]), rel=1 / 128)


def test_neuron_shows_the_unit_s_distribution(built: tuple[Path, Path, Path], tmp_path: Path) -> None:
    index = built[0]
    runner = CliRunner()
    result = runner.invoke(cli, ["neuron", str(index), "--layer", "down", "--unit", "1", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)["distribution"]
    with IndexReader(index) as reader, h5py.File(index) as f:
        counts = torch.from_numpy(f["layers/down/hist"][1:2])
        assert shown["images"] == reader.info.num_images - reader.info.num_skipped
    assert shown["firing_rate"] == float(firing_rate(counts)[0])
    assert list(shown["quantiles"]) == ["p50", "p90", "p99", "p99.9"]
    text = runner.invoke(cli, ["neuron", str(index), "--layer", "down", "--unit", "1", "--out",
                               str(tmp_path / "u.png")]).output
    assert f"over all {shown['images']} images: fires (> 0) on" in text

    old = tmp_path / "old.h5"  # an index from before the histograms: no distribution, no error
    old.write_bytes(index.read_bytes())
    (tmp_path / index.with_suffix(".faiss").name).write_bytes(index.with_suffix(".faiss").read_bytes())
    with h5py.File(old, "a") as f:
        for name in LAYERS:
            del f[f"layers/{name}/hist"]
    result = runner.invoke(cli, ["neuron", str(old), "--layer", "down", "--unit", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["distribution"] is None


# -------------------------------------------------------------------------------------------- class means


def test_class_sums_are_exact_under_any_batching_and_within_2_to_the_minus_25_of_the_means() -> None:
    from actindex.kernels.class_sums import ClassSums

    rng = np.random.default_rng(7)
    values = rng.lognormal(0, 2, (500, 4)).astype(np.float32) * rng.choice([-1, 1], (500, 4))  # (N, C)
    labels = rng.integers(0, 5, 500)
    labels[labels == 3] = 2  # class 3 has no images
    whole = ClassSums(5, 4)
    whole.add(torch.from_numpy(values), torch.from_numpy(labels))
    merged = ClassSums(5, 4)
    for chunk in np.array_split(np.arange(500), [3, 200, 201]):
        part = ClassSums(5, 4)
        for batch in np.array_split(chunk, 7):
            part.add(torch.from_numpy(values[batch]), torch.from_numpy(labels[batch]))
        merged.merge(part)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), merged.state_dict().values(),
                                                 strict=True))
    means = whole.means().numpy()
    for k in range(5):
        rows = values[labels == k].astype(np.float64)
        if len(rows) == 0:
            assert np.isnan(means[k]).all()
        else:
            assert np.abs(means[k] - rows.mean(axis=0)).max() <= 2.0**-25 + 1e-12 * np.abs(rows).max()


def test_selectivity_follows_morcos_formula() -> None:
    from actindex.kernels.class_sums import selectivity

    means = torch.tensor([[4.0, 1.0, 0.0, 5.0], [1.0, 1.0, 0.0, -1.0], [1.0, 1.0, float("nan"), 1.0]],
                         dtype=torch.float64)  # (K, C)
    index = selectivity(means)
    assert index[0] == pytest.approx((4 - 1) / (4 + 1)) and index[1] == 0.0
    assert torch.isnan(index[2]) and torch.isnan(index[3])  # all zero; a negative class mean


def test_class_means_of_a_build_equal_per_class_brute_force_and_neuron_shows_them(
        built: tuple[Path, Path, Path]) -> None:
    from actindex.indexer.images import Normalize, load_rgb, preprocess
    from actindex.indexer.models import load_model
    from actindex.indexer.taps import tapped
    from actindex.kernels.spatial import spatial_max

    index, data, weights = built
    with IndexReader(index) as reader, h5py.File(index) as f:
        paths, labels, skipped = reader.image_paths(), reader.image_labels(), {p for p, _ in reader.skipped()}
        info = reader.info
        loaded = load_model(info.model, str(weights))
        normalize = Normalize(info.mean, info.std, "cpu")
        found: dict[str, list[torch.Tensor]] = {name: [] for name in LAYERS}
        readable = [i for i, p in enumerate(paths) if p not in skipped]
        for i in readable:  # one image at a time: the brute force shares no batch with the build
            x = normalize(preprocess(load_rgb(data / paths[i]), info.input_size).unsqueeze(0))
            with torch.inference_mode(), tapped(loaded.module, list(LAYERS),
                                                lambda n, o: found[n].append(spatial_max(o)[0][0])):
                loaded.module(x)
        for name in LAYERS:
            scores = torch.stack(found[name]).numpy().astype(np.float64)  # (n, C)
            stored = f[f"layers/{name}/class_mean"][()]  # (K, C)
            for k in range(len(reader.classes())):
                rows = scores[labels[readable] == k]
                np.testing.assert_allclose(stored[k], rows.mean(axis=0), rtol=1e-5, atol=1e-6, err_msg=name)
    with h5py.File(index) as f:
        stored = f["layers/down/class_mean"][()]
    result = CliRunner().invoke(cli, ["neuron", str(index), "--layer", "down", "--unit", "0", "--json"])
    shown = json.loads(result.output)["classes"]
    best = int(np.nanargmax(stored[:, 0]))
    assert shown["top"][0]["class"] == f"class{best}" and shown["top"][0]["mean"] == stored[best, 0]
    assert 0 <= shown["selectivity"] <= 1 or (math.isnan(shown["selectivity"]) and (stored[:, 0] < 0).any())

