"""Guided backpropagation (Springenberg et al. 2015) for every ReLU a model runs, however it calls it.

Convention: in the backward pass through a gate y = clamp(x, lo, hi) (a ReLU is lo = 0, hi = +inf; ReLU6 is
lo = 0, hi = 6), the gradient passes only where the forward input was strictly inside the gate and the incoming
gradient is positive:

    grad_in = grad_out * (lo < x < hi) * (grad_out > 0)

Forward values are unchanged, bit for bit. Everything else (convolutions, pooling, other activations)
backpropagates its plain gradient.

Module hooks miss ReLUs: torchvision's GoogLeNet and DenseNet call `F.relu` functionally, ResNet reuses one
in-place `nn.ReLU` several times per block, `nn.ReLU6` calls `F.hardtanh`. So `GuidedBackprop` is a
`TorchFunctionMode`: it sees the *function* calls, whichever module, method or spelling made them, and records
a guided autograd Function in their place. Only the outermost call is seen (the mode is switched off while it
handles a call), so `F.relu` calling `torch.relu` inside is one ReLU, never two.

Gates it guides (the functions that reach `__torch_function__` in torch 2.14):
    relu       F.relu (inplace or not), torch.relu, torch.relu_ (= F.relu_), Tensor.relu, Tensor.relu_
    relu6      F.relu6 (inplace or not)
    hardtanh   F.hardtanh (inplace or not, any bounds; nn.ReLU6 and nn.Hardtanh call it), F.hardtanh_
    clamp      torch.clamp/clip/clamp_/clip_/clamp_min/clamp_min_ and the Tensor methods of those names, with
               number bounds that make a gate: min = 0 (a ReLU, max optional) or both min and max (a hardtanh)
    threshold  F.threshold (= nn.Threshold, inplace or not), torch.threshold, torch.threshold_ (= F.threshold_)

Activations guided backprop is not defined for run unchanged and are counted by name in `mode.unguided`, so a
caller can say its maps are only partly guided: gelu, silu, hardswish, mish, elu, selu, celu, leaky_relu,
prelu, rrelu, softplus, sigmoid (also Tensor.sigmoid, F.sigmoid, torch.special.expit), hardsigmoid, tanh,
logsigmoid, glu, softsign, tanhshrink, hardshrink, softshrink. Clamps that are not gates (only a max, a floor
other than 0 such as clamp(min=eps) before a log, tensor bounds, `out=`) are counted there as "clamp" too.

In-place calls keep their side effect: the guided result is computed out of place and copied into the input,
which is returned, so autograd routes the gradient through the guided Function and code that ignores the
return value of `x.relu_()` still sees x rectified.

Not seen: calls inside a Python-level function that itself reaches the mode, whose body runs with the mode
off (torch's own, such as F.normalize or F.layer_norm, apply no ReLU; the gates above are handled at their
outermost spelling), fused kernels that never call these functions, and `torch.compile`d or scripted code.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class _GuidedGate(torch.autograd.Function):
    """y = compute(x); dy/dx under the guided rule for the gate lo < x < hi (hi None: no upper bound)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor],
                lo: float, hi: float | None) -> torch.Tensor:
        # The mask, not x, is saved: one byte per element, and x may be rewritten in place after the call.
        open_ = x > lo
        if hi is not None:
            open_ &= x < hi
        ctx.save_for_backward(open_)
        return compute(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (open_,) = ctx.saved_tensors
        return torch.where(open_ & (grad > 0), grad, 0.0), None, None, None


@dataclass(frozen=True)
class _Gate:
    """One call of a gating function: its input, the bounds of the gate and how to compute it out of place."""

    x: torch.Tensor
    lo: float
    hi: float | None
    forward: Callable[[torch.Tensor], torch.Tensor]
    inplace: bool = False


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Parsers take a call's arguments by the function's own signature and return the gate, or None when the call
# is not a gate (it then runs unchanged). A call they cannot bind raises TypeError and also runs unchanged, so
# torch reports the user's mistake itself.

def _relu(input: torch.Tensor, inplace: bool = False) -> _Gate:
    return _Gate(input, 0.0, None, torch.relu, inplace)


def _relu6(input: torch.Tensor, inplace: bool = False) -> _Gate:
    return _Gate(input, 0.0, 6.0, F.relu6, inplace)


def _hardtanh(input: torch.Tensor, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False) -> _Gate | None:
    if not (_is_number(min_val) and _is_number(max_val)) or min_val > max_val:
        return None  # F.hardtanh raises on these; let it
    return _Gate(input, min_val, max_val, partial(F.hardtanh, min_val=min_val, max_val=max_val), inplace)


def _clamp(input: torch.Tensor, min: Any = None, max: Any = None) -> _Gate | None:
    if not _is_number(min) or not (max is None or _is_number(max)):
        return None  # a cap without a floor, or elementwise bounds: not an activation
    if max is None and min != 0:
        return None  # a floor such as clamp(min=eps) guards a log or a division; it is no ReLU
    return _Gate(input, min, max, partial(torch.clamp, min=min, max=max))


def _clamp_min(input: torch.Tensor, min: Any) -> _Gate | None:
    return _clamp(input, min)


def _clamp_max(input: torch.Tensor, max: Any) -> None:
    return None


def _threshold(input: torch.Tensor, threshold: float, value: float, inplace: bool = False) -> _Gate | None:
    if not (_is_number(threshold) and _is_number(value)):
        return None
    return _Gate(input, threshold, None, partial(F.threshold, threshold=threshold, value=value), inplace)


def _fixed(parser: Callable[..., _Gate | None], inplace: bool) -> Callable[..., _Gate | None]:
    """A parser for a spelling whose in-placeness is in its name (torch.relu_, Tensor.clamp_)."""

    def parse(*args: Any, **kwargs: Any) -> _Gate | None:
        if "inplace" in kwargs:
            raise TypeError("unexpected keyword 'inplace'")
        gate = parser(*args, **kwargs)
        return None if gate is None else _Gate(gate.x, gate.lo, gate.hi, gate.forward, inplace)

    return parse


def _on_floats(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether the call's input (first argument, `self` of a method) is a floating-point tensor."""
    x = args[0] if args else kwargs.get("input")
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _spellings(name: str, namespaces: tuple[object, ...]) -> list[object]:
    return [getattr(ns, name) for ns in namespaces if hasattr(ns, name)]


_FUNCTIONAL = (F, torch._C._nn)
_TORCH = (torch, torch.Tensor)  # Tensor methods reach the mode as TensorBase methods, the same objects


def _guided_table() -> dict[object, tuple[str, Callable[..., _Gate | None]]]:
    table: dict[object, tuple[str, Callable[..., _Gate | None]]] = {}
    # Functional spellings with an `inplace` argument first; fixed spellings may share an object with them
    # (F.relu_ is torch.relu_) and then win, as they should.
    for name, parser in (("relu", _relu), ("relu6", _relu6), ("hardtanh", _hardtanh), ("threshold", _threshold)):
        for fn in _spellings(name, (F,)):
            table[fn] = (name, parser)
    for fn in _spellings("hardtanh", (torch._C._nn,)):
        table[fn] = ("hardtanh", _fixed(_hardtanh, False))
    for fn in _spellings("hardtanh_", _FUNCTIONAL):
        table[fn] = ("hardtanh", _fixed(_hardtanh, True))
    for fn in _spellings("relu6", (torch._C._nn,)):
        table[fn] = ("relu6", _fixed(_relu6, False))
    for fn in _spellings("relu6_", (torch._C._nn,)):
        table[fn] = ("relu6", _fixed(_relu6, True))
    methods: tuple[tuple[str, str, Callable[..., _Gate | None]], ...] = (
        ("relu", "relu", _relu), ("threshold", "threshold", _threshold), ("clamp", "clamp", _clamp),
        ("clip", "clamp", _clamp), ("clamp_min", "clamp", _clamp_min), ("clamp_max", "clamp", _clamp_max))
    for name, canonical, parser in methods:
        for fn in _spellings(name, _TORCH):
            table[fn] = (canonical, _fixed(parser, False))
        for fn in _spellings(name + "_", _TORCH + (F,)):
            table[fn] = (canonical, _fixed(parser, True))
    return table


# Counter name -> the names the activation goes by in torch's namespaces (in place or not).
_UNGUIDED_NAMES = {
    "gelu": ("gelu",), "silu": ("silu",), "hardswish": ("hardswish",), "mish": ("mish",), "elu": ("elu",),
    "selu": ("selu",), "celu": ("celu",), "leaky_relu": ("leaky_relu",), "prelu": ("prelu",),
    "rrelu": ("rrelu",), "softplus": ("softplus",), "sigmoid": ("sigmoid", "expit"),
    "hardsigmoid": ("hardsigmoid",), "tanh": ("tanh",), "logsigmoid": ("logsigmoid", "log_sigmoid"),
    "glu": ("glu",), "softsign": ("softsign",), "tanhshrink": ("tanhshrink",), "hardshrink": ("hardshrink",),
    "softshrink": ("softshrink",),
}


def _unguided_table() -> dict[object, str]:
    namespaces = (torch, torch.Tensor, F, torch._C._nn, torch.special)
    return {fn: canonical for canonical, names in _UNGUIDED_NAMES.items() for name in names
            for fn in _spellings(name, namespaces) + _spellings(name + "_", namespaces)}


_GUIDED = _guided_table()
_UNGUIDED = _unguided_table()


class GuidedBackprop(TorchFunctionMode):
    """Records guided gates in place of every ReLU-like call made while it is active.

    Usage:
        with GuidedBackprop() as mode:
            out = model(x)          # forward under the mode records guided Functions in the graph
        out[...].sum().backward()   # backward may run inside or outside the mode
        mode.unguided               # Counter of activations guided backprop is not defined for
        mode.guided                 # Counter of guided ops applied, by name (e.g. {"relu": 17, "hardtanh": 3})

    The rule is elementwise, so for an eval-mode model each image's map in a batch depends only on that image.
    Counters accumulate over every use of one instance; use a new instance for fresh counts. Calls made with
    gradients off (or on tensors that do not require them) run their usual kernel but are still counted;
    calls on integer or bool tensors (clamped indices) are not activations and are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.guided: collections.Counter[str] = collections.Counter()
        self.unguided: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        try:
            guided = _GUIDED.get(func)
            unguided = _UNGUIDED.get(func)
        except TypeError:  # an unhashable callable: none of ours
            return func(*args, **kwargs)
        if (guided is not None or unguided is not None) and not _on_floats(args, kwargs):
            return func(*args, **kwargs)  # clamping indices or masks is no activation: not counted
        if unguided is not None:
            self.unguided[unguided] += 1
        if guided is None:
            return func(*args, **kwargs)
        name, parser = guided
        try:
            gate = parser(*args, **kwargs)
        except TypeError:
            gate = None
        if gate is None:
            self.unguided[name] += 1
            return func(*args, **kwargs)
        self.guided[name] += 1
        if not (torch.is_grad_enabled() and gate.x.requires_grad):
            return func(*args, **kwargs)  # no gradient will pass here: the usual kernel, in place or not
        # This mode is off while it handles a call, so the ops inside the Function are not intercepted again.
        out = _GuidedGate.apply(gate.x, gate.forward, gate.lo, gate.hi)
        if gate.inplace:
            # The copy is differentiable: gradients reaching x's new value flow into the guided Function.
            return gate.x.copy_(out)
        return out
