"""A network held still while actindex looks at it: eval mode and no parameter gradients, both restored.

Queries and traces run a user's network as it is in deployment (batch norm with its running statistics,
dropout off) and differentiate with respect to the input only; computing the weights' gradients would cost as
much again and change nothing. Every module's training flag and every parameter's `requires_grad` are put
back afterwards, however the block ends, so a model handed in from a notebook comes back as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and `requires_grad=False` on every parameter for the block; the flags restored after it."""
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    model.eval()
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield model
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode
