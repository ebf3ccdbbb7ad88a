"""Builds the tests share: generated image folders, and indexes of them made with `tiny_models.tiny_net`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from actindex.indexer.build import BuildConfig, build_index

from tiny_models import tiny_net

LAYERS = ("stem", "block", "down", "head")
SIZE = 48  # tiny_net's input size in these builds


def make_images(root: Path, n: int = 37, seed: int = 0, suffix: str = ".png") -> None:
    """Class folders of smooth random images of varied sizes (PNG, or JPEG of quality 90), and one corrupt file."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (rng.integers(3, 9), rng.integers(3, 9), 3), dtype=np.uint8)
        w, h = int(rng.integers(40, 120)), int(rng.integers(40, 120))
        image = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        image.save(folder / f"img{i:03d}{suffix}", quality=90)
    (root / "class1" / "img_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")


def run_build(data: Path, weights: Path, out: Path, batch_size: int = 8, workers: int = 0, k: int = 5,
              layers: tuple[str, ...] = LAYERS, embed_layer: str = "down", factory: str | None = None,
              bottom_k: int = 0, patch_layer: str | None = None, patch_factory: str | None = None) -> Path:
    build_index(BuildConfig(data=data, model="tiny_models:tiny_net", out=out, weights=str(weights),
                            layers=layers, k=k, input_size=SIZE, batch_size=batch_size, workers=workers,
                            embed_layer=embed_layer, device="cpu", faiss_factory=factory, bottom_k=bottom_k,
                            patch_layer=patch_layer, patch_factory=patch_factory))
    return out


def tiny_index(root: Path, layers: tuple[str, ...], k: int, n: int, seed: int,
               prepare: Callable[[Path], None] | None = None) -> tuple[Path, Path, Path]:
    """(index, data, weights) under `root`: `n` generated images and one unreadable file (plus what `prepare`
    adds to the folder), tiny_net's weights in a file, and a CPU index of them with its FAISS file."""
    data = root / "data"
    make_images(data, n=n, seed=seed)
    if prepare is not None:
        prepare(data)
    weights = root / "tiny.pt"
    torch.save(tiny_net().state_dict(), weights)
    return run_build(data, weights, root / "index.h5", k=k, layers=layers), data, weights
