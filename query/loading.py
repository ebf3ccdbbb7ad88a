"""Getting back what an index was built with: its network (same weights, checked) and its images.

An index records the model spec, the weights (a torchvision enum, timm's pretrained tag, or the absolute path
and sha256 of a state-dict file), the preprocessing, the decoder and precision, and the data root. Queries that
recompute activations load exactly that, and run it the same way where the query's device can (`query_numerics`,
`index_pixels`); when something moved, the error says what and which option points at the new place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from actindex.indexer.choices import Decoder
from actindex.indexer.decode import network_input, worker_input
from actindex.indexer.images import (
    DEFAULT_MAX_PIXELS,
    CropGeometry,
    ImageReadError,
    crop_geometry,
    load_rgb,
    preprocess,
)
from actindex.indexer.index_file import IndexInfo
from actindex.indexer.loader import DeviceDecode, collate
from actindex.indexer.models import LoadedModel, load_model, sha256_file
from actindex.indexer.precision import Numerics
from actindex.kernels.errors import UserError


def weights_argument(recorded: str) -> str | None:
    """The `--weights` value that loads what the index recorded: 'ResNet18_Weights.IMAGENET1K_V1' ->
    'IMAGENET1K_V1', 'timm:NAME' -> 'DEFAULT', a path stays a path, '' (random init, seed 0) -> None."""
    if not recorded:
        return None
    if recorded.startswith("timm:"):
        return "DEFAULT"
    if "_Weights." in recorded and "/" not in recorded:
        return recorded.split(".", 1)[1]
    return recorded


def load_index_model(info: IndexInfo, weights: str | None = None,
                     device: torch.device | str = "cpu") -> LoadedModel:
    """The index's network. `weights` replaces a weights file that moved; its contents must be the same."""
    recorded, expected_sha = info.weights, info.weights_sha256
    argument = weights or weights_argument(recorded)
    if argument and expected_sha and not Path(argument).is_file():
        raise UserError(f"the index was built with the weights file '{recorded}', which is not there any more; "
                        "pass --weights PATH to a copy of it")
    if argument and expected_sha and sha256_file(Path(argument)) != expected_sha:
        raise UserError(f"weights '{argument}' are not the file the index was built with (sha256 differs); "
                        "pass --weights PATH to the original file, or rebuild the index")
    return load_model(info.model, argument, device)


@dataclass(frozen=True)
class LoadedImage:
    path: str  # relative to the data root, as in the index
    pixels: torch.Tensor  # (3, S, S) uint8, the network input
    geometry: CropGeometry  # where the network input lies in the original image
    original: Any  # the decoded RGB PIL image, at its own resolution


def data_root(info: IndexInfo, override: Path | None) -> Path:
    return Path(override) if override is not None else info.data_root


def query_numerics(info: IndexInfo, device: torch.device | str) -> Numerics:
    """The precision the index was built in, where `device` runs it (see `Precision.on`). Queries keep the default
    memory format: channels-last changes only rounding, far inside the check's tolerance."""
    return Numerics(info.precision.on(torch.device(device)))


def index_pixels(files: list[Path], originals: list[Any], info: IndexInfo,
                 device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The (3, S, S) uint8 network inputs of `files` (decoded as `originals` by `load_rgb`), made as the build made
    them: with its decoder where `device` runs it (a GPU-decoded index queried on a CPU: libjpeg-turbo)."""
    decoder, size = info.decoder.on(torch.device(device)), info.input_size
    if decoder is Decoder.PIL:
        return [preprocess(original, size) for original in originals]
    if decoder is Decoder.TURBO:
        return [network_input(file, size, DEFAULT_MAX_PIXELS, decoder) for file in files]
    batch = collate([(i, worker_input(file, size, DEFAULT_MAX_PIXELS, decoder), "") for i, file in enumerate(files)],
                    size)
    decoded = DeviceDecode(device, DEFAULT_MAX_PIXELS)(batch)
    if decoded.skipped:  # load_rgb read it, so the CPU fallback does too: only a file changing under us gets here
        raise ImageReadError(decoded.skipped[0][1])
    return list(decoded.pixels.cpu())


def load_index_images(root: Path, paths: list[str], info: IndexInfo, root_given: bool,
                      device: torch.device | str = "cpu") -> list[LoadedImage]:
    """Decode and preprocess as the build did; a missing or changed file is a one-line error."""
    originals, files = [], []
    for path in paths:
        full = root / path
        if not full.is_file():
            hint = "check that it was not moved or deleted" if root_given else \
                "if the data moved, pass --data-root NEW_ROOT (the folder the index was built from)"
            raise UserError(f"image '{path}' of the index is not under '{root}'; {hint}")
        try:
            original = load_rgb(full)
        except ImageReadError as error:
            raise UserError(f"image '{full}' can no longer be read ({error}); it changed since the build: "
                            "rebuild the index") from error
        originals.append(original)
        files.append(full)
    try:
        pixels = index_pixels(files, originals, info, device)
    except ImageReadError as error:
        raise UserError(f"an image of the index can no longer be read ({error}); it changed since the build: "
                        "rebuild the index") from error
    size = info.input_size
    return [LoadedImage(path, x, crop_geometry(original.width, original.height, size), original)
            for path, x, original in zip(paths, pixels, originals, strict=True)]
