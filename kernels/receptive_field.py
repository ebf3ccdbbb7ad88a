"""Receptive-field geometry of any CNN, traced from one forward pass of the model itself.

Convention
----------
Per spatial axis a receptive field is three integers, size ``r``, stride ``S`` and padding ``P``
(:class:`AxisField`). Feature position ``y`` (0-based along that axis of the feature map) covers the
network-input pixels::

    [y * S - P,  y * S - P + r)          half-open

where pixel 0 is the first row (y axis) or the first column (x axis) of the network input. ``P`` counts
virtual pixels in front of pixel 0, so the interval may start below 0 or end past the input;
:meth:`AxisField.span` (with ``limit``), :meth:`LayerGeometry.box` and :func:`boxes` clip it to
``[0, input_size)``. The network input itself has ``(1, 1, 0)`` per axis.

The interval is a bounding interval: dilation and a stride larger than the kernel leave pixels inside it
that the unit never reads. Away from the border it is exact (the tests check it against input gradients).
At the border the clipped box can be wider than what the unit reads, never narrower: a dilation gap may
fall on the border; the last rows/columns may belong to no unit where a layer rounds its output size down
(AlexNet at 100 px drops the last 3 rows); and a position inside padding added by ``F.pad`` reads no pixel
at all, yet gets the box it would have if the padding were image.

How a field propagates (:func:`trace_geometry`)
-----------------------------------------------
The model runs once on a zero input while a ``TorchFunctionMode`` sees every torch call, whether it comes
from a module (``nn.Conv2d``), a functional call (``F.relu``, ``F.max_pool2d``) or a tensor method
(``x.mean``, ``x.relu_()``), so branching graphs are followed as they execute, not as modules are listed.

* ``conv2d`` and ``max_pool2d`` / ``avg_pool2d`` (every dispatch path) compose a window of kernel ``k``,
  stride ``s``, padding ``p`` (the left/top one) and dilation ``d``: with ``k_eff = d (k - 1) + 1``,
  ``r' = r + (k_eff - 1) S``, ``P' = P + p S``, ``S' = S s``. ``padding="same"`` puts the extra pixel of an
  odd total on the right/bottom, as PyTorch does, so only ``total // 2`` shifts ``P``. ``ceil_mode`` only
  changes how many windows there are, not where they start.
* ``F.pad`` / ``nn.ZeroPad2d`` and friends: only the left/top amount shifts the field, ``P' = P + left S``
  (a negative amount crops). Reflect and replicate padding are treated like zero padding: the pixels they
  copy lie next to the border, inside the clipped box. Circular padding wraps around: field unknown.
* ``adaptive_avg_pool2d`` / ``adaptive_max_pool2d``: an output of size 1 is the whole input. When the
  input size ``n`` is divisible by the output size ``o`` it is a pool with kernel = stride = ``n / o``.
  Otherwise PyTorch's windows ``[floor(j n / o), ceil((j + 1) n / o))`` are not evenly spaced, and the
  field is that of the smallest plain pool (stride ``floor`` or ``ceil`` of ``n / o``) whose windows contain
  every adaptive window. This is conservative: a box may be a pixel or so wider than the real window.
* Ops whose output keeps the spatial size (elementwise ops, batch norm, ``cat`` along channels, dropout,
  ``relu_``, ``add_``, channel slicing, permutes that keep y before x, ...) take the union of the inputs of
  that spatial size: ``start = min(-P)``, ``end = max(-P + r)``, ``P = -start``, ``r = end - start``; their
  strides must agree. Inputs broadcast from a 1x1 map (squeeze-excitation gates, global context) are NOT
  counted: they depend on the whole image and would make every field after the first gate the whole image,
  which says nothing about where a unit looks. Likewise a conv weight computed from the input is ignored.
* Outputs without spatial axes (fewer than 4 dims: ``flatten``, ``mean``, ``linear``), reshapes that merge
  the spatial axes, and reductions to a 1x1 map depend on the whole input: size = stride = input size,
  padding 0 per axis, height = width = 1. A 4-D map computed from such a tensor (attention reshaped back)
  covers the whole input at every position.
* Anything else that changes the spatial size or moves pixels (interpolate, ``conv_transpose2d``,
  ``unfold``, ``pixel_shuffle``, ``flip``, ``roll``, cropping by slicing, ...) gives no field, and every
  tensor computed from it has none either; :class:`LayerGeometry` then has ``field=None`` and a ``note``
  that names the op. The trace never raises for such ops.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import not_found
from .freeze import frozen

__all__ = ["AxisField", "LayerGeometry", "boxes", "trace_geometry"]


@dataclass(frozen=True)
class AxisField:
    """Receptive field along one axis: position ``y`` covers input pixels ``[y*stride - padding, +size)``."""

    size: int
    stride: int
    padding: int

    def __post_init__(self) -> None:
        if self.size < 1 or self.stride < 1:
            raise ValueError(f"receptive field needs size >= 1 and stride >= 1, got {self}")

    def span(self, pos: int, limit: int | None = None) -> tuple[int, int]:
        """Half-open ``(start, end)`` of input pixels seen by ``pos``, clipped to ``[0, limit)`` if given."""
        start = pos * self.stride - self.padding
        end = start + self.size
        if limit is not None:
            start, end = min(max(start, 0), limit), min(max(end, 0), limit)
        return start, end


@dataclass(frozen=True)
class LayerGeometry:
    """Output size and receptive field of one module, as traced at one input size."""

    name: str
    channels: int
    height: int
    width: int
    field: tuple[AxisField, AxisField] | None  # (y, x); None when it cannot be derived, `note` says why
    note: str = ""
    shape: tuple[int, ...] = ()  # the output of one image, batch axis dropped: (C, H, W), (C,), (197, 192), ...
    layout: str = "CHW"  # its axes: "CHW", "C" (one value per channel), "HWC" (channels last), "" (other)

    @property
    def indexable(self) -> bool:
        """Whether the output is what an index stores per unit: a (C, H, W) map or a (C,) vector."""
        return self.layout in ("CHW", "C")

    def box(self, y: int, x: int, input_hw: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)`` of input pixels seen by feature position ``(y, x)``, half-open, clipped."""
        if self.field is None:
            raise ValueError(f"layer {self.name!r} has no receptive field: {self.note}")
        y0, y1 = self.field[0].span(y, input_hw[0])
        x0, x1 = self.field[1].span(x, input_hw[1])
        return y0, x0, y1, x1


