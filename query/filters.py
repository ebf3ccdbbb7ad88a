"""A convolution layer's filters as a picture: first-layer filters in colour, deeper ones as grey slices.

Scaling is symmetric around zero, per output filter: pixel = 128 + 127 · w / max|w| (rounded half to even,
as in `render.map_image`), so mid-grey is 0, the filter's largest weight reaches 1 or 255, and a colour
tile's hue is the sign pattern of its RGB weights (red: a positive weight on the red input). An all-zero
filter is flat grey.

Layout: tiles of kh·scale x kw·scale pixels (nearest-neighbour upsampling: every weight is a block of one
value), with `gap` pixels of white background between tiles and around the grid:

    width = gap + columns · (kw · scale + gap),   height = gap + rows · (kh · scale + gap)

- 3 input channels: one RGB tile per output filter, in a square-ish grid (columns = ceil(sqrt(O))).
- 1 input channel (depthwise or grouped down to one channel): one grey tile per output filter, same grid.
- otherwise: one grey tile per (output, input) pair; rows are outputs and columns are inputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import nn

from actindex.indexer.taps import first_reached
from actindex.kernels.errors import UserError, not_found
from actindex.kernels.freeze import frozen

BACKGROUND = 255  # white: stands apart from the mid-grey of zero weights


def _rgb_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3}


def first_conv(model: nn.Module, input_size: int = 224) -> str:
    """Name of the first nn.Conv2d with 3 input channels that a forward pass reaches.

    The forward pass (one input_size² image of zeros, no gradients, eval mode, stopped at that convolution)
    finds the stem of models that register their modules out of order; when it cannot run or reaches none,
    the first such convolution in `named_modules` order is taken.
    """
    candidates = _rgb_convs(model)
    if not candidates:
        raise UserError("the model has no Conv2d layer with 3 input channels; choose a convolution layer by name")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    with frozen(model), torch.no_grad():  # eval: a batch of one must not reach a training-mode BatchNorm
        reached = first_reached(model, list(candidates), torch.zeros(1, 3, input_size, input_size, device=device,
                                                                     dtype=dtype))
    return reached or next(iter(candidates))


def layer_weight(model: nn.Module, layer: str) -> torch.Tensor:
    """(O, I, kh, kw) float32 CPU copy of a convolution layer's weight."""
    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        raise not_found("layer", layer, [name for name in modules if name])
    module = modules[layer]
    weight = getattr(module, "weight", None)
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 4 or transposed:
        convs = [name for name, m in modules.items() if isinstance(m, nn.Conv2d)]
        example = f", e.g. '{convs[0]}'" if convs else ""
        raise UserError(f"layer '{layer}' has no convolution filters; choose a Conv2d layer{example}")
    return weight.detach().to("cpu", torch.float32).clone()


def _symmetric_pixels(values: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """values (…) and their filter's max |w| broadcast to them -> uint8 with 0 at 128."""
    scaled = np.divide(values, peak, out=np.zeros_like(values), where=peak > 0)
    return np.clip(np.round(128 + 127 * scaled), 0, 255).astype(np.uint8)


def _grid(tiles: np.ndarray, rows: int, columns: int, scale: int, gap: int) -> Image.Image:
    """tiles (N, kh, kw, 3) uint8, N <= rows·columns, filled row by row -> the upsampled grid picture."""
    n, kh, kw, _ = tiles.shape
    big = tiles.repeat(scale, axis=1).repeat(scale, axis=2)  # (N, kh·s, kw·s, 3), nearest neighbour
    th, tw = kh * scale, kw * scale
    canvas = np.full((gap + rows * (th + gap), gap + columns * (tw + gap), 3), BACKGROUND, dtype=np.uint8)
    for i in range(n):
        row, column = divmod(i, columns)
        top, left = gap + row * (th + gap), gap + column * (tw + gap)
        canvas[top:top + th, left:left + tw] = big[i]
    return Image.fromarray(canvas)


def filter_grid(weight: torch.Tensor, scale: int = 8, columns: int | None = None, gap: int = 1,
                max_tiles: int = 4096) -> Image.Image:
    """(O, I, kh, kw) weight -> RGB picture of its filters (layout and scaling in the module docstring).

    `columns` applies to the one-tile-per-filter layouts (I == 3 or I == 1); with several input channels
    the columns are the inputs.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a (O, I, kh, kw) convolution weight, got shape {tuple(weight.shape)}")
    if scale < 1 or gap < 0:
        raise ValueError(f"scale must be at least 1 and gap non-negative, got scale={scale}, gap={gap}")
    outputs, inputs = weight.shape[:2]
    tiles_needed = outputs if inputs in (1, 3) else outputs * inputs
    if tiles_needed > max_tiles:
        raise UserError(f"this layer has {outputs} filters x {inputs} input channels = {tiles_needed} tiles, "
                        f"more than {max_tiles}; show the first layer (RGB filters) or a layer with fewer "
                        "channels")
    w = weight.detach().to("cpu", torch.float64).numpy()  # (O, I, kh, kw)
    peak = np.abs(w).reshape(outputs, -1).max(axis=1).reshape(outputs, 1, 1, 1)  # (O, 1, 1, 1) per filter
    pixels = _symmetric_pixels(w, np.broadcast_to(peak, w.shape))  # (O, I, kh, kw) uint8
    if inputs == 3:
        tiles = pixels.transpose(0, 2, 3, 1)  # (O, kh, kw, 3)
    else:
        tiles = np.repeat(pixels.reshape(-1, *pixels.shape[2:])[..., None], 3, axis=3)  # (O·I, kh, kw, 3) grey
    if inputs in (1, 3):
        columns = columns if columns is not None else math.ceil(math.sqrt(outputs))
        columns = max(1, min(columns, outputs))
        rows = math.ceil(outputs / columns)
    else:
        rows, columns = outputs, inputs
    return _grid(np.ascontiguousarray(tiles), rows, columns, scale, gap)
