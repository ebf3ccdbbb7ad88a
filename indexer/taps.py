"""Forward hooks on named layers: hand each output to a callback while the forward pass runs (`tapped`), or
run the network only as far as a layer (`layer_value`, `first_reached`).

The callback runs inside the hook, before any later module can touch the tensor: an in-place ReLU after a
hooked layer therefore cannot change what is recorded, and nothing per position outlives the callback.
Stopping is an exception raised from the hook, so the layers after it cost nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import TypeVar

import torch
from torch import nn

from actindex.kernels.errors import UserError, not_found

Callback = Callable[[str, torch.Tensor], None]


def first_tensor(output: object) -> torch.Tensor:
    """A module's output, or the first tensor of a tuple/list output."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"module output of type {type(output).__name__} holds no tensor")


class LayerTaps:
    """Calls `callback(name, output)` for every named module's forward; checks each runs once per pass."""

    def __init__(self, model: nn.Module, names: Sequence[str], callback: Callback) -> None:
        modules = dict(model.named_modules())
        self.modules = {name: modules[name] for name in names}
        self.callback = callback
        self.calls = dict.fromkeys(names, 0)

    def _hook(self, name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            self.calls[name] += 1
            self.callback(name, first_tensor(output))

        return hook

    def check_once(self) -> None:
        """Raise when a tapped module did not run exactly once in the last forward pass."""
        wrong = {name: n for name, n in self.calls.items() if n != 1}
        self.calls = dict.fromkeys(self.calls, 0)
        if wrong:
            name, n = next(iter(wrong.items()))
            raise UserError(f"layer '{name}' ran {n} times in one forward pass (a module reused inside its "
                            "block, like ResNet's shared ReLU); index its parent block or another layer")


@contextmanager
def tapped(model: nn.Module, names: Sequence[str], callback: Callback) -> Iterator[LayerTaps]:
    """Register the hooks for the duration of the block; they are always removed."""
    taps = LayerTaps(model, names, callback)
    handles = [module.register_forward_hook(taps._hook(name)) for name, module in taps.modules.items()]
    try:
        yield taps
    finally:
        for handle in handles:
            handle.remove()


class _Reached(Exception):
    """Raised from a hook once its layer is reached: the rest of the network is not needed."""


T = TypeVar("T")


def _identity(output: torch.Tensor) -> torch.Tensor:
    return output


def layer_value(model: nn.Module, layer: str, x: torch.Tensor,
                reduce: Callable[[torch.Tensor], T] = _identity) -> T:  # type: ignore[assignment]
    """`reduce(output of layer)` for the input batch `x`, differentiable when `x` requires grad.

    `reduce` runs inside the hook, before any later in-place op can rewrite the output, and the forward pass
    stops right after the layer.
    """
    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        raise not_found("layer", layer, [name for name in modules if name])
    taken: list[T] = []

    def take(_name: str, output: torch.Tensor) -> None:
        taken.append(reduce(output))
        raise _Reached

    with tapped(model, [layer], take), suppress(_Reached):
        model(x)
    if not taken:
        raise UserError(f"layer '{layer}' does not run in the model's forward pass; choose another")
    return taken[0]


def first_reached(model: nn.Module, layers: Sequence[str], x: torch.Tensor) -> str | None:
    """Which of `layers` the forward pass of `x` reaches first (before it runs), or None when it reaches none
    of them or fails first; the pass stops there."""
    modules = dict(model.named_modules())
    reached: list[str] = []

    def hook_for(name: str) -> Callable[[nn.Module, object], None]:
        def hook(_module: nn.Module, _inputs: object) -> None:
            reached.append(name)
            raise _Reached

        return hook

    handles = [modules[name].register_forward_pre_hook(hook_for(name)) for name in layers]
    try:
        model(x)
    except Exception:  # noqa: BLE001, S110 - _Reached, or a model that cannot run this input: nothing reached
        pass
    finally:
        for handle in handles:
            handle.remove()
    return reached[0] if reached else None
