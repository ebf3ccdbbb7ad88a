"""Image folders in, fixed-size uint8 tensors out.

The indexer streams every image of a folder through a network, and one bad file must cost one row,
never the run. So this module finds images (`scan_folder`), decodes any of them to upright 8-bit RGB
or says in one line why it cannot (`load_rgb`), cuts the network input exactly as torchvision's
``Resize(resize_size(S)) + CenterCrop(S)`` does (`preprocess`), and remembers where that input sits in
the original picture (`crop_geometry`) so patches can be shown at full resolution. This is the exact path
(Pillow, as torchvision's transforms on PIL images); `decode.py` has the faster ones and `loader.py` the
DataLoader side.

Pixel convention, used by `CropGeometry`: pixel (row y, column x) covers the unit square
[y, y + 1) x [x, x + 1); boxes are (y0, x0, y1, x1) in those edge coordinates, half-open. PIL's
resampling maps edges linearly (output edge u lies at input edge u * scale), so boxes map exactly.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from actindex.kernels.errors import UserError, first_line

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".gif", ".tif", ".tiff",
        ".webp", ".avif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico",
    }
)  # fmt: skip

# Pillow's own hard ceiling (2 * PIL.Image.MAX_IMAGE_PIXELS at its default): above it Pillow refuses to
# open a file anyway, so a larger default would only promise what cannot be delivered. An RGB image this
# large takes about 0.5 GB per DataLoader worker; lower it with --max-pixels on small machines.
DEFAULT_MAX_PIXELS: int = 178_956_970

class DataError(UserError):
    """The image folder cannot be used at all (as opposed to one bad file, see `ImageReadError`)."""


class ImageReadError(Exception):
    """One file cannot be turned into an RGB image; `reason` is short enough for a log line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class ImageList:
    """Every image of a folder; the row of a path in `paths` is that image's id in the index."""

    root: Path
    paths: list[str]  # POSIX paths relative to root, sorted as plain strings
    labels: list[int]  # index into `classes`, or -1 everywhere when the folder is not class-folder laid out
    classes: list[str]  # sorted class folder names; [] when not a class-folder layout


def scan_folder(root: str | Path) -> ImageList:
    """List the images below `root`, recursively, in a stable order that does not depend on the OS.

    Hidden files and folders (names starting with ".") are skipped, and symlinked folders are not
    entered, so a link back up the tree cannot loop. When every image lies directly inside a
    first-level subfolder (the ImageNet layout), each subfolder that holds images is a class.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder {root} does not exist; pass an existing directory")
    if not root.is_dir():
        raise DataError(f"{root} is not a directory; pass the folder that holds the images")
    paths = sorted(_walk_images(root))
    if not paths:
        known = " ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"no images found under {root}; recognized extensions (any case): {known}")
    labels, classes = _class_labels(paths)
    return ImageList(root=root, paths=paths, labels=labels, classes=classes)


def _walk_images(root: Path) -> list[str]:
    def fail(err: OSError) -> None:
        # os.walk would silently drop an unreadable folder, and with it images the index claims to cover.
        raise DataError(f"cannot list {err.filename}: {err.strerror}; fix its permissions or remove it")

    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # prune: os.walk won't descend
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append((rel_dir / name).as_posix())
    return found


def _class_labels(paths: list[str]) -> tuple[list[int], list[str]]:
    parts = [p.split("/") for p in paths]
    if not all(len(p) == 2 for p in parts):
        return [-1] * len(paths), []
    classes = sorted({p[0] for p in parts})
    index = {name: i for i, name in enumerate(classes)}
    return [index[p[0]] for p in parts], classes


# ---------------------------------------------------------------------------------------------- decoding


def load_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `path` fully into an upright 8-bit RGB image, or raise `ImageReadError` saying why not.

    The pixel limit is checked on the header, before any pixel is decoded, so a small file that
    declares a huge canvas costs nothing. Truncated files are errors (PIL.ImageFile.LOAD_TRUNCATED_IMAGES
    is left alone): indexing half an image would put grey bands into the top-k. Multi-frame files give
    their first frame. Any failure that a bad file can cause comes out as `ImageReadError`; MemoryError
    and KeyboardInterrupt pass through because they say nothing about the file.
    """
    if _file_size(path) == 0:
        raise ImageReadError("empty file")
    try:
        return _decode(path, max_pixels)
    except (ImageReadError, MemoryError):
        raise
    except Image.UnidentifiedImageError:
        raise ImageReadError("not a recognized image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageReadError(
            f"decompression bomb: {first_line(err)} (Pillow's own limit, PIL.Image.MAX_IMAGE_PIXELS)"
        ) from err
    except OSError as err:
        if err.errno is not None:  # the OS refused (permissions, vanished file), not Pillow's decoder
            raise ImageReadError(f"cannot read file: {err.strerror}") from err
        raise ImageReadError(f"truncated or corrupt image: {first_line(err)}") from err
    except Exception as err:  # decoders raise SyntaxError, ValueError, EOFError, zlib.error, ...
        raise ImageReadError(f"truncated or corrupt image: {first_line(err)}") from err


