"""Patch search (`similar --box` / `--from-unit`, `Index.patches`) against an exact numpy search over every stored
(image, position) vector, boxes against the traced receptive fields, and a query on an indexed position finding
that position first."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from actindex.indexer.index_file import IndexReader, LayerGrid
from actindex.indexer.similarity import patch_index_path
from actindex.kernels.errors import UserError
from actindex.kernels.receptive_field import trace_geometry
from actindex.query.cli import main
from actindex.query.index import Index
from actindex.query.patches import box_positions

from helpers import SIZE, make_images, run_build
from tiny_models import tiny_net

LAYERS = ("stem", "block", "down")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(index, data, weights): 30 images and a broken file, patch vectors of 'block' (12 x 12 x 8), exact index."""
    root = tmp_path_factory.mktemp("patches")
    make_images(root / "data", n=30, seed=3)
    weights = root / "tiny.pt"
    torch.save(tiny_net().state_dict(), weights)
    index = run_build(root / "data", weights, root / "index.h5", layers=LAYERS, patch_layer="block")
    return index, root / "data", weights


def exact(index: Path, query: np.ndarray, k: int, per_image: int) -> list[tuple[int, int, int, float]]:
    """Brute force: the cosine of `query` with every stored vector, best first (ties to the lower row), at most
    `per_image` from one image."""
    with IndexReader(index) as reader:
        grid = reader.patch_grid("block")
        vectors = reader.patches("block")[()].astype(np.float64)
    valid = np.isfinite(vectors).all(axis=1) & (vectors != 0).any(axis=1)
    norms = np.linalg.norm(vectors, axis=1)
    scores = np.full(len(vectors), -np.inf)
    scores[valid] = vectors[valid] @ query / (norms[valid] * np.linalg.norm(query))
    order = np.lexsort((np.arange(len(scores)), -scores))
    found, taken = [], {}
    for row in order:
        if not np.isfinite(scores[row]):
            break
        image, y, x = (int(v[0]) for v in grid.unravel(np.array([row])))
        if taken.get(image, 0) < per_image:
            taken[image] = taken.get(image, 0) + 1
            found.append((image, y, x, float(scores[row])))
            if len(found) == k:
                break
    return found


def stored_query(index: Path, image: int, positions: list[tuple[int, int]]) -> np.ndarray:
    with IndexReader(index) as reader:
        grid = reader.patch_grid("block")
        vectors = reader.patches("block")[()].astype(np.float64)
    return vectors[[grid.ids(image, y, x) for y, x in positions]].mean(axis=0)


def centre_box(grid: LayerGrid, geometry, y: int, x: int) -> tuple[float, float, float, float]:  # noqa: ANN001
    """A one-pixel box on the original image around the receptive-field centre of (y, x)."""
    cy, cx = grid.centres()
    oy = (cy[y] + geometry.offset_y) * geometry.height / geometry.resized_height
    ox = (cx[x] + geometry.offset_x) * geometry.width / geometry.resized_width
    return oy - 0.25, ox - 0.25, oy + 0.25, ox + 0.25


@pytest.mark.parametrize("per_image", [1, 2, 5])
def test_a_box_search_equals_exact_search_over_every_position(built: tuple[Path, Path, Path],
                                                              per_image: int) -> None:
    index, _, _ = built
    with Index(index) as opened:
        result = opened.patches(image_id=4, box=(5, 10, 40, 50), k=12, per_image=per_image)
    assert len(result.positions) > 1 and not result.nearest
    want = exact(index, stored_query(index, 4, result.positions), 12, per_image)
    got = [(h.image_id, h.y, h.x, h.score) for h in result.hits]
    assert [g[:3] for g in got] == [w[:3] for w in want]
    np.testing.assert_allclose([g[3] for g in got], [w[3] for w in want], rtol=1e-5, atol=1e-6)
    counts = np.bincount([h.image_id for h in result.hits])
    assert counts.max() <= per_image


