"""`actindex filters` and `actindex dream` as a user runs them: outputs written, errors in one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from actindex.indexer.build import BuildConfig, build_index
from actindex.query.cli import main

from helpers import SIZE, make_images
from tiny_models import tiny_net


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("query")
    make_images(root / "data", n=12, seed=5)
    weights = root / "tiny.pt"
    torch.save(tiny_net().state_dict(), weights)
    index = root / "index.h5"
    build_index(BuildConfig(data=root / "data", model="tiny_models:tiny_net", out=index, weights=str(weights),
                            layers=("stem", "down", "head"), k=4, input_size=SIZE, batch_size=8, workers=0,
                            embed_layer="", device="cpu"))
    return index, weights


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_filters_from_an_index_and_from_a_model_are_the_same_picture(built: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    index, weights = built
    code, output = run("filters", str(index), "--out", str(tmp_path / "a.png"), "--scale", "4")
    assert code == 0, output
    assert "stem: 8 filters of 3x5x5 (RGB" in output
    code, output = run("filters", "--model", "tiny_models:tiny_net", "--weights", str(weights), "--out",
                       str(tmp_path / "b.png"), "--scale", "4")
    assert code == 0, output
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert a.size == b.size and a.tobytes() == b.tobytes()


def test_filters_of_a_deeper_layer_are_grey_per_input_channel(built: tuple[Path, Path], tmp_path: Path) -> None:
    index, _ = built
    code, output = run("filters", str(index), "--layer", "down", "--out", str(tmp_path / "d.png"))
    assert code == 0, output
    assert "down: 16 filters of 8x3x3 (grey, one tile per input channel" in output
    picture = Image.open(tmp_path / "d.png").convert("RGB")
    r, g, b = picture.split()
    assert r.tobytes() == g.tobytes() == b.tobytes()


@pytest.mark.parametrize(("args", "message"), [
    (["filters", "--out", "x.png"], r"give an index \(INDEX.h5\) or --model NAME"),
    (["filters", "--model", "tiny_models:tiny_net", "--layer", "head", "--out", "x.png"], "no convolution filters"),
    (["filters", "--model", "tiny_models:tiny_net", "--layer", "nope", "--out", "x.png"], "unknown layer 'nope'"),
    (["dream", "--model", "tiny_models:tiny_net", "--layer", "down", "--out", "x.png"],
     r"give --layer L --unit U \(or --direction\), or --class C"),
    (["dream", "--model", "tiny_models:tiny_net", "--layer", "down", "--direction", "3:x", "--out", "x.png"],
     r"--direction takes UNIT:WEIGHT"),
    (["dream", "--model", "tiny_models:tiny_net", "--layer", "down", "--direction", "2:1,40:0.5", "--steps", "2",
      "--input-size", "48", "--out", "x.png"], r"unit 40 is out of range: down has 16 units"),
    (["dream", "--model", "tiny_models:tiny_net", "--layer", "down", "--unit", "1", "--index-colours",
      "--out", "x.png"], r"--index-colours needs --index"),
    (["dream", "--model", "tiny_models:tiny_net", "--layer", "down", "--unit", "99", "--steps", "2",
      "--input-size", "48", "--out", "x.png"], r"unit 99 is out of range: down has 16 units \(0-15\)"),
])
def test_errors_are_one_line_and_write_nothing(tmp_path: Path, args: list[str], message: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = run(*args)
    lines = output.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), output
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "x.png").exists()


def test_dream_with_an_index_compares_with_the_best_image(built: tuple[Path, Path], tmp_path: Path) -> None:
    index, _ = built
    out = tmp_path / "dream.png"
    code, output = run("dream", "--index", str(index), "--layer", "down", "--unit", "3", "--steps", "8",
                       "--out", str(out))
    assert code == 0, output
    assert "down unit 3 (center): activation" in output and "best in the dataset:" in output
    assert Image.open(out).size == (SIZE, SIZE)  # the index's input size
    again = tmp_path / "again.png"
    run("dream", "--index", str(index), "--layer", "down", "--unit", "3", "--steps", "8", "--out", str(again))
    assert Image.open(out).tobytes() == Image.open(again).tobytes()  # --seed 0 by default: deterministic


def test_dream_a_class_logit(built: tuple[Path, Path], tmp_path: Path) -> None:
    _, weights = built
    code, output = run("dream", "--model", "tiny_models:tiny_net", "--weights", str(weights), "--class", "2",
                       "--steps", "6", "--input-size", "48", "--out", str(tmp_path / "c.png"))
    assert code == 0, output
    start, reached = (float(v) for v in output.split("activation ")[1].split(" after")[0].split(" -> "))
    assert reached > start


def test_dream_options_a_diverse_negative_direction_with_the_index_colours(built: tuple[Path, Path],
                                                                            tmp_path: Path) -> None:
    index, _ = built
    out = tmp_path / "batch.png"
    code, output = run("dream", "--index", str(index), "--layer", "down", "--direction", "3:1,5:-0.5", "--batch",
                       "2", "--diversity", "1", "--index-colours", "--steps", "6", "--out", str(out))
    assert code == 0, output
    assert "down direction 3:1,5:-0.5 (center): activation" in output
    assert Image.open(out).size == (2 * SIZE, SIZE)  # the batch side by side
    code, output = run("dream", "--index", str(index), "--layer", "down", "--direction", "3:1,5:-0.5",
                       "--negative", "--steps", "12", "--out", str(out))
    assert code == 0 and "(center) minimized: activation" in output, output
    start, reached = (float(v) for v in output.split("activation ")[1].split(" after")[0].split(" -> "))
    assert reached < start
    pixel = tmp_path / "pixel.png"
    code, output = run("dream", "--index", str(index), "--layer", "down", "--unit", "3", "--param", "pixel",
                       "--steps", "6", "--out", str(pixel))
    assert code == 0 and Image.open(pixel).size == (SIZE, SIZE), output
