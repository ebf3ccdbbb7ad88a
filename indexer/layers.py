"""Which layers of a model can be indexed, their geometry, and a sensible default choice."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from actindex.kernels.errors import UserError, not_found
from actindex.kernels.receptive_field import LayerGeometry, trace_geometry

_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d)


def addressable_layers(model: nn.Module) -> list[str]:
    """Dotted names of every submodule (the root excluded), in definition order."""
    return [name for name, _ in model.named_modules() if name]


def resolve_layers(model: nn.Module, requested: Sequence[str] | None, input_size: int,
                   device: torch.device | str = "cpu") -> dict[str, LayerGeometry]:
    """Geometry of the requested layers (or the default stages), checked to be indexable."""
    names = addressable_layers(model)
    if requested:
        for name in requested:
            if name not in names:
                raise not_found("layer", name, names, hint="run 'actindex layers --model …' to see them all")
        if len(set(requested)) != len(requested):
            raise UserError(f"layers listed twice in --layers: {', '.join(requested)}")
        try:
            geometry = trace_geometry(model, input_size, list(requested), device=device)
        except ValueError as error:  # a requested module that never runs in the forward pass
            raise UserError(f"{error}; choose layers that run (see 'actindex layers --model …')") from error
    else:
        geometry = trace_geometry(model, input_size, None, device=device)
        chosen = default_layers(model, geometry)
        geometry = {name: geometry[name] for name in chosen}
    for geo in geometry.values():
        check_indexable(geo)
    missing = [name for name in geometry if geometry[name].field is None]
    if missing:
        name = missing[0]
        raise UserError(f"layer '{name}' has no receptive field ({geometry[name].note}); choose another layer")
    return geometry


_LAYOUTS = {"HWC": "a channels-last (H, W, C) map", "": "neither a feature map nor a vector"}


def output_shape(geometry: LayerGeometry) -> str:
    """One image's output as 'CxHxW' numbers, e.g. '64x56x56', '1000', '197x192'."""
    return "x".join(str(n) for n in geometry.shape) or "-"


def check_indexable(geometry: LayerGeometry, role: str = "layer") -> None:
    """Refuse a layer whose output is not a (C, H, W) map or a (C,) vector, such as a transformer's tokens."""
    if geometry.indexable:
        return
    what = _LAYOUTS.get(geometry.layout, _LAYOUTS[""])
    tokens = " (tokens x features, as a transformer block gives)" if len(geometry.shape) == 2 else ""
    raise UserError(f"{role} '{geometry.name}' outputs {output_shape(geometry)} per image{tokens}: {what}; "
                    "actindex indexes layers whose output is a (C, H, W) feature map or a (C,) vector: choose "
                    "a convolutional or linear layer ('actindex layers --model …' marks the others with -)")


def default_layers(model: nn.Module, geometry: dict[str, LayerGeometry]) -> list[str]:
    """The model's main stages: per feature-map resolution, the last convolutional stage module.

    Candidates are the children of the root and of its top-level containers (``features``, ``blocks``,
    ``layer1``…), which is where torchvision and timm models express their stages; a candidate must hold a
    convolution and output a spatial map. Pooling modules are never chosen.
    """
    modules = dict(model.named_modules())
    candidates: list[str] = []
    for name, child in model.named_children():
        subs = [f"{name}.{sub}" for sub, _ in child.named_children()]
        sizes = {(geometry[s].height, geometry[s].width) for s in subs if s in geometry}
        # A container whose children span several resolutions (``features``, ``blocks``) holds several
        # stages; one that stays at one resolution (ResNet's ``layer1``) is a stage itself.
        spans_stages = isinstance(child, (nn.Sequential, nn.ModuleList)) and len(sizes) > 1
        candidates += subs if spans_stages else [name]
    by_size: dict[tuple[int, int], str] = {}
    for name in candidates:
        geo = geometry.get(name)
        module = modules[name]
        if geo is None or geo.field is None or not geo.indexable or isinstance(module, _POOLS) \
                or (geo.height, geo.width) == (1, 1):
            continue
        if not any(isinstance(m, nn.Conv2d) for m in module.modules()):
            continue
        by_size[(geo.height, geo.width)] = name  # later modules at the same resolution win
    chosen = sorted(by_size.values(), key=candidates.index)
    if not chosen:
        raise UserError("found no convolutional stage to index by default; name layers with --layers "
                        "(see 'actindex layers --model …')")
    return chosen



def layer_table(spec: str, weights: str | None, input_size: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows for `actindex layers`: every module with its type and geometry, and the default choice."""
    from .models import load_model

    model = load_model(spec, weights, "cpu").module
    geometry = trace_geometry(model, input_size)
    try:
        defaults = default_layers(model, geometry)
    except UserError:
        defaults = []
    rows = []
    for name, module in model.named_modules():
        if not name:
            continue
        geo = geometry.get(name)
        field = geo.field if geo is not None else None
        indexable = bool(geo and geo.indexable)
        rows.append({
            "name": name, "type": type(module).__name__,
            "shape": list(geo.shape) if geo else None, "indexable": indexable,
            "channels": geo.channels if geo and indexable else None,
            "height": geo.height if geo and indexable else None, "width": geo.width if geo and indexable else None,
            "rf_size": [field[0].size, field[1].size] if field else None,
            "rf_stride": [field[0].stride, field[1].stride] if field else None,
            "rf_padding": [field[0].padding, field[1].padding] if field else None,
            "note": (geo.note if geo else "does not run in the forward pass") if indexable or not geo else
                    f"not indexable: outputs {output_shape(geo)} per image",
        })
    return rows, defaults
