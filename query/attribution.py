"""Which pixels of a hit drive a unit, by several methods, all batched over the hits.

Every method explains the same number: the unit's activation at its recorded feature position, as a function of
the normalized network input x (B, 3, S, S). Maps are (B, 3, S, S) in input space, or (B, 1, S, S) for the two
methods that do not split colour channels (Grad-CAM, occlusion).

- guided: guided backpropagation (Springenberg et al. 2015), actindex's own (`kernels.guided`), which sees
  functional and reused ReLUs that module hooks miss;
- gradient: the plain gradient;
- gradient-x-input: the gradient times x (x is 0 at the normalization's mean colour);
- integrated-gradients: (x - x0) times the mean gradient on the straight path from a baseline x0 to x
  (Sundararajan et al. 2017), by Gauss-Legendre quadrature (Captum's default rule); the baseline is the
  normalization's mean colour (x0 = 0, the default) or black;
- grad-cam: ReLU(sum_k w_k A_k), A the output of an earlier layer (`cam_layer`) and w_k the spatial mean of the
  unit's gradient with respect to A_k (Selvaraju et al. 2017, with the unit in place of a class score),
  upsampled bilinearly to the input;
- occlusion: a patch slid over the hit's receptive-field box, set to the mean colour; each pixel gets the mean
  drop of the activation over the windows that cover it (Zeiler & Fergus 2014; Captum's `Occlusion`).

Captum implements gradient x input, integrated gradients, Grad-CAM and occlusion for a model's outputs and some
for a layer's neurons; the tests check each method here against it. Here they share one forward pass per
chunk, stop at the unit's layer, and take a different unit and position for each image of the batch.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from actindex.indexer.taps import layer_value
from actindex.kernels.errors import UserError, not_found
from actindex.kernels.freeze import frozen
from actindex.kernels.guided import GuidedBackprop


def unit_activations(model: nn.Module, layer: str, unit: int | torch.Tensor, x: torch.Tensor, ys: torch.Tensor,
                     xs: torch.Tensor) -> torch.Tensor:
    """(B,) activation of `unit` of `layer` at positions (ys[b], xs[b]) for the batch `x`, differentiable.

    `unit` is one channel for the whole batch, or a (B,) tensor of channels, one per image."""
    return unit_activations_and_maps(model, layer, unit, x, ys, xs)[0]


def unit_activations_and_maps(model: nn.Module, layer: str, unit: int | torch.Tensor, x: torch.Tensor,
                              ys: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`unit_activations`, and each image's whole map of its unit, (B, H, W) float32 detached ((B, 1, 1) for
    layers without spatial extent)."""

    def pick(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(out.shape[0], device=out.device)
        channels = unit.to(out.device) if isinstance(unit, torch.Tensor) else unit
        if out.ndim == 4:  # (B, C, H, W)
            maps = out[rows, channels]  # (B, H, W)
            return maps[rows, ys.to(out.device), xs.to(out.device)], maps.detach().float()
        if out.ndim == 2:  # (B, C): one position
            values = out[rows, channels]
            return values, values.detach().float()[:, None, None]
        raise UserError(f"layer '{layer}' gives {out.ndim}-D outputs; choose a convolutional or linear layer")

    return layer_value(model, layer, x, pick)


@dataclass
class Attribution:
    values: torch.Tensor  # (B,) float32, the unit's activation per image
    gradient: torch.Tensor | None  # (B, 3, S, S) plain gradient; None when not asked for
    guided: torch.Tensor | None  # (B, 3, S, S) guided backpropagation; None when not asked for
    maps: torch.Tensor  # (B, H, W) float32, each image's whole map of its unit
    unguided: dict[str, int]  # activations guided backprop is not defined for, and how often they ran


def attribute(model: nn.Module, layer: str, unit: int | torch.Tensor, x: torch.Tensor, ys: torch.Tensor,
              xs: torch.Tensor, plain: bool = True, guided: bool = True) -> Attribution:
    """Plain gradient and guided backprop of a unit (each unless turned off), for all images of a batch in one
    backward pass each, and always the unit's values and whole maps; `unit` may be a (B,) tensor giving each
    image its own channel.

    `x` is the normalized (B, 3, S, S) input. Images do not interact (eval mode, `frozen`), so summing the
    per-image activations before `backward` gives each image its own gradient.
    """
    gradient = guided_map = None
    unguided: dict[str, int] = {}
    with frozen(model):
        if plain:
            plain_input = x.detach().clone().requires_grad_(True)
            values, maps = unit_activations_and_maps(model, layer, unit, plain_input, ys, xs)
            (gradient,) = torch.autograd.grad(values.sum(), plain_input)
        if guided:
            guided_input = x.detach().clone().requires_grad_(True)
            with GuidedBackprop() as mode:
                values, maps = unit_activations_and_maps(model, layer, unit, guided_input, ys, xs)
            (guided_map,) = torch.autograd.grad(values.sum(), guided_input)
            unguided = dict(mode.unguided)
        if not plain and not guided:
            with torch.no_grad():
                values, maps = unit_activations_and_maps(model, layer, unit, x, ys, xs)
    # float32 values whatever the network computed in (under autocast the layer may give bf16 or fp16)
    return Attribution(values.detach().float(), gradient, guided_map, maps, unguided)


class Method(str, enum.Enum):
    GUIDED = "guided"
    GRADIENT = "gradient"
    GRADIENT_X_INPUT = "gradient-x-input"
    INTEGRATED_GRADIENTS = "integrated-gradients"
    GRAD_CAM = "grad-cam"
    OCCLUSION = "occlusion"

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {Method.GUIDED: "guided backprop", Method.GRADIENT: "gradient", Method.GRADIENT_X_INPUT: "gradient × input",
           Method.INTEGRATED_GRADIENTS: "integrated gradients", Method.GRAD_CAM: "Grad-CAM",
           Method.OCCLUSION: "occlusion"}
DEFAULT_METHODS = (Method.GUIDED, Method.GRADIENT)


class Baseline(str, enum.Enum):
    MEAN = "mean"  # the normalization's mean colour: x0 = 0
    BLACK = "black"  # pixel value 0


def parse_methods(text: str) -> tuple[Method, ...]:
    """'guided,grad-cam' -> (Method.GUIDED, Method.GRAD_CAM), in the order given, each once."""
    chosen: list[Method] = []
    for name in (part.strip() for part in text.split(",")):
        if not name:
            continue
        try:
            method = Method(name)
        except ValueError:
            raise not_found("method", name, [m.value for m in Method],
                            hint="give --methods as a comma list") from None
        if method not in chosen:
            chosen.append(method)
    if not chosen:
        raise UserError("--methods names no method; give for example --methods guided,gradient")
    return tuple(chosen)


@dataclass(frozen=True)
class Settings:
    """What to compute; the defaults are the two maps `neuron` has always drawn."""

    methods: tuple[Method, ...] = DEFAULT_METHODS
    cam_layer: str | None = None  # needed by grad-cam: a layer that runs before the unit's
    steps: int = 32  # integrated gradients' quadrature points
    baseline: Baseline = Baseline.MEAN  # integrated gradients' starting point
    patch: int | None = None  # occlusion's square patch side (input pixels); default: a sixth of the box's side
    stride: int | None = None  # occlusion's step; default: half the patch
    chunk: int = 16  # images per forward pass for integrated gradients and occlusion (more was slower on a CPU)

    def check(self, layer: str) -> None:
        if Method.GRAD_CAM in self.methods and not self.cam_layer:
            raise UserError("grad-cam needs --cam-layer: a layer that runs before "
                            f"'{layer}' (see 'actindex layers')")
        if self.steps < 1:
            raise UserError(f"--ig-steps must be at least 1, got {self.steps}")
        for name, value in (("--occlusion-patch", self.patch), ("--occlusion-stride", self.stride)):
            if value is not None and value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")


DEFAULT = Settings()


@dataclass
class Attributions:
    values: torch.Tensor  # (B,) float32 activation of each image's unit
    maps: dict[Method, torch.Tensor]  # per method, in the order asked: (B, 3 or 1, S, S) float32 on the CPU
    unit_maps: torch.Tensor  # (B, H, W) each image's whole map of its unit
    unguided: dict[str, int] = field(default_factory=dict)


def attribute_methods(model: nn.Module, layer: str, unit: int | torch.Tensor, x: torch.Tensor, ys: torch.Tensor,
                      xs: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], settings: Settings,
                      black: torch.Tensor | None = None) -> Attributions:
    """Every method of `settings` for the batch `x` (B, 3, S, S), normalized; `boxes` are the hits' receptive
    fields in input pixels (occlusion slides over them); `black` (1, 3, 1, 1) is pixel value 0 normalized (for
    the black baseline)."""
    settings.check(layer)
    methods = settings.methods
    plain = Method.GRADIENT in methods or Method.GRADIENT_X_INPUT in methods
    base = attribute(model, layer, unit, x, ys, xs, plain=plain, guided=Method.GUIDED in methods)
    maps: dict[Method, torch.Tensor] = {}
    for method in methods:
        if method is Method.GUIDED:
            assert base.guided is not None
            maps[method] = base.guided
        elif method is Method.GRADIENT:
            assert base.gradient is not None
            maps[method] = base.gradient
        elif method is Method.GRADIENT_X_INPUT:
            assert base.gradient is not None
            maps[method] = base.gradient * x
        elif method is Method.INTEGRATED_GRADIENTS:
            if settings.baseline is Baseline.BLACK and black is None:
                raise ValueError("the black baseline needs `black`")
            start = torch.zeros_like(x[:1]) if settings.baseline is Baseline.MEAN else black.to(x)  # type: ignore[union-attr]
            maps[method] = integrated_gradients(model, layer, unit, x, ys, xs, start, settings.steps, settings.chunk)
        elif method is Method.GRAD_CAM:
            assert settings.cam_layer is not None
            maps[method] = grad_cam(model, layer, unit, x, ys, xs, settings.cam_layer)
        elif method is Method.OCCLUSION:
            maps[method] = occlusion(model, layer, unit, x, ys, xs, boxes, settings.patch, settings.stride,
                                     settings.chunk)
    return Attributions(base.values, {m: t.detach().float().cpu() for m, t in maps.items()}, base.maps,
                        base.unguided)