def boxes(
    field: tuple[AxisField, AxisField], y: torch.Tensor, x: torch.Tensor, input_hw: tuple[int, int]
) -> torch.Tensor:
    """Vectorized :meth:`LayerGeometry.box`: integer positions ``y``, ``x`` (broadcastable) -> (..., 4) int32.

    For whole top-k tables at once, where a Python loop over ``box`` would dominate.
    """
    y, x = torch.broadcast_tensors(y.long(), x.long())  # (...), (...)
    fy, fx = field
    y0 = y * fy.stride - fy.padding  # (...)
    x0 = x * fx.stride - fx.padding  # (...)
    out = torch.stack([y0, x0, y0 + fy.size, x0 + fx.size], dim=-1)  # (..., 4) unclipped
    limit = torch.tensor([input_hw[0], input_hw[1], input_hw[0], input_hw[1]], device=out.device)  # (4,)
    return torch.minimum(out.clamp_min(0), limit).to(torch.int32)  # (..., 4)


# --------------------------------------------------------------------------------------------------
# Field algebra: small pure functions on AxisField.


def _window(f: AxisField, kernel: int, stride: int, padding: int, dilation: int = 1) -> AxisField:
    """Field after a sliding window (conv or pool) with the given left/top padding."""
    k_eff = dilation * (kernel - 1) + 1
    return AxisField(f.size + (k_eff - 1) * f.stride, f.stride * stride, f.padding + padding * f.stride)


def _union(fields: Sequence[AxisField]) -> AxisField:
    """Smallest field containing all of ``fields`` (which share one stride) at every position."""
    start = min(-f.padding for f in fields)
    end = max(-f.padding + f.size for f in fields)
    return AxisField(end - start, fields[0].stride, -start)


def _whole(n: int, positions: int, stride: int | None = None) -> AxisField:
    """A field whose every one of ``positions`` covers all ``n`` input pixels.

    With ``stride`` None the stride is ``n`` itself, so one position gives ``(n, n, 0)``; a stride is
    passed when the field must line up with other fields in a union.
    """
    s = n if stride is None else stride
    return AxisField(n + (positions - 1) * s, s, (positions - 1) * s)


