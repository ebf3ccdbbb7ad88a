"""What a build chooses about its numbers: how files are decoded (`Decoder`, decode.py) and what the network
computes in (`Precision`, precision.py). Plain enums that import nothing heavy: index readers, which need no torch,
and `--help` use them; the values are what the index's `decoder` and `precision` attributes hold.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from actindex.kernels.errors import UserError

if TYPE_CHECKING:
    import torch


class Decoder(enum.Enum):
    PIL = "pil"
    TURBO = "turbo"
    GPU = "gpu"

    def on(self, device: torch.device) -> Decoder:
        """What runs on `device`: a query on a laptop decodes a GPU-decoded index's images with libjpeg-turbo."""
        return Decoder.TURBO if self is Decoder.GPU and device.type != "cuda" else self

    def check(self, device: torch.device) -> None:
        if self is Decoder.GPU and device.type != "cuda":
            raise UserError(f"--decoder gpu decodes on a CUDA device, and this build runs on {device}; use "
                            "--decoder turbo for fast decoding on the CPU")


class Precision(enum.Enum):
    FP32 = "fp32"
    TF32 = "tf32"
    BF16 = "bf16"
    FP16 = "fp16"

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype; None for the float32 ones."""
        import torch

        return {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(self)

    @property
    def tolerance(self) -> float:
        """Relative tolerance (of the unit's largest recorded score) within which a query's recomputation of a hit
        must match an index built in this precision. A query runs another batch, maybe on another device (a CUDA
        build checked on a laptop, in fp32 for tf32 and fp16 indexes), whose kernels round differently; bf16 keeps
        8 bits of mantissa, fp16 and tf32 11, and the margins follow (docs/BENCHMARKS.md has the measurements)."""
        return {Precision.TF32: 0.02, Precision.BF16: 0.08, Precision.FP16: 0.03}.get(self, 0.01)

    def check(self, device: torch.device) -> None:
        """Refuse what the build's device cannot run (fast)."""
        if self in (Precision.TF32, Precision.FP16) and device.type != "cuda":
            faster = "fp32" if self is Precision.TF32 else "bf16"
            raise UserError(f"--precision {self.value} runs on CUDA devices only, and this build runs on {device}; "
                            f"use --precision {faster} on the CPU")

    def on(self, device: torch.device) -> Precision:
        """What a query on `device` recomputes an index of this precision in: the same where it runs, else fp32
        (tf32 and fp16 are approximations of it; the check keeps this precision's tolerance)."""
        if device.type != "cuda" and self in (Precision.TF32, Precision.FP16):
            return Precision.FP32
        return self
