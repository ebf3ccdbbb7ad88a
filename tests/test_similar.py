"""Similarity search: the FAISS file the build writes, `actindex faiss`, and `actindex similar` against numpy."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from actindex.indexer.index_file import IndexReader
from actindex.indexer.similarity import vector_index_path
from actindex.kernels.errors import UserError
from actindex.query.cli import main
from actindex.query.render import GAP, TILE
from actindex.query.similar import find_similar

from helpers import SIZE, run_build, tiny_index

LAYERS = ("block", "down")


def build(data: Path, weights: Path, out: Path, embed_layer: str = "down", factory: str | None = None) -> Path:
    return run_build(data, weights, out, k=4, layers=LAYERS, embed_layer=embed_layer, factory=factory)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return tiny_index(tmp_path_factory.mktemp("similar"), LAYERS, k=4, n=30, seed=7)


def exact(index: Path, query: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    """Cosine top-k over every stored vector with numpy, unreadable images (NaN rows) left out."""
    with IndexReader(index) as reader:
        vectors = reader.embeddings("down")[()]
    valid = np.isfinite(vectors).all(axis=1)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = np.where(valid, unit @ (query / np.linalg.norm(query)), -np.inf)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
    return order, scores[order]


def test_the_build_writes_a_faiss_file_named_in_the_attributes(built: tuple[Path, Path, Path]) -> None:
    index, _, _ = built
    with IndexReader(index) as reader:
        attrs = reader.attrs
    assert attrs["faiss_index"] == "index.faiss" and vector_index_path(index).is_file()
    assert attrs["faiss_layer"] == "down" and "Flat" in attrs["faiss_factory"]
    assert attrs["faiss_count"] == attrs["num_images"] - attrs["num_skipped"]
    assert not list(index.parent.glob(".index.faiss.tmp*"))


def test_every_indexed_image_finds_itself_first_and_results_equal_exact_search(
        built: tuple[Path, Path, Path]) -> None:
    index, _, _ = built
    with IndexReader(index) as reader:
        vectors = reader.embeddings("down")[()]
        skipped = {p for p, _ in reader.skipped()}
        paths = reader.image_paths()
    for image_id in range(len(paths)):
        if paths[image_id] in skipped:
            continue
        result = find_similar(index, image_id=image_id, k=5)
        assert result.hits[0].image_id == image_id and result.hits[0].score == pytest.approx(1.0, abs=1e-5)
        ids, scores = exact(index, vectors[image_id], 5)
        assert [h.image_id for h in result.hits] == ids
        np.testing.assert_allclose([h.score for h in result.hits], scores, rtol=1e-5, atol=1e-6)


def test_a_new_image_is_embedded_like_the_build(built: tuple[Path, Path, Path]) -> None:
    index, data, _ = built
    result = find_similar(index, image=data / "class2" / "img005.png", k=3)
    with IndexReader(index) as reader:
        own = reader.image_paths().index("class2/img005.png")
    assert result.hits[0].image_id == own and result.hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_explain_gives_maps_and_the_units_that_make_the_score(built: tuple[Path, Path, Path]) -> None:
    index, _, _ = built
    result = find_similar(index, image_id=3, k=4, explain=True)
    assert result.maps is not None and result.maps.shape == (4, 3, SIZE, SIZE)
    assert np.abs(result.maps).sum(axis=(1, 2, 3)).min() > 0
    with IndexReader(index) as reader:
        vectors = reader.embeddings("down")[()]
    q = vectors[3] / np.linalg.norm(vectors[3])
    for hit in result.hits:
        v = vectors[hit.image_id] / np.linalg.norm(vectors[hit.image_id])
        terms = q * v  # they sum to the cosine score
        assert terms.sum() == pytest.approx(hit.score, abs=1e-5)
        assert [u for u, _ in hit.units] == list(np.argsort(-terms, kind="stable")[:5])
        np.testing.assert_allclose([c for _, c in hit.units], np.sort(terms)[::-1][:5], rtol=1e-4, atol=1e-6)


def test_cli_json_and_picture_agree(built: tuple[Path, Path, Path], tmp_path: Path) -> None:
    index, _, _ = built
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(main, ["similar", str(index), "--id", "7", "--k", "6", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["outputs"]["image"] == str(out) and len(report["hits"]) == 6
    assert report["query"]["id"] == 7 and report["hits"][0]["image_id"] == 7
    assert Image.open(out).width == GAP + 7 * (TILE + GAP)  # the query and six hits


def test_faiss_command_rebuilds_with_another_factory(built: tuple[Path, Path, Path], tmp_path: Path) -> None:
    index, _, _ = built
    copy = tmp_path / "copy.h5"
    shutil.copy(index, copy)
    result = CliRunner().invoke(main, ["faiss", str(copy), "--factory", "IVF2,Flat"])
    assert result.exit_code == 0, result.output
    with IndexReader(copy) as reader:
        assert reader.attrs["faiss_factory"] == "IVF2,Flat" and reader.attrs["faiss_index"] == "copy.faiss"
    hits = find_similar(copy, image_id=4, k=3).hits
    assert hits[0].image_id == 4


def test_no_faiss_file_a_missing_one_and_a_foreign_one_are_refused(built: tuple[Path, Path, Path],
                                                                   tmp_path: Path) -> None:
    index, data, weights = built
    bare = build(data, weights, tmp_path / "bare.h5", factory="none")
    assert not vector_index_path(bare).exists()
    with pytest.raises(UserError, match="has no FAISS index; build one with: actindex faiss"):
        find_similar(bare, image_id=0)
    copy = tmp_path / "copy.h5"
    shutil.copy(index, copy)
    with h5py.File(copy, "r+") as f:
        f.attrs["faiss_index"] = "copy.faiss"
    with pytest.raises(UserError, match="is missing; rebuild it with: actindex faiss"):
        find_similar(copy, image_id=0)
    other = build(data, weights, tmp_path / "other.h5", embed_layer="block")  # 8-d vectors, not 16-d
    shutil.copy(vector_index_path(other), vector_index_path(copy))
    with pytest.raises(UserError, match="does not belong to"):
        find_similar(copy, image_id=0)


@pytest.mark.parametrize(("args", "message"), [
    (["--id", "99"], r"--id 99 is out of range: the index has images 0-30"),
    (["--id", "0", "--image", "x.png"], "give either --image PATH or --id N"),
    ([], "give either --image PATH or --id N"),
    (["--image", "nope.png"], "cannot read --image 'nope.png'"),
    (["--id", "0", "--layer", "block"], "unknown embedding layer 'block'"),
])
def test_cli_errors_are_one_line(built: tuple[Path, Path, Path], tmp_path: Path, args: list[str],
                                 message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    index, _, _ = built
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["similar", str(index), *args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "similar.png").exists()


def test_a_skipped_image_has_no_vector(built: tuple[Path, Path, Path]) -> None:
    index, _, _ = built
    with IndexReader(index) as reader:
        broken = reader.image_paths().index("class1/img_broken.jpg")
    with pytest.raises(UserError, match="could not be read at build time and has no vector"):
        find_similar(index, image_id=broken)


def test_a_bad_factory_is_refused_before_any_work(built: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, data, weights = built
    out = tmp_path / "bad.h5"
    with pytest.raises(UserError, match="bad index factory 'IVFx,Nope'"):
        build(data, weights, out, factory="IVFx,Nope")
    assert not out.exists() and not (tmp_path / "bad.h5.partial").exists()


def test_a_search_by_id_loads_only_what_its_answer_needs(built: tuple[Path, Path, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """--json needs neither the network nor the images (which may have moved away); the picture needs the
    images but not the network; --explain needs both."""
    index, data, weights = built
    copy = tmp_path / "copy.h5"
    shutil.copy(index, copy)
    shutil.copy(vector_index_path(index), vector_index_path(copy))
    with h5py.File(copy, "r+") as f:
        f.attrs["faiss_index"] = "copy.faiss"
        f.attrs["data_root"] = str(tmp_path / "gone")  # the images moved
        f.attrs["weights"] = str(tmp_path / "gone.pt")  # and so did the weights
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["similar", str(copy), "--id", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outputs"]["image"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.faiss", "copy.h5"]  # no picture left behind
    code = (f"import sys; from actindex.query.cli import main\ntry:\n    main(['similar', {str(copy)!r}, '--id', '4', "
            "'--json'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules), file=sys.stderr)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stderr.strip().splitlines()[-1] == "[]"  # nothing of the network's libraries is even imported
    result = CliRunner().invoke(main, ["similar", str(copy), "--id", "4", "--data-root", str(data)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "similar.png").is_file()
    result = CliRunner().invoke(main, ["similar", str(copy), "--id", "4", "--data-root", str(data), "--explain"])
    assert result.exit_code == 1 and "pass --weights PATH to a copy of it" in result.output
    result = CliRunner().invoke(main, ["similar", str(copy), "--id", "4", "--data-root", str(data), "--explain",
                                       "--weights", str(weights), "--json", "--out", str(tmp_path / "e.png")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["hits"][0]["units"] and (tmp_path / "e.png").is_file()


def test_an_index_without_vectors_says_so_and_how_to_get_them(built: tuple[Path, Path, Path],
                                                             tmp_path: Path) -> None:
    _, data, weights = built
    bare = run_build(data, weights, tmp_path / "bare.h5", k=4, layers=LAYERS, embed_layer="")
    for command in (["similar", str(bare), "--id", "0"], ["faiss", str(bare)]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 1, result.output
        assert "stores no per-image vectors" in result.output and "--embed-layer ''" in result.output
        assert "without that option" in result.output and "(none)" not in result.output


def test_info_on_a_folder_and_on_an_index_whose_faiss_file_is_gone(built: tuple[Path, Path, Path],
                                                                   tmp_path: Path) -> None:
    index, _, _ = built
    result = CliRunner().invoke(main, ["info", str(index.parent)])
    assert result.exit_code == 1
    assert "is a folder, not an index" in result.output and "index.h5" in result.output
    assert "does not exist" not in result.output
    copy = tmp_path / "copy.h5"
    shutil.copy(index, copy)
    shutil.copy(vector_index_path(index), vector_index_path(copy))
    with h5py.File(copy, "r+") as f:
        f.attrs["faiss_index"] = "copy.faiss"
    result = CliRunner().invoke(main, ["info", str(copy)])
    assert "similarity index copy.faiss: IDMap2,Flat over 30 vectors" in result.output
    vector_index_path(copy).unlink()
    result = CliRunner().invoke(main, ["info", str(copy)])
    assert result.exit_code == 0
    assert "similarity index copy.faiss: missing" in result.output and f"actindex faiss {copy}" in result.output
    result = CliRunner().invoke(main, ["info", str(copy), "--json"])
    assert json.loads(result.stdout)["faiss"]["present"] is False


def test_an_index_opened_once_answers_many_queries_and_never_reads_the_whole_image_list(
        built: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """`Index`: the network is loaded once for all queries, the answers equal one-shot queries', and nothing of a
    query reads the N image paths or the N x D vectors (only the rows it needs)."""
    from actindex.indexer.index_file import IndexReader as Reader
    from actindex.query import loading
    from actindex.query.index import Index
    from actindex.query.neuron import query_neuron

    index, _, _ = built
    one_shot = [find_similar(index, image_id=i, k=4) for i in (2, 9)], query_neuron(index, "down", 3)
    loads: list[object] = []
    real_load = loading.load_index_model
    monkeypatch.setattr(loading, "load_index_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))

    def whole(*args: object) -> None:
        raise AssertionError("a query read every image path")

    monkeypatch.setattr(Reader, "image_paths", whole)
    with Index(index) as opened:
        near = [opened.similar(image_id=i, k=4) for i in (2, 9)]
        units = [opened.neuron("down", 3), opened.neuron("block", 1), opened.neuron("down", 3)]
        explained = opened.similar(image_id=2, k=4, explain=True)
    assert len(loads) == 1  # one network for every query
    for ours, theirs in zip(near, one_shot[0], strict=True):
        assert [(h.image_id, h.path, h.score) for h in ours.hits] == [(h.image_id, h.path, h.score)
                                                                       for h in theirs.hits]
    assert [h.path for h in units[0].hits] == [h.path for h in one_shot[1].hits]
    np.testing.assert_array_equal(units[2].guided, one_shot[1].guided)
    assert explained.maps is not None and explained.hits[0].units


def test_the_build_stores_vectors_that_queries_read_by_id(built: tuple[Path, Path, Path]) -> None:
    from actindex.indexer.similarity import StoredVectors

    index, _, _ = built
    with IndexReader(index) as reader:
        dataset = reader.embeddings("down")
        assert dataset.chunks is None and dataset.dtype == np.dtype("<f4")  # contiguous: rows at known offsets
        stored = StoredVectors(dataset)
        assert stored._fd is not None
        ids = np.array([4, 0, 4, 27])
        np.testing.assert_array_equal(stored.rows(ids), dataset[()][ids])
        stored.close()


def test_a_calibration_that_misses_its_target_is_said_by_faiss_and_info(built: tuple[Path, Path, Path],
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from actindex.indexer import similarity

    index, _, _ = built
    copy = tmp_path / "copy.h5"
    shutil.copy(index, copy)
    real = similarity.build_vector_index

    def missed(*args: object, **kwargs: object) -> object:
        built_index, info = real(*args, **kwargs)  # type: ignore[arg-type]
        return built_index, dataclasses.replace(info, recall_at_10=0.5, note="recall@10 0.500 is below the target")

    monkeypatch.setattr(similarity, "build_vector_index", missed)
    result = CliRunner().invoke(main, ["faiss", str(copy)])
    assert result.exit_code == 0 and "Warning: recall@10 0.500 is below the target" in result.output
    result = CliRunner().invoke(main, ["info", str(copy)])
    assert "warning: recall@10 0.500 is below the target" in result.output
    with IndexReader(copy) as reader:
        assert reader.info.faiss is not None and reader.info.faiss.note.startswith("recall@10 0.500")