def _adaptive_window(n: int, o: int) -> tuple[int, int, int]:
    """(kernel, stride, padding) of the smallest plain pool containing every adaptive window of n -> o."""
    if n % o == 0:
        return n // o, n // o, 0
    starts = [j * n // o for j in range(o)]
    ends = [-(-(j + 1) * n // o) for j in range(o)]  # ceil division
    best: tuple[int, int, int] | None = None
    for s in sorted({max(n // o, 1), -(-n // o)}):
        p = max(j * s - starts[j] for j in range(o))
        k = max(ends[j] - j * s + p for j in range(o))
        if best is None or k < best[0]:
            best = (k, s, p)
    assert best is not None
    return best


# --------------------------------------------------------------------------------------------------
# What the tracer knows about one tensor.


@dataclass(frozen=True)
class _Local:
    """A known field; ``dims`` are the tensor dims holding (y, x), normally the last two."""

    field: tuple[AxisField, AxisField]
    dims: tuple[int, int]


@dataclass(frozen=True)
class _Whole:
    """Depends on the whole input and has no spatial layout; ``op`` removed it."""

    op: str


@dataclass(frozen=True)
class _Unknown:
    note: str


_State = _Local | _Whole | _Unknown


@dataclass(frozen=True)
class _Seen:
    """A tracked input of one call, with its shape read *before* the call (in-place ops may change it)."""

    tensor: torch.Tensor
    state: _State
    shape: tuple[int, ...]


def _per_axis(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    values = tuple(int(v) for v in value)
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _bind(args: tuple, kwargs: dict, names: Sequence[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """Arguments by name for builtins, which have no inspectable signature."""
    bound = dict(defaults)
    bound.update(zip(names, args, strict=False))  # fewer args than names is the norm
    bound.update(kwargs)
    return bound


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_MAXPOOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")
_AVGPOOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode")
# F.max_pool2d is a boolean_dispatch that reaches the mode under its own name or, with
# return_indices=True, as max_pool2d_with_indices; torch.max_pool2d and torch._C._nn.* arrive directly.
_MAXPOOL_OPS = frozenset({"max_pool2d", "_max_pool2d", "max_pool2d_with_indices"})
_AVGPOOL_OPS = frozenset({"avg_pool2d"})
_ADAPTIVE_OPS = frozenset(
    {"adaptive_avg_pool2d", "adaptive_max_pool2d", "_adaptive_max_pool2d", "adaptive_max_pool2d_with_indices"}
)
_PAD_OPS = frozenset({"pad", "constant_pad_nd", "reflection_pad2d", "replication_pad2d"})
_PERMUTE_OPS = frozenset(
    {
        "permute",
        "transpose",
        "transpose_",
        "swapaxes",
        "swapaxes_",
        "swapdims",
        "swapdims_",
        "movedim",
        "moveaxis",
    }
)
_RESHAPE_OPS = frozenset({"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"})
_SPECIFIC_OPS = _MAXPOOL_OPS | _AVGPOOL_OPS | _ADAPTIVE_OPS | _PAD_OPS | _PERMUTE_OPS | {"conv2d"}
_FACTORY_OPS = frozenset(
    {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like"}
)
# These keep the shape (or leave no spatial axes) yet move pixels, so the generic rules would be wrong.
_MOVES_PIXELS = frozenset(
    {"flip", "fliplr", "flipud", "roll", "rot90", "unfold", "fold", "grid_sample", "as_strided"}
)


class _FieldTracer(TorchFunctionMode):
    """Gives every tensor computed from a tracked tensor a :data:`_State`.

    States are keyed by ``id(tensor)``; every tracked tensor is kept in ``alive`` so an id cannot be
    reused by a new tensor while the trace runs. :meth:`clear` drops them all.
    """

    def __init__(self, input_hw: tuple[int, int]) -> None:
        super().__init__()
        self.input_hw = input_hw
        self.states: dict[int, _State] = {}
        self.alive: list[torch.Tensor] = []

    def track(self, tensor: torch.Tensor, state: _State) -> None:
        self.states[id(tensor)] = state
        self.alive.append(tensor)

    def state_of(self, tensor: torch.Tensor) -> _State | None:
        return self.states.get(id(tensor))

    def clear(self) -> None:
        self.states.clear()
        self.alive.clear()

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        seen = [
            _Seen(t, self.states[id(t)], tuple(t.shape))
            for t in _tensors((args, kwargs))
            if id(t) in self.states
        ]
        result = func(*args, **kwargs)
        if not seen:
            return result
        name = getattr(func, "__name__", repr(func))
        outs = list(_tensors(result))
        if not outs and name == "__setitem__" and isinstance(args[0], torch.Tensor):
            outs = [args[0]]  # x[...] = y writes into x and returns None
        if not outs:
            return result
        if name.startswith("new_") or name in _FACTORY_OPS:
            return result  # shaped like an input but not computed from its values
        main = seen[0] if seen[0].tensor is _first_arg(args, kwargs) else None
        for out in outs:
            try:
                state = self._rule(name, func, args, kwargs, main, seen, out)
            except (TypeError, ValueError, IndexError) as exc:
                # An unexpected argument form of a known op: report it on the layer instead of failing a
                # forward pass that PyTorch itself accepted.
                note = f"receptive field unknown: could not read the arguments of op {name!r} ({exc})"
                state = _Unknown(note)
            self.track(out, state)
        return result

    # -- rules ------------------------------------------------------------------------------------

    def _rule(
        self,
        name: str,
        func: Callable,
        args: tuple,
        kwargs: dict,
        main: _Seen | None,
        seen: list[_Seen],
        out: torch.Tensor,
    ) -> _State:
        if main is None or name not in _SPECIFIC_OPS:
            return self._generic(name, seen, out)
        if not isinstance(main.state, _Local):
            return main.state  # unknown stays unknown; a whole-input tensor stays whole
        if name in _PERMUTE_OPS:
            return self._permute(name, func, args, kwargs, main)
        nd = len(main.shape)
        if name in _PAD_OPS:
            return self._pad(name, args, kwargs, main)
        if main.state.dims != (nd - 2, nd - 1):
            return _Unknown(f"receptive field unknown: op {name!r} got a tensor whose spatial axes moved")
        fy, fx = main.state.field
        if name in _ADAPTIVE_OPS:
            fields = []
            for f, n_in, n_out, n_img in zip(
                (fy, fx), main.shape[-2:], out.shape[-2:], self.input_hw, strict=True
            ):
                if n_out == 1:
                    fields.append(_whole(n_img, 1))
                else:
                    fields.append(_window(f, *_adaptive_window(n_in, n_out)))
            return _Local((fields[0], fields[1]), (out.ndim - 2, out.ndim - 1))
        if name == "conv2d":
            b = _bind(args, kwargs, _CONV_ARGS, {"stride": 1, "padding": 0, "dilation": 1})
            kernel = tuple(b["weight"].shape[-2:])
            dilation = _per_axis(b["dilation"])
            padding = b["padding"]
            if padding == "valid":
                padding = (0, 0)
            elif padding == "same":
                padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
            padding = _per_axis(padding)
        else:
            if name in _MAXPOOL_OPS:
                b = _bind(args, kwargs, _MAXPOOL_ARGS, {"stride": None, "padding": 0, "dilation": 1})
                dilation = _per_axis(b["dilation"])
            else:
                b = _bind(args, kwargs, _AVGPOOL_ARGS, {"stride": None, "padding": 0})
                dilation = (1, 1)
            kernel = _per_axis(b["kernel_size"])
            padding = _per_axis(b["padding"])
        # Pools default the stride to the kernel; torch passes that default as None or as an empty list.
        stride = _per_axis(b["stride"]) if b["stride"] not in (None, [], ()) else kernel
        field = (
            _window(fy, kernel[0], stride[0], padding[0], dilation[0]),
            _window(fx, kernel[1], stride[1], padding[1], dilation[1]),
        )
        return _Local(field, (out.ndim - 2, out.ndim - 1))

    def _pad(self, name: str, args: tuple, kwargs: dict, main: _Seen) -> _State:
        assert isinstance(main.state, _Local)
        if name == "pad":
            b = _bind(args, kwargs, ("input", "pad", "mode", "value"), {"mode": "constant"})
            amounts, mode = list(b["pad"]), b["mode"]
        else:
            amounts, mode = list(_bind(args, kwargs, ("input", "pad"), {})["pad"]), name
        if mode == "circular":
            return _Unknown(f"receptive field unknown: op {name!r} with circular padding wraps around")
        nd = len(main.shape)
        fields = list(main.state.field)
        for axis, dim in enumerate(main.state.dims):
            pair = nd - 1 - dim  # pad lists (left, right) pairs from the last dim backwards
            if 2 * pair < len(amounts):
                f = fields[axis]
                fields[axis] = AxisField(f.size, f.stride, f.padding + int(amounts[2 * pair]) * f.stride)
        return _Local((fields[0], fields[1]), main.state.dims)

    def _permute(self, name: str, func: Callable, args: tuple, kwargs: dict, main: _Seen) -> _State:
        """Follow the spatial dims through a permutation by replaying it on a probe of distinct sizes."""
        assert isinstance(main.state, _Local)
        nd = len(main.shape)
        probe = torch.empty(tuple(range(2, nd + 2)))  # dim i has size i + 2
        rest = args[1:] if args and args[0] is main.tensor else args
        kw = {k: v for k, v in kwargs.items() if k != "input"}
        moved = func(probe, *rest, **kw)
        dims = tuple(moved.shape.index(d + 2) for d in main.state.dims)
        if dims[0] > dims[1]:
            return _Unknown(f"receptive field unknown: op {name!r} swaps the y and x axes")
        return _Local(main.state.field, (dims[0], dims[1]))

    def _generic(self, name: str, seen: list[_Seen], out: torch.Tensor) -> _State:
        """Union over inputs that keep their spatial size; see the module docstring for the cases."""
        if name in _MOVES_PIXELS:
            return _Unknown(f"receptive field unknown: op {name!r} moves pixels")
        m = out.ndim
        if m < 4:
            unknown = [s.state for s in seen if isinstance(s.state, _Unknown)]
            whole = [s.state for s in seen if isinstance(s.state, _Whole)]
            return unknown[0] if unknown else whole[0] if whole else _Whole(name)
        # Where y and x sit in the output: inputs align with it from the right, as in broadcasting.
        aligned: list[tuple[_Local, tuple[int, int]]] = []
        mismatch = False
        for s in seen:
            if not isinstance(s.state, _Local):
                continue
            shift = m - len(s.shape)
            od = (s.state.dims[0] + shift, s.state.dims[1] + shift)
            in_hw = (s.shape[s.state.dims[0]], s.shape[s.state.dims[1]])
            if min(od) >= 0 and (out.shape[od[0]], out.shape[od[1]]) == in_hw:
                aligned.append((s.state, od))
            elif in_hw != (1, 1):
                mismatch = True
        out_dims = aligned[0][1] if aligned else (m - 2, m - 1)
        out_hw = (out.shape[out_dims[0]], out.shape[out_dims[1]])
        counted: list[_Seen] = []
        gates: list[_Seen] = []
        for s in seen:
            shift = m - len(s.shape)
            if isinstance(s.state, _Local):
                hw: tuple[int, ...] = (s.shape[s.state.dims[0]], s.shape[s.state.dims[1]])
            else:
                hw = tuple(s.shape[d - shift] if d - shift >= 0 else 1 for d in out_dims)
            (gates if hw == (1, 1) and out_hw != (1, 1) else counted).append(s)
        unknown = [s.state for s in counted if isinstance(s.state, _Unknown)]
        if unknown:
            return unknown[0]
        if mismatch:
            if out_hw == (1, 1) or name in _RESHAPE_OPS:
                return _Whole(name)  # a single position, or positions mixed by a reshape, see everything
            return _Unknown(f"receptive field unknown: op {name!r} changes the spatial size")
        wholes = [s.state for s in counted if isinstance(s.state, _Whole)]
        if not aligned:
            if wholes:
                return wholes[0]
            gate_unknown = [s.state for s in gates if isinstance(s.state, _Unknown)]
            return gate_unknown[0] if gate_unknown else _Whole(name)  # built from 1x1 maps only
        if any(od != out_dims for _, od in aligned):
            return _Unknown(f"receptive field unknown: op {name!r} combines maps with different axis orders")
        fields: list[AxisField] = []
        for axis in range(2):
            parts = [st.field[axis] for st, _ in aligned]
            if len({f.stride for f in parts}) > 1:
                return _Unknown(f"receptive field unknown: op {name!r} combines maps of different strides")
            if wholes:
                fields.append(_whole(self.input_hw[axis], out_hw[axis], parts[0].stride))
            else:
                fields.append(_union(parts))
        return _Local((fields[0], fields[1]), out_dims)


def _first_arg(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs.get("input", kwargs.get("self"))


# --------------------------------------------------------------------------------------------------
# Tracing a model.


@dataclass(frozen=True)
class _Snapshot:
    """What a hook saw: the state at that moment, since later in-place ops (``out += identity``) change it."""

    state: _State | None
    shape: tuple[int, ...]
    calls: int


@contextmanager
def _output_hooks(
    modules: Sequence[tuple[str, nn.Module]], record: Callable[[str, Any], None]
) -> Iterator[None]:
    handles = []
    try:
        for name, module in modules:
            hook = functools.partial(_call_record, record, name)
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _call_record(
    record: Callable[[str, Any], None], name: str, module: nn.Module, inputs: Any, output: Any
) -> None:
    record(name, output)


def _select_modules(model: nn.Module, names: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    if names is None:
        return [(n, m) for n, m in model.named_modules() if n != ""]
    everything = dict(model.named_modules(remove_duplicate=False))
    missing = [n for n in names if n not in everything]
    if missing:
        raise not_found("module", missing[0], [n for n in everything if n], limit=40)
    return [(n, everything[n]) for n in names]


_NO_INPUT = "receptive field unknown: output does not depend on the input"


def _layout(shape: tuple[int, ...], state: _State | None) -> str:
    """The axes of a batch output `shape`, as `LayerGeometry.layout` names them."""
    if len(shape) == 2:
        return "C"
    if len(shape) != 4:
        return ""
    if isinstance(state, _Local) and state.dims == (1, 2):
        return "HWC"
    return "CHW" if not isinstance(state, _Local) or state.dims == (2, 3) else ""


def _geometry(name: str, snap: _Snapshot, input_hw: tuple[int, int]) -> LayerGeometry:
    shape = snap.shape
    spatial = (shape[-2], shape[-1]) if len(shape) >= 4 else (1, 1)
    state = snap.state
    repeat = f"module ran {snap.calls} times; geometry of the last call" if snap.calls > 1 else ""
    one, layout = tuple(shape[1:]), _layout(shape, state)
    if isinstance(state, _Local):
        height, width = shape[state.dims[0]], shape[state.dims[1]]
        channel_dim = 1 if 1 not in state.dims else len(shape) - 1
        return LayerGeometry(name, shape[channel_dim], height, width, state.field, repeat, one, layout)
    channels = shape[1] if len(shape) >= 2 else 1
    if isinstance(state, _Whole):
        field = (_whole(input_hw[0], spatial[0]), _whole(input_hw[1], spatial[1]))
        note = f"whole input: op {state.op!r} mixes all positions"
        return LayerGeometry(
            name, channels, spatial[0], spatial[1], field, "; ".join(filter(None, [note, repeat])), one, layout
        )
    note = state.note if isinstance(state, _Unknown) else _NO_INPUT
    return LayerGeometry(
        name, channels, spatial[0], spatial[1], None, "; ".join(filter(None, [note, repeat])), one, layout
    )


def trace_geometry(
    model: nn.Module,
    input_size: int | tuple[int, int],
    names: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, LayerGeometry]:
    """Receptive field, channels and feature-map size of modules, from one forward pass of a zero input.

    ``names`` defaults to every named module except the root, in ``model.named_modules()`` order; modules
    that do not run (auxiliary heads in eval mode) are then left out, while a requested name that does not
    run raises. A module called several times reports its last call. A layer's geometry is read from its
    output as the forward hook sees it (the first tensor of a tuple/list output), before later in-place ops.
    The model runs in eval mode under ``torch.inference_mode`` on ``device`` (train-mode batch norm would fold
    the zeros into its running statistics and refuse 1x1 maps at batch size 1); its flags are restored.
    """
    input_hw = _per_axis(input_size)
    modules = _select_modules(model, names)
    params = [p for p in model.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else torch.float32
    tracer = _FieldTracer(input_hw)
    seen: dict[str, _Snapshot] = {}

    def record(name: str, output: Any) -> None:
        first = next(_tensors(output), None)
        calls = seen[name].calls + 1 if name in seen else 1
        if first is None:
            seen[name] = _Snapshot(_Unknown("receptive field unknown: module returned no tensor"), (), calls)
        else:
            seen[name] = _Snapshot(tracer.state_of(first), tuple(first.shape), calls)

    try:
        with frozen(model), torch.inference_mode(), _output_hooks(modules, record):
            x = torch.zeros(1, 3, *input_hw, device=device, dtype=dtype)  # (1, 3, H, W)
            tracer.track(x, _Local((AxisField(1, 1, 0), AxisField(1, 1, 0)), (2, 3)))
            with tracer:
                model(x)
    finally:
        tracer.clear()  # the traced activations are large; keep only the geometry
    not_run = [n for n, _ in modules if n not in seen]
    if names is not None and not_run:
        raise ValueError(f"modules {not_run} did not run in the forward pass, so they have no geometry")
    return {n: _geometry(n, seen[n], input_hw) for n, _ in modules if n in seen}
