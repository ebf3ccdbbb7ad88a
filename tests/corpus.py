"""A small image folder with one file per case the loader must handle, generated in well under a second.

`make_corpus` returns relative path -> None for files that must load, or a keyword that must appear in
the skip reason. Hidden files and non-image files are written too but are not in the mapping, since
`scan_folder` must not list them. Pixel values are chosen so tests can write the expected RGB down.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
RGBA_COLOUR = (10, 20, 30)  # opaque left half of rgba.png; its right half is fully transparent
GRAY16_VALUES = (0, 32768, 65535)  # one column each in gray16.png / gray16be.tiff
INT32_VALUES = (-5, 0, 32768, 65535, 70000)  # int32.tif, read as 16-bit grey
FLOAT_VALUES = (-10.0, 100.4, 300.0, float("nan"))  # float.tif
RGB16_PIXEL = (65535, 32768, 0)  # every pixel of rgb16.png
BOMB_SIZE = (30000, 30000)  # declared by bomb.png, which holds one pixel

Writer = Callable[[Path], None]


def make_corpus(root: Path) -> dict[str, str | None]:
    """Write the corpus under `root` (three class folders a/, b/, c/) and return the expected outcomes."""
    for rel, write in {**_GOOD, **_BAD, **_IGNORED}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    return {rel: None for rel in _GOOD} | {rel: _BAD_REASONS[rel] for rel in _BAD}


def smooth_rgb(width: int, height: int) -> Image.Image:
    """Low-frequency colours: JPEG keeps them, and resampling them barely depends on filter details."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127 + 120 * np.sin(x / width * 2 * np.pi)
    g = 255 * y / max(height - 1, 1)
    b = 127 + 120 * np.cos((x + y) / (width + height) * 3 * np.pi)
    return Image.fromarray(np.stack([r, g, b], axis=-1).round().astype(np.uint8))  # (H, W, 3)


def _halves(size: tuple[int, int], mode: str, left: object, right: object) -> Image.Image:
    im = Image.new(mode, size, left)  # type: ignore[arg-type]
    im.paste(right, (size[0] // 2, 0, size[0], size[1]))  # type: ignore[arg-type]
    return im


def _columns(values: tuple, dtype: str, rows: int = 4) -> Image.Image:
    return Image.fromarray(np.tile(np.array(values, dtype=dtype), (rows, 1)))  # (rows, len(values))


def _save(im: Image.Image, fmt: str, **params: object) -> Writer:
    return lambda path: im.save(path, fmt, **params)


def _bytes(data: bytes) -> Writer:
    def write(path: Path) -> None:
        path.write_bytes(data)

    return write


def _palette_with_transparency() -> Image.Image:
    im = Image.new("P", (6, 2))
    im.putpalette([*RED, *GREEN, *BLUE] + [0] * (253 * 3))
    im.putdata([0, 0, 1, 1, 2, 2] * 2)  # red, green, transparent blue columns
    return im


def _exif_rotated() -> Writer:
    """Stored 40 wide x 20 tall, red left / blue right, with orientation 6 (display turned 90° clockwise):
    upright it is 20 wide x 40 tall, red on top."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(_halves((40, 20), "RGB", RED, BLUE), "JPEG", quality=95, exif=exif)


def _animated_gif(path: Path) -> None:
    first, second = Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)
    first.save(path, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def _rgb16_png(width: int = 5, height: int = 3) -> bytes:
    """Pillow cannot write 16-bit RGB, so build the PNG by hand (filter byte 0, big-endian samples)."""
    row = b"\x00" + struct.pack(">3H", *RGB16_PIXEL) * width
    return _png(width, height, 16, 2, row * height)


def _bomb_png() -> bytes:
    """One black pixel whose header claims BOMB_SIZE: rejected from the header, nothing is decoded."""
    row = b"\x00\x00"  # filter byte, one 1-bit pixel
    return _png(*BOMB_SIZE, 1, 0, row)


def _jpeg_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _noise(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))  # (H, W, 3)


_GOOD: dict[str, Writer] = {
    "a/rgb.JPG": _save(smooth_rgb(64, 48), "JPEG", quality=95),
    "a/rgb.PNG": _save(smooth_rgb(50, 30), "PNG"),
    "a/gray.png": _save(_halves((8, 4), "L", 0, 200), "PNG"),
    "a/rgba.png": _save(_halves((8, 4), "RGBA", (*RGBA_COLOUR, 255), (*RGBA_COLOUR, 0)), "PNG"),
    "a/la.png": _save(_halves((8, 4), "LA", (50, 255), (50, 0)), "PNG"),
    "a/bilevel.bmp": _save(_halves((8, 4), "1", 0, 1), "BMP"),
    "b/palette_trns.png": _save(_palette_with_transparency(), "PNG", transparency=2),
    "b/cmyk.jpg": _save(_halves((32, 16), "CMYK", (0, 0, 0, 0), (0, 0, 0, 255)), "JPEG", quality=95),
    "b/gray16.png": _save(_columns(GRAY16_VALUES, "uint16"), "PNG"),
    "b/gray16be.tiff": _save(_columns(GRAY16_VALUES, "uint16").convert("I").convert("I;16B"), "TIFF"),
    "b/int32.tif": _save(_columns(INT32_VALUES, "int32"), "TIFF"),
    "b/float.tif": _save(_columns(FLOAT_VALUES, "float32"), "TIFF"),
    "b/rgb16.png": _bytes(_rgb16_png()),
    "b/exif_rotated.jpeg": _exif_rotated(),
    "b/anim.gif": _animated_gif,
}

_BAD: dict[str, Writer] = {
    "c/empty.jpg": _bytes(b""),
    "c/truncated.jpg": _bytes((lambda b: b[: len(b) // 2])(_jpeg_bytes(_noise(64, 64)))),
    "c/random.png": _bytes(np.random.default_rng(1).integers(0, 256, 1000, dtype=np.uint8).tobytes()),
    "c/text.jpg": _bytes(b"this is a text file, not a JPEG\n"),
    "c/bomb.png": _bytes(_bomb_png()),
}

_BAD_REASONS = {
    "c/empty.jpg": "empty file",
    "c/truncated.jpg": "truncated or corrupt",
    "c/random.png": "not a recognized image format",
    "c/text.jpg": "not a recognized image format",
    "c/bomb.png": "exceeds",
}

_IGNORED: dict[str, Writer] = {
    "c/.hidden.jpg": _save(smooth_rgb(8, 8), "JPEG"),
    ".cache/thumb.png": _save(smooth_rgb(8, 8), "PNG"),
    "c/notes.txt": _bytes(b"not an image\n"),
    "README.txt": _bytes(b"a text file at the root does not break the class-folder layout\n"),
}
