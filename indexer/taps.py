"""Forward hooks that hand each named layer's output to a callback while the forward pass runs.

The callback runs inside the hook, before any later module can touch the tensor: an in-place ReLU after a
hooked layer therefore cannot change what is recorded, and nothing per position outlives the callback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .errors import UserError

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
