"""What image makes unit U of layer L fire most? Activation maximization by gradient ascent on the input, in one of
two parameterizations:

- "pixel": Yosinski et al. 2015, "Understanding Neural Networks Through Deep Visualization": the normalized pixels
  themselves, with L2 decay, blur every few steps, clipping and jitter (rolls of the image);
- "maco": Fel et al. 2023, "Unlocking Feature Visualization for Deeper Networks with MAgnitude Constrained
  Optimization": as "fourier", but the spectrum's magnitude is fixed (1/f^decay_power) and only its phase is
  learned, the image standardized before its colours; the image cannot drift into high-contrast textures;
- "fourier": Olah et al. 2017, "Feature Visualization" (lucid, and its PyTorch port lucent): the image is the
  inverse FFT of a learned spectrum scaled by 1/f^decay_power, its colours decorrelated by the square root of
  ImageNet's colour covariance (or of the index's own images') and squashed to [0, 1] by a sigmoid, optimized by
  Adam under random transformations (jitter, scale, rotation: `kernels.featurevis.random_transform`) each step.

Conventions: the network reads x = (pixel - mean) / std with pixels in [0, 1]. "pixel" optimizes x directly (0 is
the dataset's mean colour: L2 decay pulls towards it and clipping sets pixels to it), kept inside the normalized
image of [0, 1]; "fourier" optimizes a spectrum whose image is always in [0, 1]. `batch` images at once,
`input_size` x `input_size` pixels.

Objectives, for a layer output (B, C, H, W) or (B, C), per image:
- "center": unit `unit` at the centre position (H // 2, W // 2) of its feature map, where its receptive
  field is least cut by the border;
- "mean": its mean over all positions;
- "logit": element `unit` of the model's (B, classes) output; `layer` must be None.
With `direction` (weights w over the layer's units), the objective is Σ_i w_i · (unit i's objective): a channel
direction such as the units `similar --explain` names. With `negative`, it is minimized. With `batch` > 1 and
`diversity` > 0, the optimization also maximizes `diversity` times the mean Gram-matrix dissimilarity of the
images' outputs at the layer (`kernels.featurevis.gram_dissimilarity`), so that one run shows several facets.

Pixel step: jitter (roll by a random offset), gradient of the objective, roll the gradient back, ascend by `lr`
times the gradient over its mean magnitude (per image: the raw gradient's scale differs by orders of magnitude
between layers), then the regularizers in the paper's order: L2 decay, blur, clip small-norm pixels, clip
small-contribution pixels, clamp to the valid range. Fourier step: a random transformation of the images, the
objective, one Adam step on the spectrum (lr 0.05, as lucid).

All randomness (initial noise or spectrum, jitter offsets, transformations) comes from one local generator seeded
with `seed`: the global RNG is untouched and the same seed gives the same images (bitwise on the CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from actindex.indexer.images import Normalize
from actindex.indexer.taps import first_tensor, layer_value
from actindex.kernels.blur import gaussian_blur
from actindex.kernels.errors import UserError, not_found
from actindex.kernels.featurevis import (
    IMAGENET_COLOR_SQRT,
    decorrelated_to_rgb,
    decorrelation_matrix,
    fourier_image,
    fourier_init,
    gram_dissimilarity,
    maco_image,
    random_transform,
    spectrum_scale,
)
from actindex.kernels.freeze import frozen

OBJECTIVES = ("center", "mean", "logit")
PARAMETERIZATIONS = ("fourier", "pixel", "maco")
INIT_STD = 0.1  # of the initial noise, in normalized units: a faint texture around the mean colour
FOURIER_LR = 0.05  # Adam's step on the spectrum, as lucid
FOURIER_SD = 0.01  # of the initial spectrum, as lucid


@dataclass(frozen=True)
class DreamConfig:
    """Settings of one optimization. The defaults were chosen by scripts/bench_featurevis.py on ImageNet
    EfficientNet-Lite0 (docs/BENCHMARKS.md); the pixel ones were tuned on its logits at 224 px."""

    objective: str = "center"  # "center", "mean" or "logit" (see the module docstring)
    parameterization: str = "fourier"  # "fourier" (lucid), "pixel" (Yosinski et al.) or "maco" (Fel et al.)
    steps: int = 200
    lr: float = 0.08  # pixel: mean step per pixel, normalized units (≈ 0.018 of the [0, 1] range)
    blur_every: int = 5  # pixel: blur after steps 5, 10, …: a run of a multiple of 5 steps ends on a blurred image
    blur_sigma: float = 0.8  # pixel: pixels
    l2_decay: float = 1e-4  # pixel: x *= 1 - l2_decay each step
    # Pixels each step may shift the image by on each axis (pixel: a roll; fourier: a translation). None: 8 at 224
    # px, in proportion to input_size (1 at 32 px): a fixed 8 would tear a small model's 32-pixel input apart.
    jitter: int | None = None
    clip_norm_percentile: float = 0.0  # pixel: zero pixels whose RGB norm is below this percentile (0 = off)
    clip_contribution_percentile: float = 0.0  # pixel: zero pixels whose |Σ_rgb x·∇x| is below it (0 = off)
    # fourier: the spectrum's 1/f^decay_power scaling. lucid's 1.0 left more high-frequency energy than lucent's
    # pictures at a higher objective; 1.25 has less than lucent's on every benchmark target (docs/BENCHMARKS.md).
    decay_power: float = 1.25
    decorrelate: bool = True  # fourier: colours through the square root of a colour covariance
    scales: tuple[float, ...] = (1.0, 0.975, 1.025, 0.95, 1.05)  # fourier: random scale each step
    angles: tuple[float, ...] = tuple(float(a) for a in range(-5, 6))  # fourier: random rotation, degrees
    batch: int = 1  # images optimized together
    diversity: float = 0.0  # weight of the Gram dissimilarity between the batch's images
    negative: bool = False  # minimize the objective instead
    direction: tuple[tuple[int, float], ...] = ()  # (unit, weight) pairs: their weighted sum is the objective
    seed: int = 0
    input_size: int = 224

    @property
    def shift(self) -> int:
        """The jitter in pixels: `jitter`, or by default 8 at 224 px in proportion to the input size."""
        return self.jitter if self.jitter is not None else max(1, round(8 * self.input_size / 224))

    def check(self) -> None:
        """Raise UserError for settings that cannot run."""
        if self.objective not in OBJECTIVES:
            raise not_found("objective", self.objective, OBJECTIVES)
        if self.parameterization not in PARAMETERIZATIONS:
            raise not_found("parameterization", self.parameterization, PARAMETERIZATIONS)
        for name in ("steps", "lr", "blur_every", "blur_sigma", "shift", "diversity"):
            if getattr(self, name) < 0:
                shown = "jitter" if name == "shift" else name
                raise UserError(f"{shown} must not be negative, got {getattr(self, name)}")
        if self.input_size < 1 or self.batch < 1:
            raise UserError(f"input_size and batch must be at least 1, got {self.input_size} and {self.batch}")
        if not 0 <= self.l2_decay < 1:
            raise UserError(f"l2_decay must lie in [0, 1), got {self.l2_decay}")
        for name in ("clip_norm_percentile", "clip_contribution_percentile"):
            if not 0 <= getattr(self, name) < 100:
                raise UserError(f"{name} must lie in [0, 100), got {getattr(self, name)}")
        if not self.scales or any(scale <= 0 for scale in self.scales) or not self.angles:
            raise UserError("scales must be positive and there must be at least one scale and one angle")


@dataclass
class DreamResult:
    image: np.ndarray  # (H, W, 3) uint8, the first image, de-normalized for viewing
    activation: float  # objective value reached on the final (untransformed) first image
    start_activation: float  # objective on the initial first image
    history: list[float] = field(default_factory=list)  # objective per step (first image), on its transformed input
    images: list[np.ndarray] = field(default_factory=list)  # all `batch` images
    activations: list[float] = field(default_factory=list)  # each image's final objective


def _forward(model: nn.Module, layer: str | None, x: torch.Tensor) -> torch.Tensor:
    """The layer's output (or the model's when `layer` is None) for input x; the pass stops at the layer, so an
    in-place op after it cannot rewrite the output and the layers after it cost nothing."""
    return first_tensor(model(x)) if layer is None else layer_value(model, layer, x)


def objective_values(output: torch.Tensor, objective: str, unit: int,
                     direction: Sequence[tuple[int, float]] = ()) -> torch.Tensor:
    """(B,) objective of each image of an output (B, C, H, W) or (B, C): unit `unit`'s, or with `direction`
    ((unit, weight) pairs) the weighted sum of those units' objectives."""
    if direction:
        weights = torch.zeros(output.shape[1], dtype=output.dtype, device=output.device)  # (C,)
        for index, weight in direction:
            weights[index] += weight
        picked = output if output.ndim == 2 else (
            output[:, :, output.shape[2] // 2, output.shape[3] // 2] if objective == "center"
            else output.mean(dim=(2, 3)))  # (B, C)
        return picked @ weights
    if output.ndim == 2:  # (B, C): one position, centre and mean are the same
        return output[:, unit]
    if objective == "center":
        return output[:, unit, output.shape[2] // 2, output.shape[3] // 2]
    return output[:, unit].mean(dim=(1, 2))


def _check_output(output: torch.Tensor, layer: str | None, unit: int,
                  direction: Sequence[tuple[int, float]]) -> None:
    """Raise UserError for outputs without units to maximize, or a unit out of range."""
    where = f"layer '{layer}'" if layer is not None else "the model"
    if layer is None and output.ndim != 2:
        raise UserError(f"the model's output has shape {tuple(output.shape)}; objective 'logit' needs a "
                        "(batch, classes) output, use 'center' or 'mean' with a layer instead")
    if output.ndim not in (2, 4):
        raise UserError(f"{where} gives {output.ndim}-D outputs; choose a convolutional or linear layer")
    units = output.shape[1]
    name = layer if layer is not None else "the model output"
    for chosen in [index for index, _ in direction] if direction else [unit]:
        if not 0 <= chosen < units:
            raise UserError(f"unit {chosen} is out of range: {name} has {units} units (0-{units - 1})")


def parse_direction(text: str) -> tuple[tuple[int, float], ...]:
    """'UNIT:WEIGHT,…' (a bare UNIT weighs 1) -> ((unit, weight), …); a one-line error otherwise."""
    pairs = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        unit, _, weight = part.partition(":")
        try:
            pairs.append((int(unit), float(weight) if weight else 1.0))
        except ValueError:
            raise UserError(f"--direction takes UNIT:WEIGHT,… (e.g. 12:0.5,40:0.3), got '{part}'") from None
    if not pairs:
        raise UserError("--direction needs at least one UNIT:WEIGHT")
    return tuple(pairs)


def index_colour_covariance(index: Path, images: int = 256) -> torch.Tensor:
    """(3, 3) colour covariance of up to `images` of the index's images (evenly spaced ids, readable ones), as
    the network sees them: what the fourier parameterization decorrelates with instead of ImageNet's."""
    from actindex.kernels.featurevis import colour_covariance

    from .index import Index

    with Index(index) as opened:
        skipped = {path for path, _ in opened.reader.skipped()}
        paths = opened.reader.image_paths()
        ids = [i for i in np.linspace(0, len(paths) - 1, min(images, len(paths))).round().astype(int).tolist()
               if paths[i] not in skipped]
        pixels = torch.stack([image.pixels for image in opened.images(sorted(set(ids)))])  # (N, 3, S, S) uint8
    return colour_covariance(pixels)


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
          config: DreamConfig, device: torch.device | str = "cpu",
          colour_covariance: torch.Tensor | None = None) -> DreamResult:
    """Optimize `config.batch` images to maximize `unit` of `layer` (or class logit `unit` when objective is
    "logit"; or `config.direction` over the layer's units). `colour_covariance` (3, 3): decorrelate the fourier
    parameterization's colours with it (e.g. `kernels.featurevis.colour_covariance` of the index's images) instead
    of ImageNet's.

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
    generator = torch.Generator().manual_seed(config.seed)  # CPU: same draws on every device
    sign = -1.0 if config.negative else 1.0

    def values(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = _forward(model, layer, x)
        return objective_values(output, config.objective, unit, config.direction), output

    with frozen(model), torch.enable_grad():
        with torch.no_grad():
            probe = _forward(model, layer, normalize.bounds()[0].expand(1, 3, config.input_size, config.input_size))
            _check_output(probe, layer, unit, config.direction)
        run = {"fourier": _fourier, "pixel": _pixels, "maco": _maco}[config.parameterization]
        x, start, history = run(values, normalize, config, generator, sign, device, colour_covariance)
        with torch.no_grad():
            final = values(x)[0]
    pixels = [normalize.to_pixels(x[b:b + 1]) for b in range(len(x))]
    return DreamResult(image=pixels[0], activation=float(final[0]), start_activation=start, history=history,
                       images=pixels, activations=[float(v) for v in final])


Values = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # normalized x -> (objective (B,), output)


def _loss(objective: torch.Tensor, output: torch.Tensor, config: DreamConfig, sign: float) -> torch.Tensor:
    """What gradient ascent maximizes: the batch's summed (signed) objective, plus the diversity term."""
    total = sign * objective.sum()
    if config.diversity and len(objective) > 1:
        total = total + config.diversity * len(objective) * gram_dissimilarity(output.float())
    return total


def _pixels(values: Values, normalize: Normalize, config: DreamConfig, generator: torch.Generator, sign: float,
            device: torch.device, _covariance: torch.Tensor | None) -> tuple[torch.Tensor, float, list[float]]:
    """Yosinski et al.'s gradient ascent on the normalized pixels; returns (x, start objective, history)."""
    low, high = normalize.bounds()  # (1, 3, 1, 1) each: the valid range, normalized
    size = config.input_size
    x = (torch.randn((config.batch, 3, size, size), generator=generator) * INIT_STD).to(device)  # (B, 3, S, S)
    x = torch.maximum(torch.minimum(x, high), low)
    with torch.no_grad():
        start = float(values(x)[0][0])
    history: list[float] = []
    for step in range(config.steps):
        dy, dx = (int(v) for v in torch.randint(-config.shift, config.shift + 1, (2,), generator=generator))
        shifted = torch.roll(x, shifts=(dy, dx), dims=(2, 3)).requires_grad_(True)  # (B, 3, S, S)
        objective, output = values(shifted)
        (grad,) = torch.autograd.grad(_loss(objective, output, config, sign), shifted)
        grad = torch.roll(grad, shifts=(-dy, -dx), dims=(2, 3))  # back to x's pixel grid
        history.append(float(objective[0].detach()))
        with torch.no_grad():
            scale = grad.abs().mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
            ok = (scale > 0) & torch.isfinite(scale)
            x = x + torch.where(ok, config.lr * grad / torch.where(ok, scale, 1.0), 0.0)
            x = x * (1 - config.l2_decay)
            if config.blur_every and (step + 1) % config.blur_every == 0:
                x = gaussian_blur(x, config.blur_sigma)
            x = clip_small_norm(x, config.clip_norm_percentile)
            x = clip_small_contribution(x, grad, config.clip_contribution_percentile)
            x = torch.maximum(torch.minimum(x, high), low)
    return x, start, history


def _fourier(values: Values, normalize: Normalize, config: DreamConfig, generator: torch.Generator, sign: float,
             device: torch.device, covariance: torch.Tensor | None) -> tuple[torch.Tensor, float, list[float]]:
    """lucid's parameterization: a 1/f-scaled spectrum with decorrelated colours (`_adam` optimizes it)."""
    size = config.input_size
    spectrum = fourier_init(config.batch, size, size, FOURIER_SD, generator).to(device).requires_grad_(True)
    matrix = _colour_matrix(covariance, device)

    def image() -> torch.Tensor:  # (B, 3, S, S) in [0, 1]
        linear = fourier_image(spectrum, size, size, config.decay_power)
        return decorrelated_to_rgb(linear, matrix) if config.decorrelate else torch.sigmoid(linear)

    return _adam(values, normalize, config, generator, sign, spectrum, image)


def _maco(values: Values, normalize: Normalize, config: DreamConfig, generator: torch.Generator, sign: float,
          device: torch.device, covariance: torch.Tensor | None) -> tuple[torch.Tensor, float, list[float]]:
    """MACO: the phases of a spectrum whose magnitude is fixed to 1/f^decay_power (no DC: the standardized image
    has zero mean), colours as "fourier"'s (`_adam` optimizes the phases)."""
    size = config.input_size
    phase = (torch.rand((config.batch, 3, size, size // 2 + 1), generator=generator) * 2 - 1) * math.pi
    phase = phase.to(device).requires_grad_(True)  # (B, 3, S, S // 2 + 1), uniform in [-π, π)
    magnitude = spectrum_scale(size, size, config.decay_power).expand(3, -1, -1).clone()  # (3, S, S // 2 + 1)
    magnitude[:, 0, 0] = 0
    matrix = _colour_matrix(covariance, device)

    def image() -> torch.Tensor:  # (B, 3, S, S) in [0, 1]
        standardized = maco_image(phase, magnitude, size, size)
        return decorrelated_to_rgb(standardized, matrix) if config.decorrelate else torch.sigmoid(standardized)

    return _adam(values, normalize, config, generator, sign, phase, image)


def _colour_matrix(covariance: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(3, 3) decorrelation matrix of `covariance`, ImageNet's by default."""
    chosen = covariance if covariance is not None else IMAGENET_COLOR_SQRT @ IMAGENET_COLOR_SQRT.T
    return decorrelation_matrix(chosen).to(device)


def _adam(values: Values, normalize: Normalize, config: DreamConfig, generator: torch.Generator, sign: float,
          parameter: torch.Tensor, image: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, list[float]]:
    """Adam (lr 0.05, as lucid) on `parameter`, each step seeing `image()` (B, 3, S, S in [0, 1]) through a
    random transformation; returns (normalized x of the final images, start objective, history)."""

    def normalized(rgb: torch.Tensor) -> torch.Tensor:
        return (rgb - normalize.mean) / normalize.std  # (B, 3, S, S), differentiable

    with torch.no_grad():
        start = float(values(normalized(image()))[0][0])
    optimizer = torch.optim.Adam([parameter], lr=FOURIER_LR)
    history: list[float] = []
    for _ in range(config.steps):
        optimizer.zero_grad()
        seen = random_transform(image(), generator, config.shift, config.scales, config.angles)  # (B, 3, S, S)
        objective, output = values(normalized(seen))
        (-_loss(objective, output, config, sign)).backward()
        optimizer.step()
        history.append(float(objective[0].detach()))
    with torch.no_grad():
        return normalized(image()), start, history
