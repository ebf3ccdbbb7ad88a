"""Adebayo et al. 2018's sanity check, on a unit's hits: do its maps depend on the network's weights?

Cascading randomization: the modules with parameters that run up to the unit's layer, taken from the last one
(the unit's own) back towards the input, are re-drawn step by step, each step adding the next group, until all
are random; after each step every chosen method is run again on the same hits and compared with its maps on the
trained network. A map that explains the unit must change once the weights it depends on are random; guided
backprop is the known case that does not (it reconstructs the image's edges whatever the weights).

The comparison, per hit, over its receptive-field box (what the picture shows): the Spearman rank correlation
and SSIM (`kernels.agreement`) of the maps summed over colour channels, signed (Adebayo's "no absolute value"
variant: over a unit's receptive field, magnitudes follow the field's centre-heavy envelope whatever the
weights, which keeps their ranks alike for every method); the tables give the mean over the hits. A method
whose rank correlation is still at least `FLAG_AT` after the first step, which re-draws the unit's own layer
and those just below it, is flagged: its maps do not depend on the weights that make this unit what it is.

All in memory, on a copy of the model: the given model and its weights are never touched. Re-drawn parameters
keep each tensor's mean and standard deviation (a constant tensor keeps its value), from a seeded generator.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from actindex.indexer.taps import layer_value
from actindex.kernels.agreement import scaled, spearman, ssim

from .attribution import Method, Settings, attribute_methods

FLAG_AT = 0.5  # rank correlation with the trained network's maps, after the cascade's first step


@dataclass(frozen=True)
class SanityResult:
    steps: tuple[tuple[str, ...], ...]  # modules re-drawn at each step (each step keeps the earlier ones random)
    spearman: dict[Method, tuple[float, ...]]  # per method, per step: mean over hits
    ssim: dict[Method, tuple[float, ...]]
    seed: int

    @property
    def flagged(self) -> tuple[Method, ...]:
        """Methods whose maps still rank pixels alike once the unit's own layer is random."""
        return tuple(m for m, values in self.spearman.items() if values and values[0] >= FLAG_AT)

    def step_names(self) -> list[str]:
        """'layer4.1.conv2 … layer4.1.bn2' for each step: the first and last module it re-drew."""
        return [names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}" for names in self.steps]

    def to_json(self) -> dict[str, object]:
        return {"seed": self.seed, "flag_at": FLAG_AT, "steps": [list(names) for names in self.steps],
                "methods": {m.value: {"spearman": list(self.spearman[m]), "ssim": list(self.ssim[m]),
                                      "flagged": m in self.flagged} for m in self.spearman}}


def modules_up_to(model: nn.Module, layer: str, x: torch.Tensor) -> list[str]:
    """Names of the modules with parameters of their own, in the order they first run on the way to `layer`
    (the layer included)."""
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
            def hook(_module: nn.Module, _inputs: object, _output: object, name: str = name) -> None:
                if name not in order:
                    order.append(name)
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            layer_value(model, layer, x[:1])
    finally:
        for handle in handles:
            handle.remove()
    return order


def cascade(model: nn.Module, layer: str, x: torch.Tensor, steps: int) -> list[tuple[str, ...]]:
    """The modules up to `layer`, last first, in at most `steps` contiguous groups (the first group holds the
    unit's own layer)."""
    names = modules_up_to(model, layer, x)[::-1]
    if not names:
        return []
    groups = np.array_split(np.arange(len(names)), min(steps, len(names)))
    return [tuple(names[i] for i in group) for group in groups]


def randomize(model: nn.Module, names: Sequence[str], generator: torch.Generator) -> None:
    """Re-draw, in place, the own parameters of the modules `names`: normal with each tensor's mean and std."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            for parameter in modules[name].parameters(recurse=False):
                mean, std = parameter.float().mean(), parameter.float().std() if parameter.numel() > 1 else 0.0
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
                parameter.copy_((mean + std * noise).to(parameter.device, parameter.dtype))


def over_box(maps: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """(c, S, S) -> (h, w): the map over the box, summed over channels."""
    y0, x0, y1, x1 = max(box[0], 0), max(box[1], 0), box[2], box[3]
    return maps[:, y0:y1, x0:x1].sum(0)


def agreement(before: torch.Tensor, after: torch.Tensor,
              boxes: Sequence[tuple[int, int, int, int]]) -> tuple[float, float]:
    """Mean Spearman and SSIM over the hits of two (B, c, S, S) maps, each hit over its box (NaN left out)."""
    rho, structure = [], []
    for i, box in enumerate(boxes):
        a, b = over_box(before[i], box)[None], over_box(after[i], box)[None]
        rho.append(float(spearman(a, b)[0]))
        structure.append(float(ssim(scaled(a), scaled(b))[0]))
    return float(np.nanmean(rho)) if not np.isnan(rho).all() else float("nan"), \
        float(np.nanmean(structure)) if not np.isnan(structure).all() else float("nan")


def sanity_check(model: nn.Module, layer: str, unit: int | torch.Tensor, x: torch.Tensor, ys: torch.Tensor,
                 xs: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], settings: Settings,
                 reference: dict[Method, torch.Tensor], steps: int = 5, seed: int = 0,
                 black: torch.Tensor | None = None) -> SanityResult:
    """Cascading randomization in `steps` steps; `reference` holds the maps of `settings.methods` on the trained
    network (what `attribute_methods` gave)."""
    plan = cascade(model, layer, x, steps)
    generator = torch.Generator().manual_seed(seed)
    random = copy.deepcopy(model)
    rho: dict[Method, list[float]] = {m: [] for m in settings.methods}
    structure: dict[Method, list[float]] = {m: [] for m in settings.methods}
    for names in plan:
        randomize(random, names, generator)
        after = attribute_methods(random, layer, unit, x, ys, xs, boxes, settings, black).maps
        for method in settings.methods:
            r, s = agreement(reference[method], after[method], boxes)
            rho[method].append(r)
            structure[method].append(s)
    return SanityResult(tuple(plan), {m: tuple(v) for m, v in rho.items()},
                        {m: tuple(v) for m, v in structure.items()}, seed)
