"""The arithmetic a network runs in (`--precision`) and the memory format of its tensors, one object for both.

- ``fp32``: IEEE float32 everywhere. On CUDA that means turning off cuDNN's TF32 convolutions, which PyTorch
  enables by default (`torch.backends.cudnn.conv.fp32_precision` is "tf32" out of the box);
- ``tf32``: float32 storage, TF32 tensor-core matmuls and convolutions (CUDA only);
- ``bf16``, ``fp16``: `torch.autocast` (fp16 on CUDA only: CPUs without fp16 kernels run it some 20 times
  slower than fp32).

Top-k scores are float32 whatever the network computes in (`kernels.spatial`). Channels-last is used on the CPU,
where it was measured 1.25 to 1.9x faster (docs/BENCHMARKS.md), and on CUDA with tf32, bf16 and fp16, whose
tensor-core convolutions work in that layout (scripts/gpu_check.sh measures it); never for a model that fails
with it (a custom `.view` on a feature map), which the plan checks with one forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from actindex.kernels.errors import UserError, first_line

from .choices import Precision


@dataclass(frozen=True)
class Numerics:
    """A precision and a memory format: how a network is run. `running` wraps every forward pass."""

    precision: Precision = Precision.FP32
    channels_last: bool = False

    @property
    def memory_format(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model in this memory format (in place, as `nn.Module.to` is)."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) network input in this memory format."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @contextlib.contextmanager
    def running(self, device: torch.device) -> Iterator[None]:
        """Autocast for bf16/fp16; on CUDA, TF32 on or off for the whole forward, restored after."""
        with _fp32_mode(device, "tf32" if self.precision is Precision.TF32 else "ieee"):
            dtype = self.precision.dtype
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                yield


EXACT = Numerics()  # fp32, contiguous: how builds ran before --precision


@contextlib.contextmanager
def _fp32_mode(device: torch.device, mode: str) -> Iterator[None]:
    if device.type != "cuda":
        yield
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul  # type: ignore[attr-defined]
    saved = (conv.fp32_precision, matmul.fp32_precision)
    conv.fp32_precision = matmul.fp32_precision = mode
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


def channels_last_faster(precision: Precision, device: torch.device) -> bool:
    """Where channels-last was measured faster (docs/BENCHMARKS.md): the CPU, and CUDA's tensor-core modes."""
    return device.type != "cuda" or precision is not Precision.FP32


def choose_numerics(precision: Precision, device: torch.device, model: nn.Module, input_size: int) -> Numerics:
    """`precision` checked against `device`, with channels-last where it is faster and the model runs with it (one
    forward pass of one blank image tells). Leaves the model in the chosen memory format."""
    precision.check(device)
    numerics = Numerics(precision, channels_last_faster(precision, device))
    x = torch.zeros(1, 3, input_size, input_size, device=device)
    if numerics.channels_last:
        try:
            _forward(numerics.prepare(model), numerics, x, device)
            return numerics
        except Exception:  # noqa: BLE001 - any failure in channels-last: try the default format, which decides
            model.to(memory_format=torch.contiguous_format)
            numerics = Numerics(precision, False)
    try:
        _forward(model, numerics, x, device)
    except Exception as error:  # noqa: BLE001 - the model's own error, shown on one line
        raise UserError(f"the model does not run in --precision {precision.value}: {first_line(error)}; "
                        "use --precision fp32") from error
    return numerics


def _forward(model: nn.Module, numerics: Numerics, x: torch.Tensor, device: torch.device) -> None:
    with torch.inference_mode(), numerics.running(device):
        model(numerics.input(x))
