"""What image makes unit U of layer L fire most? Activation maximization by gradient ascent on the input,
with the regularizers of Yosinski et al. 2015, "Understanding Neural Networks Through Deep Visualization".

Conventions: the image is optimized in the network's normalized input space, x = (pixel - mean) / std with
pixels in [0, 1], so 0 is the dataset's mean colour: L2 decay pulls towards it and clipping sets pixels to
it, as in the paper's mean-subtracted images. Every step keeps x inside the normalized image of [0, 1].
One image at a time (batch 1), `input_size` x `input_size` pixels.

Objectives, for a layer output (1, C, H, W) or (1, C):
- "center": unit `unit` at the centre position (H // 2, W // 2) of its feature map, where its receptive
  field is least cut by the border;
- "mean": its mean over all positions;
- "logit": element `unit` of the model's (1, classes) output; `layer` must be None.

One step: jitter (roll the image by a random offset), gradient of the objective, roll the gradient back,
ascend, then the regularizers in the paper's order: L2 decay, blur, clip small-norm pixels, clip
small-contribution pixels, and finally clamp to the valid range.

The step is `lr` times the gradient divided by its mean magnitude: the raw gradient's scale differs by
orders of magnitude between layers and networks (Yosinski et al. tuned a learning rate per layer), while a
normalized step is `lr` normalized-pixel units on average wherever the objective is read.

All randomness (initial noise and jitter offsets) comes from one local generator seeded with `seed`: the
global RNG is untouched and the same seed gives the same image (bitwise on the CPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from actindex.indexer.images import Normalize
from actindex.indexer.taps import first_tensor, layer_value
from actindex.kernels.blur import gaussian_blur
from actindex.kernels.errors import UserError, not_found
from actindex.kernels.freeze import frozen

OBJECTIVES = ("center", "mean", "logit")
INIT_STD = 0.1  # of the initial noise, in normalized units: a faint texture around the mean colour


@dataclass(frozen=True)
class DreamConfig:
    """Settings of one optimization; the defaults were tuned on ImageNet EfficientNet-Lite0 logits at 224 px."""

    objective: str = "center"  # "center", "mean" or "logit" (see the module docstring)
    steps: int = 200
    lr: float = 0.08  # mean step per pixel, normalized units (≈ 0.018 of the [0, 1] range)
    blur_every: int = 5  # blur after steps 5, 10, …: a run of a multiple of 5 steps ends on a blurred image
    blur_sigma: float = 0.8  # pixels
    l2_decay: float = 1e-4  # x *= 1 - l2_decay each step
    jitter: int = 8  # roll by up to this many pixels on each axis each step
    clip_norm_percentile: float = 0.0  # zero pixels whose RGB norm is below this percentile (0 = off)
    clip_contribution_percentile: float = 0.0  # zero pixels whose |Σ_rgb x·∇x| is below this percentile (0 = off)
    seed: int = 0
    input_size: int = 224

    def check(self) -> None:
        """Raise UserError for settings that cannot run."""
        if self.objective not in OBJECTIVES:
            raise not_found("objective", self.objective, OBJECTIVES)
        for name in ("steps", "lr", "blur_every", "blur_sigma", "jitter"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.input_size < 1:
            raise UserError(f"input_size must be at least 1 pixel, got {self.input_size}")
        if not 0 <= self.l2_decay < 1:
            raise UserError(f"l2_decay must lie in [0, 1), got {self.l2_decay}")
        for name in ("clip_norm_percentile", "clip_contribution_percentile"):
            if not 0 <= getattr(self, name) < 100:
                raise UserError(f"{name} must lie in [0, 100), got {getattr(self, name)}")


@dataclass
class DreamResult:
    image: np.ndarray  # (H, W, 3) uint8, de-normalized for viewing
    activation: float  # objective value reached on the final (un-jittered) image
    start_activation: float  # objective on the initial image
    history: list[float] = field(default_factory=list)  # objective per step, on that step's jittered input


def _forward(model: nn.Module, layer: str | None, x: torch.Tensor) -> torch.Tensor:
    """The layer's output (or the model's when `layer` is None) for input x; the pass stops at the layer, so an
    in-place op after it cannot rewrite the output and the layers after it cost nothing."""
    return first_tensor(model(x)) if layer is None else layer_value(model, layer, x)


def _objective(output: torch.Tensor, objective: str, unit: int) -> torch.Tensor:
    """Scalar objective of a batch-1 output (1, C, H, W) or (1, C)."""
    if output.ndim == 2:  # (1, C): one position, centre and mean are the same
        return output[0, unit]
    if objective == "center":
        return output[0, unit, output.shape[2] // 2, output.shape[3] // 2]
    return output[0, unit].mean()


def _check_output(output: torch.Tensor, layer: str | None, unit: int) -> None:
    """Raise UserError for outputs without units to maximize, or a unit out of range."""
    where = f"layer '{layer}'" if layer is not None else "the model"
    if layer is None and output.ndim != 2:
        raise UserError(f"the model's output has shape {tuple(output.shape)}; objective 'logit' needs a "
                        "(batch, classes) output, use 'center' or 'mean' with a layer instead")
    if output.ndim not in (2, 4):
        raise UserError(f"{where} gives {output.ndim}-D outputs; choose a convolutional or linear layer")
    units = output.shape[1]
    if not 0 <= unit < units:
        name = layer if layer is not None else "the model output"
        raise UserError(f"unit {unit} is out of range: {name} has {units} units (0-{units - 1})")


def clip_small_norm(x: torch.Tensor, percentile: float) -> torch.Tensor:
    """(1, 3, H, W) -> same, with the round(percentile % of H·W) pixels of smallest RGB norm set to 0.

    Ties are broken by position (row-major), so the number of zeroed pixels is exact.
    """
    if percentile <= 0:
        return x
    norm = x.norm(dim=1).flatten()  # (H·W,)
    return _zero_smallest(x, norm, percentile)


def clip_small_contribution(x: torch.Tensor, grad: torch.Tensor, percentile: float) -> torch.Tensor:
    """(1, 3, H, W) -> same, with the pixels of smallest contribution |Σ_rgb x·∇x| set to 0.

    x·∇x is the first-order change of the objective if the pixel were set to 0 (the mean colour); the
    paper sums it over the colour channels and takes the magnitude. Ties are broken by position.
    """
    if percentile <= 0:
        return x
    contribution = (x * grad).sum(dim=1).abs().flatten()  # (H·W,)
    return _zero_smallest(x, contribution, percentile)


def _zero_smallest(x: torch.Tensor, score: torch.Tensor, percentile: float) -> torch.Tensor:
    count = round(percentile / 100 * score.numel())
    if count == 0:
        return x
    order = torch.argsort(score, stable=True)  # (H·W,)
    keep = torch.ones_like(score)
    keep[order[:count]] = 0
    return x * keep.view(1, 1, *x.shape[2:])  # (1, 3, H, W)


def dream(model: nn.Module, layer: str | None, unit: int, mean: Sequence[float], std: Sequence[float],
          config: DreamConfig, device: torch.device | str = "cpu") -> DreamResult:
    """Optimize an image to maximize `unit` of `layer` (or class logit `unit` when objective is "logit").

    `model` must already be on `device`. It runs in eval mode with its parameters' requires_grad off, both
    restored afterwards.
    """
    config.check()
    if config.objective == "logit" and layer is not None:
        raise UserError(f"objective 'logit' reads the model's output; leave the layer unset (got '{layer}')")
    if config.objective != "logit" and layer is None:
        raise UserError(f"objective '{config.objective}' needs a layer; or use objective 'logit' for a class")
    device = torch.device(device)
    normalize = Normalize(mean, std, device)
    low, high = normalize.bounds()  # (1, 3, 1, 1) each: the valid range, normalized

    generator = torch.Generator().manual_seed(config.seed)  # CPU: same draws on every device
    size = config.input_size
    x = (torch.randn((1, 3, size, size), generator=generator) * INIT_STD).to(device)  # (1, 3, S, S)
    x = torch.maximum(torch.minimum(x, high), low)

    with frozen(model), torch.enable_grad():
        with torch.no_grad():
            first = _forward(model, layer, x)
            _check_output(first, layer, unit)
            start = float(_objective(first, config.objective, unit))
        history: list[float] = []
        for step in range(config.steps):
            dy, dx = (int(v) for v in torch.randint(-config.jitter, config.jitter + 1, (2,), generator=generator))
            shifted = torch.roll(x, shifts=(dy, dx), dims=(2, 3)).requires_grad_(True)  # (1, 3, S, S)
            value = _objective(_forward(model, layer, shifted), config.objective, unit)
            (grad,) = torch.autograd.grad(value, shifted)
            grad = torch.roll(grad, shifts=(-dy, -dx), dims=(2, 3))  # back to x's pixel grid
            history.append(float(value.detach()))
            with torch.no_grad():
                scale = grad.abs().mean()
                if scale > 0 and math.isfinite(float(scale)):
                    x = x + config.lr * grad / scale
                x = x * (1 - config.l2_decay)
                if config.blur_every and (step + 1) % config.blur_every == 0:
                    x = gaussian_blur(x, config.blur_sigma)
                x = clip_small_norm(x, config.clip_norm_percentile)
                x = clip_small_contribution(x, grad, config.clip_contribution_percentile)
                x = torch.maximum(torch.minimum(x, high), low)
        with torch.no_grad():
            final = float(_objective(_forward(model, layer, x), config.objective, unit))
    return DreamResult(image=normalize.to_pixels(x), activation=final, start_activation=start,
                       history=history)