def test_the_query_positions_are_those_whose_field_centres_lie_in_the_box(built: tuple[Path, Path, Path]) -> None:
    index, _, _ = built
    with Index(index) as opened:
        result = opened.patches(image_id=2, box=(10, 10, 60, 45), k=3)
        grid = opened.reader.patch_grid("block")
        crop = result.query_image.geometry
    y0, x0, y1, x1 = crop.to_input((10, 10, 60, 45))
    cy, cx = grid.centres()
    want = [(y, x) for y in range(grid.height) for x in range(grid.width)
            if y0 <= cy[y] < y1 and x0 <= cx[x] < x1]
    assert result.positions == want
    # The centres themselves: the middle of each traced receptive field (unclipped).
    traced = trace_geometry(tiny_net().eval(), SIZE, ["block"])["block"]
    assert traced.field is not None
    fy, fx = traced.field
    assert np.allclose(cy, [(fy.span(y)[0] + fy.span(y)[1]) / 2 for y in range(grid.height)])
    assert np.allclose(cx, [(fx.span(x)[0] + fx.span(x)[1]) / 2 for x in range(grid.width)])
    # A box between centres takes the nearest one on that axis, and says so.
    positions, nearest = box_positions(grid, (cy[3] + 0.1, cx[5] + 0.1, cy[3] + 0.2, cx[5] + 0.2))
    assert positions == [(3, 5)] and nearest


def test_a_query_on_an_indexed_position_finds_that_position_first(built: tuple[Path, Path, Path]) -> None:
    index, _, _ = built
    rng = np.random.default_rng(0)
    with Index(index) as opened:
        grid = opened.reader.patch_grid("block")
        stored = opened.reader.patches("block")[()]
        for image in (0, 7, 19):
            geometry = opened.images([image])[0].geometry
            for y, x in rng.integers(0, 12, (3, 2)):
                if not stored[grid.ids(image, y, x)].any():
                    continue  # a dead position has no direction and is not indexed
                result = opened.patches(image_id=image, box=centre_box(grid, geometry, int(y), int(x)), k=3)
                assert result.positions == [(y, x)] and not result.nearest
                first = result.hits[0]
                assert (first.image_id, first.y, first.x) == (image, y, x)
                assert first.score == pytest.approx(1.0, abs=1e-5)


def test_hit_boxes_are_the_positions_receptive_fields(built: tuple[Path, Path, Path]) -> None:
    index, _, _ = built
    traced = trace_geometry(tiny_net().eval(), SIZE, ["block"])["block"]
    with Index(index) as opened:
        result = opened.patches(image_id=11, box=(0, 0, 30, 30), k=8)
        hits = opened.images([h.image_id for h in result.hits])
    for hit, image in zip(result.hits, hits, strict=True):
        assert hit.box == traced.box(hit.y, hit.x, (SIZE, SIZE))
        assert hit.box_original == image.geometry.to_original(hit.box)
        assert hit.path == image.path


def test_a_new_image_finds_the_same_patches_as_its_indexed_copy(built: tuple[Path, Path, Path]) -> None:
    index, data, _ = built
    with Index(index) as opened:
        path = opened.paths([6])[0]
        by_id = opened.patches(image_id=6, box=(8, 8, 50, 40), k=6)
        by_file = opened.patches(image=data / path, box=(8, 8, 50, 40), k=6)
    assert by_file.positions == by_id.positions
    assert [(h.image_id, h.y, h.x) for h in by_file.hits] == [(h.image_id, h.y, h.x) for h in by_id.hits]
    np.testing.assert_allclose([h.score for h in by_file.hits], [h.score for h in by_id.hits], atol=2e-3)


def test_a_unit_hit_query_uses_its_receptive_field_box(built: tuple[Path, Path, Path]) -> None:
    index, _, _ = built
    with Index(index) as opened:
        table = opened.layer("down")
        result = opened.patches(from_unit="down:3:2", k=4)
        grid = opened.reader.patch_grid("block")
    image, box = int(table.image[3, 1]), tuple(float(v) for v in table.box[3, 1])
    assert result.query["id"] == image and result.query["unit"] == "down:3:2"
    assert result.positions == box_positions(grid, box)[0]  # type: ignore[arg-type]
    want = exact(index, stored_query(index, image, result.positions), 4, 2)
    assert [(h.image_id, h.y, h.x) for h in result.hits] == [w[:3] for w in want]