def _file_size(path: str | Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError as err:
        raise ImageReadError(f"cannot read file: {err.strerror}") from err


def _decode(path: str | Path, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        # Pillow warns at open, before we can read the header; our check just below enforces the
        # caller's limit with a clearer message, so its advisory warning adds nothing here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(path)
    with im:
        _check_pixels(im.size, max_pixels)
        with warnings.catch_warnings():
            # Some formats learn their real size only while decoding (ICO, GIF disposal); Pillow's warning
            # is then the only signal, and an error whenever its threshold is no looser than ours.
            warnings.simplefilter(_bomb_warning_action(max_pixels), Image.DecompressionBombWarning)
            im.load()
            upright = ImageOps.exif_transpose(im)
    return _to_rgb(upright)


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageReadError(
            f"{width}×{height} = {width * height} pixels exceeds the limit of {max_pixels} (--max-pixels)"
        )


def _bomb_warning_action(max_pixels: int) -> Literal["error", "ignore"]:
    pil_limit = Image.MAX_IMAGE_PIXELS
    return "error" if pil_limit is not None and max_pixels <= pil_limit else "ignore"


# -------------------------------------------------------------------------------------------- conversion

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; no image is skipped for its mode.

    Transparent pixels are composited on white, as browsers and viewers show them: transparent
    backgrounds are mostly logos and cut-outs made for white pages.
    """
    if im.mode.startswith("I"):
        im = _sixteen_bit_to_l(im)
    elif im.mode == "F":
        im = _float_to_l(im)
    try:
        if im.mode in _ALPHA_MODES or "transparency" in im.info:
            return _flatten_on_white(im)
        return im.convert("RGB")
    except ValueError as err:  # modes Pillow cannot convert, e.g. LAB
        raise ImageReadError(f"cannot convert pixel mode {im.mode} to RGB: {first_line(err)}") from err


def _sixteen_bit_to_l(im: Image.Image) -> Image.Image:
    """Scale 16-bit grey (I;16*, and I read as 16-bit) to 8 bits, 65535 -> 255.

    Pillow's own convert("L") clips at 255, which turns most 16-bit images white.
    """
    values = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)  # (H, W)
    scaled = (values * 255 + 32767) // 65535  # rounds to nearest
    return Image.fromarray(scaled.astype(np.uint8))


def _float_to_l(im: Image.Image) -> Image.Image:
    """Float images (mode F) hold 0..255 intensities by Pillow's convention; clip and round."""
    values = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0)  # (H, W)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def _flatten_on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")  # applies palette and tRNS transparency
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


# ------------------------------------------------------------------------------------------ preprocessing


def resize_size(input_size: int) -> int:
    """Shorter side before the centre crop, in the ImageNet ratio 256/224 (never a .5 tie)."""
    return round(input_size * 256 / 224)


@dataclass(frozen=True)
class CropGeometry:
    """Where the network input of `preprocess` lies in the original image (see the module docstring).

    The image is resized to resized_height x resized_width, then cropped at (offset_y, offset_x) to
    input_size x input_size. Integer sizes rather than a float scale keep `to_original` exact.
    """

    height: int  # original image
    width: int
    resized_height: int
    resized_width: int
    offset_y: int  # top-left corner of the crop, in resized pixels
    offset_x: int
    input_size: int

    @property
    def scale_y(self) -> float:
        """Original pixels per input pixel, vertically."""
        return self.height / self.resized_height

    @property
    def scale_x(self) -> float:
        """Original pixels per input pixel, horizontally."""
        return self.width / self.resized_width

    @property
    def scale(self) -> float:
        """Original pixels per input pixel along the shorter side; the long side's differs by < 1 input px
        over its length, because torchvision truncates the resized long side to an integer."""
        return min(self.height, self.width) / min(self.resized_height, self.resized_width)

    def to_original(self, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """Map a (y0, x0, y1, x1) box in input pixels to the smallest original-pixel box covering it.

        Boxes may reach outside the input (receptive fields do); the result is clipped to the image.
        """
        y0, x0, y1, x1 = box
        top = (y0 + self.offset_y) * self.height // self.resized_height
        left = (x0 + self.offset_x) * self.width // self.resized_width
        bottom = _ceil_div((y1 + self.offset_y) * self.height, self.resized_height)
        right = _ceil_div((x1 + self.offset_x) * self.width, self.resized_width)
        return (
            _clip(top, self.height),
            _clip(left, self.width),
            _clip(bottom, self.height),
            _clip(right, self.width),
        )

    def to_input(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """A (y0, x0, y1, x1) box of the original image (continuous: pixel v spans [v, v + 1)) on the network
        input, in the same continuous coordinates, unclipped (the inverse of `to_original` before rounding)."""
        y0, x0, y1, x1 = box
        sy, sx = self.resized_height / self.height, self.resized_width / self.width
        return (y0 * sy - self.offset_y, x0 * sx - self.offset_x, y1 * sy - self.offset_y, x1 * sx - self.offset_x)

    def input_coordinates(self, height: int | None = None, width: int | None = None) -> tuple[torch.Tensor,
                                                                                           torch.Tensor]:
        """Where the centres of the original's rows (height,) and columns (width,) fall on the network input,
        as input-pixel coordinates (u for the pixel spanning [u, u + 1)); NaN for those outside the crop.
        With `height`/`width`, the rows and columns of that grid laid over the whole original instead (a
        smaller picture of it)."""

        def axis(n: int, resized: int, offset: int) -> torch.Tensor:
            centres = (torch.arange(n, dtype=torch.float64) + 0.5) * resized / n - offset  # input coordinates
            return (centres - 0.5).masked_fill((centres < 0) | (centres >= self.input_size), float("nan"))

        return (axis(height or self.height, self.resized_height, self.offset_y),
                axis(width or self.width, self.resized_width, self.offset_x))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _clip(v: int, hi: int) -> int:
    return min(max(v, 0), hi)


def crop_geometry(width: int, height: int, input_size: int) -> CropGeometry:
    """The geometry `preprocess` uses, computed with torchvision's own formulas so both agree exactly."""
    if width < 1 or height < 1 or input_size < 1:
        raise ValueError(f"sizes must be positive, got {width}x{height} and input_size={input_size}")
    short_target = resize_size(input_size)
    short, long = (width, height) if width <= height else (height, width)
    long_target = int(short_target * long / short)  # torchvision truncates a float, keep it bit-identical
    new_w, new_h = (short_target, long_target) if width <= height else (long_target, short_target)
    return CropGeometry(
        height=height,
        width=width,
        resized_height=new_h,
        resized_width=new_w,
        offset_y=int(round((new_h - input_size) / 2.0)),
        offset_x=int(round((new_w - input_size) / 2.0)),
        input_size=input_size,
    )


def checked_geometry(width: int, height: int, input_size: int, max_pixels: int) -> CropGeometry:
    """`crop_geometry`, refusing an image whose resized form would be huge: a 1 x 100000 strip passes the pixel
    limit but would resize to 256 x 25.6M pixels. Lowering max_pixels (to protect small machines from big files)
    should not reject thumbnails that merely upscale, hence the floor at the default."""
    g = crop_geometry(width, height, input_size)
    limit = max(max_pixels, DEFAULT_MAX_PIXELS)
    if g.resized_width * g.resized_height > limit:
        raise ImageReadError(f"aspect ratio too extreme: {width}×{height} resizes to "
                             f"{g.resized_width}×{g.resized_height}, more than {limit} pixels")
    return g


def preprocess(img: Image.Image, input_size: int) -> torch.Tensor:
    """Resize (shorter side to resize_size, bilinear, antialiased) and centre-crop to a (3, S, S) uint8.

    Same pixels as torchvision's Resize + CenterCrop + PILToTensor on a PIL image; normalization is left
    to the device, where it is cheap and the batch crosses PCIe as bytes.
    """
    if img.mode != "RGB":
        raise ValueError(f"preprocess expects an RGB image (use load_rgb), got mode {img.mode}")
    g = crop_geometry(img.width, img.height, input_size)
    if (g.resized_width, g.resized_height) != img.size:  # torchvision skips a same-size resize, so must we
        img = img.resize((g.resized_width, g.resized_height), Image.Resampling.BILINEAR)
    crop = img.crop((g.offset_x, g.offset_y, g.offset_x + input_size, g.offset_y + input_size))
    hwc = np.array(crop, dtype=np.uint8)  # (S, S, 3), a writable copy
    return torch.from_numpy(hwc).permute(2, 0, 1).contiguous()  # (3, S, S)


class Normalize:
    """The network's input normalization, x = (pixels / 255 - mean) / std per channel, on `device`, both ways.

    Batches cross to the device as uint8 bytes and are normalized there, where it is cheap; the statistics are
    moved to the device once, when this is made (a copy per batch would wait for the device's queue).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 on any device -> normalized float32 on this one."""
        x = pixels.to(self.device, non_blocking=True).float().div_(255.0)
        return x.sub_(self.mean).div_(self.std)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, 3, 1, 1) each: the normalized values of pixel values 0 and 255."""
        return (0 - self.mean) / self.std, (1 - self.mean) / self.std

    def to_pixels(self, x: torch.Tensor) -> np.ndarray:
        """(1, 3, H, W) normalized -> (H, W, 3) uint8, clipped."""
        pixels = (x * self.std + self.mean).clamp(0, 1)[0]  # (3, H, W)
        return (pixels * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
