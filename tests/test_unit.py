"""`actindex unit`: a unit's profile from the index's tables alone, against the tables read directly and against
brute-force scores of every image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from actindex.indexer.index_file import IndexReader
from actindex.query.cli import main
from actindex.query.unit import unit_summary

from helpers import make_images, run_build
from tiny_models import tiny_net

LAYERS = ("stem", "down", "head")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unit")
    make_images(root / "data", n=24, seed=5)
    weights = root / "tiny.pt"
    torch.save(tiny_net().state_dict(), weights)
    return run_build(root / "data", weights, root / "index.h5", k=4, layers=LAYERS, bottom_k=3)


@pytest.mark.parametrize(("layer", "unit"), [("stem", 1), ("down", 5), ("head", 2)])
def test_json_is_the_tables_of_the_index(built: Path, layer: str, unit: int) -> None:
    result = CliRunner().invoke(main, ["unit", str(built), "--layer", layer, "--unit", str(unit), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    with IndexReader(built) as reader:
        top, lowest = reader.layer(layer), reader.layer(layer, lowest=True)
        distribution, classes = reader.distribution(layer, unit), reader.unit_classes(layer, unit)
        paths = reader.image_paths()
        mean = reader.layer_mean(layer)
    assert distribution is not None and classes is not None and mean is not None
    assert report["mean"] == pytest.approx(float(mean[unit]))
    assert report["distribution"]["firing_rate"] == distribution.firing_rate
    assert report["distribution"]["quantiles"]["p99"] == distribution.quantiles[0.99]
    assert report["classes"]["top"][0]["class"] == classes.top[0][0]
    for key, table in (("top", top), ("lowest", lowest)):
        rows = report[key]
        assert [r["image_id"] for r in rows] == table.image[unit].tolist()
        assert [r["path"] for r in rows] == [paths[i] for i in table.image[unit]]
        assert [r["score"] for r in rows] == table.value[unit].astype(float).tolist()
        assert [r["box"] for r in rows] == table.box[unit].tolist()
    scores = [r["score"] for r in report["lowest"]]
    assert scores == sorted(scores) and scores[0] <= report["top"][-1]["score"]


def test_text_names_every_part_and_k_limits_the_images(built: Path) -> None:
    result = CliRunner().invoke(main, ["unit", str(built), "--layer", "down", "--unit", "5", "--k", "2"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert text.startswith("down unit 5 of ")
    for part in ("fires (> 0) on", "p99", "mean score by class: class", "top 2 images:", "lowest 2 images:"):
        assert part in text
    summary = unit_summary(built, "down", 5, k=2, classes=1)
    assert len(summary.top) == 2 and summary.lowest is not None and len(summary.lowest) == 2
    assert summary.classes is not None and len(summary.classes.top) == 1


def test_an_index_without_bottom_k_lists_no_lowest_images(built: Path, tmp_path: Path) -> None:
    data, weights = built.parent / "data", built.parent / "tiny.pt"
    plain = run_build(data, weights, tmp_path / "plain.h5", k=3, layers=("head",))
    summary = unit_summary(plain, "head", 0)
    assert summary.lowest is None and "lowest" not in "\n".join(summary.lines())
    assert summary.to_json()["lowest"] is None


@pytest.mark.parametrize(("args", "message"), [
    (["--layer", "nope", "--unit", "0"], "unknown layer 'nope'"),
    (["--layer", "head", "--unit", "99"], "unit 99 is out of range: layer 'head' has"),
    (["--layer", "head", "--unit", "0", "--k", "0"], "--k must be at least 1"),
])
def test_bad_requests_are_one_line(built: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["unit", str(built), *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_wrong_file_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "x.h5"
    bogus.write_bytes(np.arange(10).tobytes())
    result = CliRunner().invoke(main, ["unit", str(bogus), "--layer", "head", "--unit", "0"])
    assert result.exit_code != 0 and "Traceback" not in result.output


@pytest.mark.parametrize("layer", ["stem", "head"])
def test_neuron_lowest_re_runs_and_draws_the_lowest_images(built: Path, tmp_path: Path, layer: str) -> None:
    maps, picture = tmp_path / "low.npz", tmp_path / "low.png"
    result = CliRunner().invoke(main, ["neuron", str(built), "--layer", layer, "--unit", "1", "--lowest", "--json",
                                       "--save-maps", str(maps), "--out", str(picture)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    with IndexReader(built) as reader:
        lowest = reader.layer(layer, lowest=True)
    assert report["lowest"] is True
    assert [h["image_id"] for h in report["hits"]] == lowest.image[1].tolist()
    arrays = np.load(maps)
    for rank, hit in enumerate(report["hits"]):
        assert hit["recomputed"] == pytest.approx(hit["score"], rel=1e-4, abs=1e-5)
        # the recorded score is the minimum of the unit's whole map, at the recorded position
        assert float(arrays["activation"][rank].min()) == pytest.approx(hit["score"], rel=1e-5, abs=1e-6)
        y, x = hit["position"]
        assert float(arrays["activation"][rank][y, x]) == pytest.approx(hit["score"], rel=1e-5, abs=1e-6)
    assert "mask_input" not in arrays  # masks mark the unit's top level, not its lowest
    assert picture.is_file()


def test_neuron_lowest_needs_bottom_k(built: Path, tmp_path: Path) -> None:
    plain = run_build(built.parent / "data", built.parent / "tiny.pt", tmp_path / "plain.h5", k=3, layers=("head",))
    result = CliRunner().invoke(main, ["neuron", str(plain), "--layer", "head", "--unit", "0", "--lowest"])
    assert result.exit_code != 0 and "--bottom-k" in result.output and "Traceback" not in result.output