def test_explain_gives_the_units_terms_and_a_map_per_hit(built: tuple[Path, Path, Path]) -> None:
    index, _, _ = built
    with Index(index) as opened:
        result = opened.patches(image_id=3, box=(10, 10, 40, 40), k=4, explain=True)
        q = stored_query(index, 3, result.positions)
        stored = opened.reader.patches("block")
        grid = opened.reader.patch_grid("block")
        for hit in result.hits:
            v = stored[grid.ids(hit.image_id, hit.y, hit.x)].astype(np.float64)
            terms = (q / np.linalg.norm(q)) * (v / np.linalg.norm(v))
            top = np.argsort(-terms, kind="stable")[:5]
            assert [u for u, _ in hit.units] == top.tolist()
            np.testing.assert_allclose([c for _, c in hit.units], terms[top], rtol=5e-3, atol=5e-4)
    assert result.maps is not None and result.maps.shape == (4, 3, SIZE, SIZE)
    assert all(np.abs(m).sum() > 0 for m in result.maps)


def test_an_approximate_patch_index_reranks_to_the_exact_answer(built: tuple[Path, Path, Path],
                                                                tmp_path: Path) -> None:
    """A trained IVF with 4-bit codes: candidates re-ranked on the stored float16 vectors (read by offset)."""
    _, data, weights = built
    index = run_build(data, weights, tmp_path / "index.h5", layers=LAYERS, patch_layer="block",
                      patch_factory="IVF16,PQ4x4fs")
    with IndexReader(index) as reader:
        record = reader.info.patch_faiss
    assert record is not None and record.factory == "IVF16,PQ4x4fs" and record.nprobe is not None
    assert record.recall_at_10 is not None and record.recall_at_10 >= 0.9
    agree = 0
    with Index(index) as opened:
        for image in range(0, 30, 3):
            result = opened.patches(image_id=image, box=(10, 10, 50, 50), k=5)
            want = exact(index, stored_query(index, image, result.positions), 5, 2)
            agree += len({(h.image_id, h.y, h.x) for h in result.hits} & {w[:3] for w in want})
    assert agree / 50 >= 0.9


