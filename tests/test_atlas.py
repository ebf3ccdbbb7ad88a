"""The atlas: a static site from a tiny index, checked against the index, the neuron query, exact search and
an uninterrupted build; links are checked on disk here and in a real browser in test_demo.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from actindex.indexer.images import crop_geometry, preprocess
from actindex.indexer.index_file import IndexReader
from actindex.kernels.errors import UserError
from actindex.query.atlas import AtlasConfig, build_atlas
from actindex.query.atlas.build import AtlasFault, InjectedCrash
from actindex.query.atlas.plan import parse_units
from actindex.query.atlas.pool import KillTask
from actindex.query.atlas.work import MAP
from actindex.query.attribution import Method, Settings
from actindex.query.cli import main
from actindex.query.neuron import query_neuron
from actindex.query.render import activation_pictures, map_image

from helpers import SIZE, tiny_index

LAYERS = ("block", "down", "head")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return tiny_index(tmp_path_factory.mktemp("atlas"), LAYERS, k=4, n=30, seed=3)


def config(index: Path, out: Path, **changes: object) -> AtlasConfig:
    return AtlasConfig(index=index, out=out, image_format="png", **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def site(built: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site") / "site"
    build_atlas(config(built[0], out, dream=False))
    return out


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.links.append(value)


def links(page: Path) -> list[str]:
    parser = Links()
    parser.feed(page.read_text())
    return parser.links


def copy_index(index: Path, folder: Path) -> Path:
    """The HDF5 file and the FAISS file it names, into `folder`."""
    folder.mkdir()
    shutil.copy(index.with_suffix(".faiss"), folder)
    return Path(shutil.copy(index, folder))


def files(site: Path) -> dict[str, bytes]:
    return {p.relative_to(site).as_posix(): p.read_bytes() for p in sorted(site.rglob("*")) if p.is_file()}


def test_every_link_and_picture_of_every_page_resolves_inside_the_site(site: Path) -> None:
    pages = list(site.rglob("*.html"))
    assert len(pages) > 20
    for page in pages:
        for link in links(page):
            assert not re.match(r"^[a-z]+:|^/", link), f"{page}: {link} is not relative"
            target = (page.parent / link.split("#")[0]).resolve()
            assert target.is_file() and site.resolve() in target.parents, f"{page}: broken link {link}"


def test_every_layer_and_unit_has_its_page_and_tile_and_every_hit_image_its_page(
        built: tuple[Path, Path, Path], site: Path) -> None:
    with IndexReader(built[0]) as reader:
        tables = {name: reader.layer(name) for name in LAYERS}
    hit_images = set()
    for name, hits in tables.items():
        assert (site / "layers" / f"{name}.html").is_file()
        layer_links = links(site / "layers" / f"{name}.html")
        for unit in range(hits.grid.channels):
            assert f"../units/{name}/{unit}.html" in layer_links
            count = int((hits.image[unit] >= 0).sum())
            for rank in range(count):
                assert (site / "img" / "u" / name / str(unit) / f"p{rank}.png").is_file()
                assert (site / "img" / "u" / name / str(unit) / f"g{rank}.png").is_file()
            hit_images.update(int(i) for i in hits.image[unit] if i >= 0)
    pages = {int(p.stem) for p in (site / "images").glob("*.html") if p.stem != "index"}
    assert pages == hit_images
    assert sorted(int(link[:-5]) for link in links(site / "images" / "index.html") if link.endswith(".html")
                  and link[:-5].isdigit()) == sorted(hit_images)


def test_patches_are_the_original_images_cut_at_the_recorded_box(built: tuple[Path, Path, Path], site: Path) -> None:
    index, data, _ = built
    with IndexReader(index) as reader:
        hits = reader.layer("down")
        paths = reader.image_paths()
    sources = set()
    for unit in range(hits.grid.channels):
        for rank in range(4):
            original = Image.open(data / paths[hits.image[unit, rank]]).convert("RGB")
            y0, x0, y1, x1 = (int(v) for v in hits.box[unit, rank])
            geometry = crop_geometry(original.width, original.height, SIZE)
            oy0, ox0, oy1, ox1 = geometry.to_original((y0, x0, y1, x1))
            if (oy1 - oy0) * (ox1 - ox0) > (y1 - y0) * (x1 - x0):  # the original is sharper: cut from it
                expected = np.asarray(original.crop((ox0, oy0, ox1, oy1)))
                sources.add("original")
            else:
                expected = preprocess(original, SIZE)[:, y0:y1, x0:x1].permute(1, 2, 0).numpy()
                sources.add("input")
            saved = np.asarray(Image.open(site / f"img/u/down/{unit}/p{rank}.png"))
            assert np.array_equal(saved, expected)
    assert sources == {"original", "input"}


def test_guided_crops_are_the_neuron_querys_maps(built: tuple[Path, Path, Path], site: Path) -> None:
    """Batched over many units in the atlas, one unit at a time in the query: the same 8-bit pictures."""
    index = built[0]
    for layer, unit in (("block", 2), ("down", 7), ("head", 3)):
        result = query_neuron(index, layer, unit, device="cpu")
        for hit in result.hits:
            y0, x0, y1, x1 = hit.box
            expected = np.asarray(map_image(result.guided[hit.rank][:, y0:y1, x0:x1])).astype(int)
            saved = np.asarray(Image.open(site / f"img/u/{layer}/{unit}/g{hit.rank}.png")).astype(int)
            assert saved.shape == expected.shape
            assert np.abs(saved - expected).max() <= 1 and (saved == expected).mean() > 0.99


def test_layer_tiles_carry_maximum_and_mean_for_sorting(built: tuple[Path, Path, Path], site: Path) -> None:
    with IndexReader(built[0]) as reader:
        hits, mean = reader.layer("down"), reader.layer_mean("down")
    text = (site / "layers" / "down.html").read_text()
    found = re.findall(r'data-unit="(\d+)" data-max="([^"]+)" data-mean="([^"]+)"', text)
    assert [int(u) for u, _, _ in found] == list(range(hits.grid.channels))
    assert mean is not None
    assert [float(m) for _, m, _ in found] == hits.value[:, 0].astype(float).tolist()
    assert [float(m) for _, _, m in found] == mean.tolist()
    assert '<div class="controls" hidden>' in text  # shown by atlas.js only


def test_activation_maps_and_masks_are_the_neuron_querys(built: tuple[Path, Path, Path], site: Path) -> None:
    """Batched over many units in the atlas, one unit at a time in the query: the same pictures, masked at the
    unit's p99 (the index's)."""
    index = built[0]
    for layer, unit in (("block", 2), ("down", 7), ("head", 3)):
        result = query_neuron(index, layer, unit, device="cpu")
        assert result.maps.level is not None
        for hit in result.hits:
            overlay, mask = activation_pictures(result.maps, hit.rank, result.images[hit.rank], result.hits[0].score,
                                                MAP)
            assert mask is not None
            for picture, name in ((overlay, "a"), (mask, "m")):
                saved = np.asarray(Image.open(site / f"img/u/{layer}/{unit}/{name}{hit.rank}.png")).astype(int)
                expected = np.asarray(picture).astype(int)
                assert saved.shape == expected.shape and max(saved.shape[:2]) == MAP
                assert np.abs(saved - expected).max() <= 1


def test_the_methods_chosen_are_drawn_kept_and_equal_the_neuron_querys(built: tuple[Path, Path, Path],
                                                                        tmp_path: Path) -> None:
    index, out = built[0], tmp_path / "site"
    chosen = (Method.GRADIENT_X_INPUT, Method.GRAD_CAM, Method.OCCLUSION)
    build_atlas(config(index, out, layers=("down",), units="2", methods=chosen, cam_layer="stem"))
    build_atlas(config(index, out, layers=("down", "head"), units="down:2,head:1"))  # keeps the site's methods
    manifest = json.loads((out / "atlas.json").read_text())
    assert manifest["methods"] == [m.value for m in chosen] and manifest["cam_layer"] == "stem"
    result = query_neuron(index, "down", 2, device="cpu",
                          settings=Settings(chosen, cam_layer="stem"))
    page = (out / "units" / "down" / "2.html").read_text()
    for method in chosen:
        assert f'title="{method.label}"' in page
        for hit in result.hits:
            y0, x0, y1, x1 = hit.box
            expected = np.asarray(map_image(result.attributions[method][hit.rank][:, y0:y1, x0:x1])).astype(int)
            saved = np.asarray(Image.open(out / f"img/u/down/2/{method.value}-{hit.rank}.png")).astype(int)
            assert saved.shape == expected.shape
            assert np.abs(saved - expected).max() <= 1 and (saved == expected).mean() > 0.99
    assert not (out / "img/u/down/2/g0.png").exists()  # guided backprop was not asked for
    with pytest.raises(UserError, match="grad-cam needs --cam-layer"):
        build_atlas(config(index, tmp_path / "other", methods=(Method.GRAD_CAM,)))


def test_layer_tiles_and_unit_pages_carry_the_units_profile(built: tuple[Path, Path, Path], site: Path) -> None:
    with IndexReader(built[0]) as reader:
        profile = reader.layer_profile("down")
        classes = reader.unit_classes("down", 7)
        distribution = reader.distribution("down", 7)
    assert classes is not None and distribution is not None
    text = (site / "layers" / "down.html").read_text()
    firing = {int(u): float(v) for u, v in re.findall(r'data-unit="(\d+)"[^>]* data-firing="([^"]+)"', text)}
    assert firing == {u: float(v) for u, v in enumerate(profile.firing_rate)}
    chosen = {int(u): float(v) for u, v in re.findall(r'data-unit="(\d+)"[^>]* data-selectivity="([^"]+)"', text)}
    assert chosen == {u: float(v) for u, v in enumerate(profile.selectivity) if np.isfinite(v)}
    assert '<option value="firing">' in text and '<option value="selectivity">' in text
    page = (site / "units" / "down" / "7.html").read_text()
    assert f"{100 * distribution.firing_rate:.1f} % of {distribution.count} images" in page
    assert f"<dt>p99</dt><dd>{distribution.quantiles[0.99]:.4g}</dd>" in page
    for name, mean, images in classes.top:
        assert f"<tr><td>{name}</td><td>{mean:.4g}</td><td>{images}</td></tr>" in page


def test_image_pages_list_the_exact_nearest_images(built: tuple[Path, Path, Path], site: Path) -> None:
    with IndexReader(built[0]) as reader:
        vectors = reader.embeddings("down")[()]
    valid = np.isfinite(vectors).all(axis=1)
    unit = np.where(valid[:, None], vectors, 0) / np.linalg.norm(np.where(valid[:, None], vectors, 1), axis=1,
                                                                 keepdims=True)
    for page in sorted((site / "images").glob("[0-9]*.html"))[:10]:
        image_id = int(page.stem)
        scores = unit @ unit[image_id]
        scores[~valid] = -np.inf
        scores[image_id] = -np.inf
        expected = np.argsort(-scores, kind="stable")[:8].tolist()
        shown = [int(m) for m in re.findall(r'<figure class="thumb">(?:<a href="\d+.html">)?<img src="../img/i/(\d+)',
                                            page.read_text())]
        assert shown == expected, page.name


def test_a_crashed_build_resumes_to_the_same_site(built: tuple[Path, Path, Path], site: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    with pytest.raises(InjectedCrash):
        build_atlas(config(built[0], out), fault=AtlasFault(crash_after=2))
    assert not (out / "index.html").exists()
    summary = build_atlas(config(built[0], out))
    assert 0 < summary.units_computed < summary.unit_pages
    assert files(out) == files(site)


def test_more_units_and_layers_later_add_only_what_is_new(built: tuple[Path, Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "site"
    first = build_atlas(config(built[0], out, layers=("down",), units="0-2"))
    assert (first.units_computed, first.unit_pages, first.layers) == (3, 3, 1)
    kept = (out / "img/u/down/1/g0.png").stat().st_mtime_ns
    assert 'href="../units/down/3.html"' not in (out / "layers/down.html").read_text()
    second = build_atlas(config(built[0], out, layers=("down", "head"), units="3,head:1"))
    assert (second.units_computed, second.unit_pages, second.layers) == (3, 6, 2)  # down 3, head 1 and 3
    assert (out / "img/u/down/1/g0.png").stat().st_mtime_ns == kept
    assert 'href="../units/down/3.html"' in (out / "layers/down.html").read_text()
    again = build_atlas(config(built[0], out, layers=("down",), units="0-3"))
    assert again.units_computed == 0 and again.unit_pages == 6


def test_two_worker_processes_make_the_same_site(built: tuple[Path, Path, Path], site: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    build_atlas(config(built[0], out, jobs=2))
    ours, reference = files(out), files(site)
    assert ours.keys() == reference.keys()
    for name, data in ours.items():
        if name.endswith(".png") and "/g" in name:  # other thread counts: float sums may differ in the last bit
            a = np.asarray(Image.open(out / name)).astype(int)
            b = np.asarray(Image.open(site / name)).astype(int)
            assert a.shape == b.shape and np.abs(a - b).max() <= 1, name
        else:
            assert data == reference[name], name


def test_dream_and_webp(built: tuple[Path, Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "site"
    summary = build_atlas(AtlasConfig(index=built[0], out=out, layers=("head",), units="2", dream=True,
                                      dream_steps=5))
    assert summary.units_computed == 1
    dream = out / "img/u/head/2/dream.webp"
    assert Image.open(dream).format == "WEBP" and Image.open(out / "img/u/head/2/g0.webp").format == "WEBP"
    assert 'src="../../img/u/head/2/dream.webp"' in (out / "units/head/2.html").read_text()
    assert summary.files == len(files(out))
    assert summary.page_bytes + summary.picture_bytes == sum(len(b) for b in files(out).values())


def test_refusals_leave_other_folders_and_sites_alone(built: tuple[Path, Path, Path], site: Path,
                                                      tmp_path: Path) -> None:
    index = built[0]
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="not an actindex atlas"):
        build_atlas(config(index, foreign))
    assert [p.name for p in foreign.iterdir()] == ["todo.txt"]
    with pytest.raises(UserError, match="holds png pictures; pass --format png"):
        build_atlas(AtlasConfig(index=index, out=site, image_format="webp"))
    other = copy_index(index, tmp_path / "other")
    import h5py

    with h5py.File(other, "a") as h5:
        h5.attrs["k"] = 5  # any change to what the site shows makes it another index
    copy = tmp_path / "copy"
    shutil.copytree(site, copy)
    (copy / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="atlas of another index"):
        build_atlas(config(other, copy, layers=("head",), units="0"))
    build_atlas(config(other, copy, layers=("head",), units="0", overwrite=True))
    assert (copy / "mine.txt").read_text() == "keep" and not (copy / "layers/down.html").exists()
    with pytest.raises(UserError, match="unknown layer 'downn'; did you mean down"):
        build_atlas(config(index, tmp_path / "x", layers=("downn",)))
    assert not (tmp_path / "x").exists()


def test_moved_images_need_data_root(built: tuple[Path, Path, Path], tmp_path: Path) -> None:
    index, data, _ = built
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    renamed = copy_index(index, tmp_path / "renamed")
    with IndexReader(index) as reader:
        attrs_root = reader.attrs["data_root"]
    assert Path(attrs_root) == data.resolve()
    import h5py

    with h5py.File(renamed, "a") as h5:
        h5.attrs["data_root"] = str(tmp_path / "gone")
    with pytest.raises(UserError, match="pass --data-root NEW_ROOT"):
        build_atlas(config(renamed, tmp_path / "a", layers=("head",), units="0"))
    summary = build_atlas(config(renamed, tmp_path / "b", layers=("head",), units="0", data=moved))
    assert summary.unit_pages == 1


@pytest.mark.parametrize(("spec", "expected"), [
    ("0-2,5", {"a": {0, 1, 2, 5}, "b": {0, 1, 2, 5}}),
    ("b:7,a:1-2", {"a": {1, 2}, "b": {7}}),
    ("", {"a": set(), "b": set()}),
])
def test_units_spec(spec: str, expected: dict[str, set[int]]) -> None:
    assert parse_units(spec, {"a": 6, "b": 8}) == expected


@pytest.mark.parametrize(("spec", "message"), [
    ("6", "layer 'a' has units 0-5"), ("c:1", "unknown layer 'c'"), ("x", "is not N, A-B"),
    ("3-1", "write the lower number first"),
])
def test_bad_units_spec(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_units(spec, {"a": 6, "b": 8})


@pytest.mark.parametrize(("args", "message"), [
    (["--layers", "nope"], "unknown layer 'nope'"),
    (["--units", "head:99"], "has units 0-"),
    (["--jobs", "0"], "--jobs must be at least 1"),
])
def test_cli_errors_are_one_line(built: tuple[Path, Path, Path], tmp_path: Path, args: list[str],
                                 message: str) -> None:
    result = CliRunner().invoke(main, ["atlas", str(built[0]), "--out", str(tmp_path / "s"), *args])
    assert result.exit_code == 1 and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_cli_builds_and_reports_the_size(built: tuple[Path, Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "s"
    result = CliRunner().invoke(main, ["atlas", str(built[0]), "--out", str(out), "--layers", "head",
                                       "--units", "0-1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert f"{size / 1e6:.1f} MB" in result.output and f"Open {out / 'index.html'}" in result.output


def test_only_hit_images_and_their_neighbours_are_decoded(built: tuple[Path, Path, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """No forward pass over the dataset: the build decodes (and runs) only what its pages show."""
    from actindex.query.atlas import work

    decoded: list[str] = []
    real = work.load_index_images

    def recording(root: Path, paths: list[str], *args: object) -> object:
        decoded.extend(paths)
        return real(root, paths, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(work, "load_index_images", recording)
    out = tmp_path / "site"
    build_atlas(config(built[0], out, layers=("head",), units="0", neighbours=2, nearest_units=0))
    with IndexReader(built[0]) as reader:
        hits = reader.layer("head")
        paths = reader.image_paths()
    shown = {paths[i] for i in hits.image[:, 0] if i >= 0} | {paths[i] for i in hits.image[0] if i >= 0}
    for page in (out / "images").glob("[0-9]*.html"):
        shown.update(paths[int(i)] for i in re.findall(r'img/i/(\d+)\.png', page.read_text()))
    assert set(decoded) == shown and len(shown) < len(paths) - 1  # fewer than the readable images
    assert len(decoded) == len(set(decoded))  # each decoded once: kept while the build runs


# -- workers that die, and runs that are stopped ---------------------------------------------------------------


def assert_same_site(out: Path, site: Path) -> None:
    """Every file of `site` in `out`, the same; guided crops to one level (thread counts change float sums)."""
    ours, reference = files(out), files(site)
    assert ours.keys() == reference.keys()
    for name, data in ours.items():
        if name.endswith(".png") and "/g" in name:
            a = np.asarray(Image.open(out / name)).astype(int)
            b = np.asarray(Image.open(site / name)).astype(int)
            assert a.shape == b.shape and np.abs(a - b).max() <= 1, name
        else:
            assert data == reference[name], name


def test_a_worker_killed_mid_task_is_replaced_and_its_task_done_again(built: tuple[Path, Path, Path], site: Path,
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "site"
    summary = build_atlas(config(built[0], out, jobs=2), fault=AtlasFault(kill=KillTask(task=1)))
    assert summary.units_computed == summary.unit_pages
    assert_same_site(out, site)


def test_a_task_that_kills_its_worker_twice_stops_the_run_in_one_line(built: tuple[Path, Path, Path], site: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "site"
    with pytest.raises(UserError, match=r"died \(killed by SIGKILL\) on task 0 a second time; the pictures made so "
                                        "far are kept: run the same command again to continue") as caught:
        build_atlas(config(built[0], out, jobs=2), fault=AtlasFault(kill=KillTask(task=0, attempts=2)))
    assert "\n" not in str(caught.value)
    summary = build_atlas(config(built[0], out, jobs=2))
    assert 0 < summary.units_computed <= summary.unit_pages
    assert_same_site(out, site)


SCRIPT = """\
from pathlib import Path
from actindex.query.atlas import AtlasConfig, build_atlas

