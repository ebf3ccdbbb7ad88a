"""The three ways an image file becomes the network's (3, S, S) uint8 input, chosen by `--decoder`:

- ``pil``:   Pillow decodes, resizes (bilinear, antialiased) and crops (`images.py`): torchvision's transforms
             on a PIL image, the reference every other path is measured against;
- ``turbo``: JPEGs are decoded by libjpeg-turbo into a tensor and resized by torch's antialiased bilinear
             kernel, on the CPU; everything else (PNG, CMYK JPEGs, files whose header Pillow cannot read) takes
             the ``pil`` path. Pixels differ from ``pil`` by at most 1 level (tests/test_decode.py);
- ``gpu``:   CPU workers read the bytes of plain JPEGs (YCbCr or grey, EXIF orientation 1) and the device decodes
             them in one nvJPEG batch, resizes and crops there (`loader.DeviceDecode`); other files take the
             ``turbo`` path in the worker, and a file the device refuses takes it in the main process.

A file that no path can read is skipped with the ``pil`` path's reason, whatever the decoder: the faster paths
fall back to it on any failure rather than report their own, so no decoder skips a file ``pil`` reads.
JPEG draft mode (DCT-domain downscaling) was measured and left out: see docs/BENCHMARKS.md.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import ExifTags, Image

from . import jpeg
from .choices import Decoder
from .images import CropGeometry, checked_geometry, load_rgb, preprocess


@dataclass(frozen=True)
class JpegHeader:
    """What Pillow's lazy open of a JPEG tells without decoding it."""

    width: int  # upright, after the EXIF orientation
    height: int
    orientation: int  # EXIF orientation tag, 1 (none) to 8


_TRANSPOSED = frozenset({5, 6, 7, 8})  # orientations that swap width and height


def probe_jpeg(path: str | Path, max_pixels: int) -> JpegHeader | None:
    """The header of a JPEG libjpeg-turbo decodes to Pillow's pixels, or None for every other file: other formats,
    CMYK (Adobe's inverted CMYK is read differently by different libraries), too many pixels, or a header Pillow
    cannot read. None sends the file to the `pil` path, which reads it or says why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                    return None
                orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
                width, height = im.size
    except Exception:  # noqa: BLE001 - any header Pillow cannot read: the pil path reads the file and says why
        return None
    if not isinstance(orientation, int) or not 1 <= orientation <= 8 or width * height > max_pixels:
        return None
    if orientation in _TRANSPOSED:
        width, height = height, width
    return JpegHeader(width, height, orientation)


def read_bytes(path: str | Path) -> torch.Tensor:
    """The file as a (N,) uint8 tensor (a bytearray, so torch owns writable memory)."""
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        f.readinto(data)
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def resize_crop(pixels: torch.Tensor, geometry: CropGeometry) -> torch.Tensor:
    """(3, H, W) uint8 upright image on any device -> its (3, S, S) uint8 network input, as `preprocess` cuts it:
    bilinear antialiased resize of the shorter side (skipped when the size is already right), centre crop."""
    from torchvision.transforms.v2 import functional as F

    size = (geometry.resized_height, geometry.resized_width)
    if tuple(pixels.shape[1:]) != size:
        pixels = F.resize(pixels, list(size), interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    s, y, x = geometry.input_size, geometry.offset_y, geometry.offset_x
    return pixels[:, y:y + s, x:x + s].contiguous()  # (3, S, S)


def network_input(path: str | Path, input_size: int, max_pixels: int, decoder: Decoder = Decoder.PIL) -> torch.Tensor:
    """`path` as the (3, S, S) uint8 network input that `decoder` makes on the CPU (gpu: as turbo makes it).

    Raises `images.ImageReadError` with the pil path's reason for a file no path can read.
    """
    if decoder is not Decoder.PIL:
        header = probe_jpeg(path, max_pixels)
        if header is not None:
            geometry = checked_geometry(header.width, header.height, input_size, max_pixels)
            try:
                decoded = jpeg.decode_jpeg(read_bytes(path))
            except (RuntimeError, ValueError, OSError):
                decoded = None  # corrupt or truncated: the pil path says why in its own words
            if isinstance(decoded, torch.Tensor) and tuple(decoded.shape) == (3, header.height, header.width):
                return resize_crop(decoded, geometry)
    img = load_rgb(path, max_pixels)
    checked_geometry(img.width, img.height, input_size, max_pixels)
    return preprocess(img, input_size)


@dataclass(frozen=True)
class Encoded:
    """A JPEG's bytes on their way to the device decoder, with where its network input lies."""

    path: str  # for the CPU fallback when the device refuses the file
    data: torch.Tensor  # (N,) uint8
    geometry: CropGeometry


def worker_input(path: str | Path, input_size: int, max_pixels: int, decoder: Decoder) -> torch.Tensor | Encoded:
    """What a DataLoader worker hands on for `path`: the bytes of a JPEG the device decodes (decoder gpu), else the
    decoded (3, S, S) network input."""
    if decoder is Decoder.GPU:
        header = probe_jpeg(path, max_pixels)
        if header is not None and header.orientation == 1:
            geometry = checked_geometry(header.width, header.height, input_size, max_pixels)
            try:
                return Encoded(str(path), read_bytes(path), geometry)
            except OSError:
                pass  # vanished or unreadable since the probe: the pil path says so
        decoder = Decoder.TURBO
    return network_input(path, input_size, max_pixels, decoder)