def test_cli_writes_the_picture_and_json(built: tuple[Path, Path, Path], tmp_path: Path) -> None:
    index, _, _ = built
    out = tmp_path / "patches.png"
    shown = CliRunner().invoke(main, ["similar", str(index), "--id", "4", "--box", "5,10,40,50", "--k", "5",
                                      "--explain", "--out", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    answer = json.loads(shown.output)
    assert answer["layer"] == "block" and len(answer["hits"]) == 5 and answer["outputs"]["image"] == str(out)
    assert {"image_id", "y", "x", "score", "box", "box_original", "units"} <= answer["hits"][0].keys()
    assert out.is_file()
    text = CliRunner().invoke(main, ["similar", str(index), "--from-unit", "down:0:1", "--k", "3", "--out",
                                     str(tmp_path / "unit.png")])
    assert text.exit_code == 0 and "hit of unit down:0:1" in text.output and "#3" in text.output, text.output
    described = CliRunner().invoke(main, ["info", str(index)])
    assert described.exit_code == 0, described.output
    assert "patch vectors block: 4464 x 8" in described.output, described.output  # 31 files x 12 x 12 positions
    assert "patch index index.patches.faiss: IDMap2,Flat over " in described.output


@pytest.mark.parametrize(("args", "message"), [
    (["--id", "1", "--box", "1,2,3"], "--box takes four numbers"),
    (["--id", "1", "--box", "5,5,5,9"], "is empty"),
    (["--id", "1", "--box", "500,500,600,600"], "lies outside the image"),
    (["--id", "1", "--from-unit", "down:0:1"], "give one of --image PATH, --id N or --from-unit"),
    (["--from-unit", "down:0"], "LAYER:UNIT:RANK"),
    (["--from-unit", "down:99:1"], "has units 0-15"),
    (["--from-unit", "down:0:0"], "RANK counts from 1"),
    (["--from-unit", "nope:0:1"], "unknown layer 'nope'"),
    (["--id", "1", "--box", "1,1,9,9", "--per-image", "0"], "--per-image must be at least 1"),
    (["--id", "1", "--box", "1,1,9,9", "--layer", "down"], "unknown patch layer 'down'"),
])
def test_bad_patch_queries_are_one_line_errors(built: tuple[Path, Path, Path], tmp_path: Path,
                                               args: list[str], message: str) -> None:
    index, _, _ = built
    out = tmp_path / "nothing.png"
    shown = CliRunner().invoke(main, ["similar", str(index), *args, "--out", str(out)])
    assert shown.exit_code != 0 and message in shown.output, shown.output
    assert "Traceback" not in shown.output and len(shown.output.strip().splitlines()) == 1
    assert not out.exists()


def test_an_index_without_patch_vectors_says_how_to_get_them(tmp_path: Path) -> None:
    make_images(tmp_path / "data", n=6)
    weights = tmp_path / "tiny.pt"
    torch.save(tiny_net().state_dict(), weights)
    index = run_build(tmp_path / "data", weights, tmp_path / "index.h5", layers=LAYERS)
    shown = CliRunner().invoke(main, ["similar", str(index), "--id", "1", "--box", "1,1,20,20"])
    assert shown.exit_code != 0 and "again with --patch-layer LAYER" in shown.output, shown.output
    with Index(index) as opened, pytest.raises(UserError, match="stores no patch vectors"):
        opened.patches(image_id=1, box=(1, 1, 20, 20))


def test_a_missing_patch_index_file_is_rebuilt_by_actindex_faiss(built: tuple[Path, Path, Path],
                                                                 tmp_path: Path) -> None:
    index, _, _ = built
    copy = tmp_path / "copy.h5"
    copy.write_bytes(index.read_bytes())
    shown = CliRunner().invoke(main, ["similar", str(copy), "--id", "1", "--box", "1,1,20,20"])
    assert shown.exit_code != 0 and "actindex faiss" in shown.output and "--patches" in shown.output, shown.output
    rebuilt = CliRunner().invoke(main, ["faiss", str(copy), "--patches"])
    assert rebuilt.exit_code == 0 and patch_index_path(copy).is_file(), rebuilt.output
    with Index(copy) as a, Index(index) as b:
        got = a.patches(image_id=1, box=(1, 1, 20, 20), k=5)
        want = b.patches(image_id=1, box=(1, 1, 20, 20), k=5)
    assert [(h.image_id, h.y, h.x) for h in got.hits] == [(h.image_id, h.y, h.x) for h in want.hits]


def test_atlas_image_pages_show_the_patches_alike_to_their_strongest_boxes(built: tuple[Path, Path, Path],
                                                                            tmp_path: Path) -> None:
    """Each image page: its three strongest positions (longest vectors, two apart), each with the exact nearest
    positions of other images, one per image; an index without patch vectors has no such section."""
    from actindex.query.atlas import AtlasConfig, build_atlas

    index, _, _ = built
    site = tmp_path / "site"
    build_atlas(AtlasConfig(index=index, out=site, layers=("down",), units="0-1", image_format="png"))
    with IndexReader(index) as reader:
        grid = reader.patch_grid("block")
        vectors = reader.patches("block")[()].astype(np.float64)
    pages = sorted((site / "images").glob("[0-9]*.html"))
    assert pages
    for page in pages[:6]:
        image_id = int(page.stem)
        html = page.read_text()
        assert "<h2>Parts like these elsewhere</h2>" in html
        own = vectors[image_id * grid.positions:(image_id + 1) * grid.positions]
        norms = np.linalg.norm(own, axis=1)
        chosen: list[tuple[int, int]] = []
        for row in np.argsort(-norms, kind="stable"):
            y, x = divmod(int(row), grid.width)
            if norms[row] > 0 and all(max(abs(y - a), abs(x - b)) >= 2 for a, b in chosen):
                chosen.append((y, x))
        chosen = chosen[:3]
        rows = re.findall(r'<div class="patches" id="box(\d)">(.*?)</div>', html)
        assert len(rows) == len(chosen)
        for (number, row), (y, x) in zip(rows, chosen, strict=True):
            assert f"box {number} at ({y}, {x})" in row
            want = [image for image, *_ in exact(index, own[y * grid.width + x], 7, 1) if image != image_id][:6]
            shown = [int(m) for m in re.findall(r'class="context"(?: href="\d+.html")?><img src="../img/i/(\d+)',
                                                row)][1:]
            assert shown == want, page.name
    plain = tmp_path / "plain"
    build_atlas(AtlasConfig(index=index, out=plain, layers=("down",), units="0", image_format="png", patch_boxes=0))
    assert all("Parts like these" not in p.read_text() for p in (plain / "images").glob("[0-9]*.html"))
