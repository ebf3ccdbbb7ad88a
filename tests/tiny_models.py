"""Tiny models built in code for the tests: importable as `tiny_models:NAME` model specs."""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, (3, 1), padding=(1, 0))  # asymmetric kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.bn(self.conv1(x))))


class TinyNet(nn.Module):
    """stem (5x5/2) -> in-place ReLU -> maxpool -> residual block -> strided conv -> mean -> linear.

    Receptive fields (size, stride, padding), the same on both axes except `block`:
      stem 5/2/2; block y 25/4/12, x 17/4/8 (union of the identity branch and the conv branch);
      down y 33/8/16, x 25/8/12; head: the whole input.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.relu = nn.ReLU(inplace=True)  # rewrites the stem's output after its hook has run
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.block = Residual(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.stem(x)))
        x = F.relu(self.down(self.block(x)))
        return self.head(x.mean(dim=(2, 3)))


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():
        model.stem.bias[-1] = -20.0  # a unit negative everywhere: its scores only survive before the ReLU
    return model


def not_a_module() -> object:
    return object()


class WithUnused(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Conv2d(3, 4, 3)


def with_unused() -> nn.Module:
    return WithUnused()


class SlowNet(TinyNet):
    """TinyNet that takes a while per batch (50 ms, or $SLOW_NET_SECONDS), so that a test can stop a build
    part-way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(float(os.environ.get("SLOW_NET_SECONDS", "0.05")))
        return super().forward(x)


def slow_tiny_net() -> nn.Module:
    return SlowNet()


def rank_dependent_net() -> nn.Module:
    """A TinyNet whose last conv is narrower on rank 1: as if that node had other code or weights."""
    model = tiny_net()
    if os.environ.get("RANK") == "1":
        model.down = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        model.head = nn.Linear(12, 5)
    return model


class TinyTokens(nn.Module):
    """A patch embedding, then tokens (B, N, D) as a vision transformer has, then a channels-last map."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.mix = nn.Linear(8, 8)  # on (B, N, D) tokens
        self.last = nn.Identity()  # sees the tokens as a channels-last (B, H, W, D) map
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x)  # (B, D, H, W)
        tokens = self.mix(x.flatten(2).transpose(1, 2))  # (B, H·W, D)
        grid = self.last(x.permute(0, 2, 3, 1))  # (B, H, W, D)
        return self.head(tokens.mean(dim=1) + grid.mean(dim=(1, 2)))


def tiny_tokens() -> nn.Module:
    torch.manual_seed(0)
    return TinyTokens()