def _rows(unit: int | torch.Tensor, ys: torch.Tensor, xs: torch.Tensor,
          index: torch.Tensor) -> tuple[int | torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unit and position of the images `index` of a batch (for a batch made of copies of its images)."""
    return (unit[index] if isinstance(unit, torch.Tensor) else unit), ys[index], xs[index]


def quadrature(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre points on [0, 1] and their weights (summing to 1)."""
    points, weights = np.polynomial.legendre.leggauss(steps)
    return 0.5 * (points + 1), 0.5 * weights


def integrated_gradients(model: nn.Module, layer: str, unit: int | torch.Tensor, x: torch.Tensor, ys: torch.Tensor,
                         xs: torch.Tensor, start: torch.Tensor, steps: int, chunk: int) -> torch.Tensor:
    """(B, 3, S, S): (x - start) times the weighted sum of gradients at start + a (x - start), a the quadrature
    points; `start` (1 or B, 3, S or 1, S or 1). Chunks of at most `chunk` images of the path."""
    alphas, weights = quadrature(steps)
    b = x.shape[0]
    delta = x - start  # (B, 3, S, S)
    total = torch.zeros_like(x)
    pairs = [(i, s) for s in range(steps) for i in range(b)]  # (image, step), an image's path in order
    with frozen(model):
        for first in range(0, len(pairs), chunk):
            part = pairs[first:first + chunk]
            images = torch.tensor([i for i, _ in part], device=x.device)
            alpha = torch.tensor([alphas[s] for _, s in part], dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
            weight = torch.tensor([weights[s] for _, s in part], dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)
            path = (start.expand_as(x)[images] + alpha * delta[images]).requires_grad_(True)
            part_unit, part_ys, part_xs = _rows(unit, ys, xs, images.cpu())
            values = unit_activations(model, layer, part_unit, path, part_ys, part_xs)
            (gradient,) = torch.autograd.grad(values.sum(), path)
            total.index_add_(0, images, gradient * weight)
    return delta * total


def grad_cam(model: nn.Module, layer: str, unit: int | torch.Tensor, x: torch.Tensor, ys: torch.Tensor,
             xs: torch.Tensor, cam_layer: str) -> torch.Tensor:
    """(B, 1, S, S) Grad-CAM of each image's unit from the output of `cam_layer`, which must run before `layer`."""
    modules = dict(model.named_modules())
    if cam_layer not in modules or not cam_layer:
        raise not_found("layer", cam_layer, [name for name in modules if name], hint="for --cam-layer")
    taken: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: object, output: object) -> object:
        if not isinstance(output, torch.Tensor):
            return None
        # a copy enters the graph here, so in-place ops downstream (a ReLU after a BatchNorm) leave `A` intact
        copy = output.clone()
        taken.append(copy)
        return copy.clone()

    with frozen(model):
        inputs = x.detach().clone().requires_grad_(True)
        handle = modules[cam_layer].register_forward_hook(keep)
        try:
            values = unit_activations(model, layer, unit, inputs, ys, xs)
        finally:
            handle.remove()
        if not taken or taken[0].ndim != 4:
            raise UserError(f"--cam-layer '{cam_layer}' does not run before '{layer}' with a (B, C, H, W) output; "
                            "choose an earlier convolutional layer")
        activations = taken[0]
        (gradient,) = torch.autograd.grad(values.sum(), activations)
    weights = gradient.mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
    cam = F.relu((weights * activations).sum(1, keepdim=True))  # (B, 1, h, w)
    return F.interpolate(cam.detach(), size=x.shape[-2:], mode="bilinear", align_corners=False)


def occlusion_windows(box: tuple[int, int, int, int], size: int, patch: int | None,
                      stride: int | None) -> list[tuple[int, int, int, int]]:
    """The patches slid over `box` (clipped to the input of side `size`), as (y0, x0, y1, x1): starting at its
    corner, every `stride` pixels while the patch fits (a box smaller than the patch is one window)."""
    y0, x0, y1, x1 = max(box[0], 0), max(box[1], 0), min(box[2], size), min(box[3], size)
    side = patch or max(1, math.ceil(max(y1 - y0, x1 - x0) / 6))
    step = stride or max(1, side // 2)
    tops = range(y0, max(y0, y1 - side) + 1, step)
    lefts = range(x0, max(x0, x1 - side) + 1, step)
    return [(top, left, min(top + side, y1), min(left + side, x1)) for top in tops for left in lefts]


@torch.no_grad()
def occlusion(model: nn.Module, layer: str, unit: int | torch.Tensor, x: torch.Tensor, ys: torch.Tensor,
              xs: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], patch: int | None, stride: int | None,
              chunk: int) -> torch.Tensor:
    """(B, 1, S, S): per pixel, the mean drop of the unit's activation over the windows covering it when each is
    set to the mean colour (x = 0); 0 outside the box."""
    b, _, height, width = x.shape
    windows = [(i, w) for i in range(b) for w in occlusion_windows(boxes[i], height, patch, stride)]
    with frozen(model):
        before = unit_activations(model, layer, unit, x, ys, xs)  # (B,)
        drops = torch.empty(len(windows), dtype=x.dtype, device=x.device)
        for first in range(0, len(windows), chunk):
            part = windows[first:first + chunk]
            images = torch.tensor([i for i, _ in part])
            occluded = x[images.to(x.device)].clone()
            for row, (_, (y0, x0, y1, x1)) in enumerate(part):
                occluded[row, :, y0:y1, x0:x1] = 0
            part_unit, part_ys, part_xs = _rows(unit, ys, xs, images)
            after = unit_activations(model, layer, part_unit, occluded, part_ys, part_xs)
            drops[first:first + len(part)] = before[images.to(x.device)] - after
    total = torch.zeros(b, 1, height, width, dtype=x.dtype, device=x.device)
    count = torch.zeros_like(total)
    for (i, (y0, x0, y1, x1)), drop in zip(windows, drops, strict=True):
        total[i, :, y0:y1, x0:x1] += drop
        count[i, :, y0:y1, x0:x1] += 1
    return total / count.clamp_min(1)