{indent}site = build_atlas(AtlasConfig(Path({index!r}), Path({out!r}), layers=("head",), units="0-3", jobs=2,
{indent}                               image_format="png"))
{indent}print("front page", site.front_page)
"""


@pytest.mark.parametrize("guarded", [False, True])
def test_a_script_that_starts_workers_ends_with_or_without_the_main_guard(built: tuple[Path, Path, Path],
                                                                          tmp_path: Path, guarded: bool) -> None:
    """Without `if __name__ == "__main__":` every spawned worker runs the script again and dies at its start:
    the run stops with a message that says why, instead of waiting forever."""
    body = SCRIPT.format(index=str(built[0]), out=str(tmp_path / "site"), indent="    " if guarded else "")
    if guarded:
        body = body.replace("\n    site =", '\nif __name__ == "__main__":\n    site =')
    script = tmp_path / "make_atlas.py"
    script.write_text(body)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, check=False,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    if guarded:
        assert result.returncode == 0, result.stderr
        assert "front page" in result.stdout
    else:
        assert result.returncode != 0
        assert "failed while starting" in result.stderr and "if __name__ == \"__main__\":" in result.stderr


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
def test_kill_9_of_a_worker_from_outside_never_leaves_the_atlas_waiting(built: tuple[Path, Path, Path],
                                                                        tmp_path: Path) -> None:
    slow = copy_index(built[0], tmp_path / "slow")
    shutil.copy(built[2], tmp_path / "slow" / "tiny.pt")
    import h5py

    with h5py.File(slow, "a") as h5:
        h5.attrs["model"] = "tiny_models:slow_tiny_net"  # the same network, 0.3 s per forward pass
    out = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "SLOW_NET_SECONDS": "0.3"}
    process = subprocess.Popen([sys.executable, "-c", "from actindex.query.cli import main; main()", "atlas",
                                str(slow), "--out", str(out), "--jobs", "2", "--format", "png", "--batch-size", "2",
                                "--device", "cpu"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((out / "img" / "u").glob("*/*/g*.png")) if (out / "img" / "u").is_dir() else True:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    time.sleep(1.0)  # the other worker has started too, most likely: any of them may be killed, busy or not
    workers = [c for c in children(process.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr
    with IndexReader(slow) as reader:
        units = sum(reader.layer(name).grid.channels for name in LAYERS)
    assert len(list((out / "units").rglob("*.html"))) == units


def test_ctrl_c_says_what_was_kept_and_a_rerun_continues(built: tuple[Path, Path, Path], site: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "site"
    process = subprocess.Popen([sys.executable, "-c", "from actindex.query.cli import main; main()", "atlas",
                                str(built[0]), "--out", str(out), "--format", "png", "--device", "cpu"],
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "img" / "u").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert re.search(r"stopped by Ctrl-C \(SIGINT\) after \d+ of \d+ tasks; the pictures made so far are kept in "
                     rf"'{re.escape(str(out))}' .*run the same command again to continue", stderr), stderr
    assert "nothing was written" not in stderr and "--resume" not in stderr and "Traceback" not in stderr
    build_atlas(config(built[0], out))
    assert_same_site(out, site)


def test_the_front_page_shows_no_local_absolute_paths(built: tuple[Path, Path, Path], site: Path) -> None:
    """A site is often shared: paths are shown relative to the index's folder, in full only in atlas.json."""
    index, data, weights = built
    front = (site / "index.html").read_text()
    assert str(index.parent) not in front and "/tmp" not in front
    assert "<dt>data</dt><dd>data</dd>" in front and "<dt>weights</dt><dd>tiny.pt</dd>" in front
    manifest = json.loads((site / "atlas.json").read_text())
    assert manifest["data_root"] == str(data.resolve()) and manifest["weights"] == str(weights.resolve())
    for page in site.rglob("*.html"):
        assert str(index.parent) not in page.read_text(), page


def test_the_atlas_never_reads_the_whole_image_list(built: tuple[Path, Path, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """At ImageNet scale the list is 1.28M paths: the plan (which workers receive) holds only the paths of the
    images the site shows."""
    def whole(*args: object) -> None:
        raise AssertionError("the atlas read every image path")

    monkeypatch.setattr(IndexReader, "image_paths", whole)
    out = tmp_path / "site"
    build_atlas(config(built[0], out, layers=("down",), units="3"))
    with IndexReader(built[0]) as reader:
        shown = {int(i) for i in reader.layer("down").image.ravel() if i >= 0}
    pages = {int(p.stem) for p in (out / "images").glob("[0-9]*.html")}
    assert pages <= shown and (out / "units/down/3.html").is_file()
