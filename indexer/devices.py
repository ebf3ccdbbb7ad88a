"""Which device a command runs on: what `--device` (or its absence) means, checked with a one-line error.

`None` means CUDA when this machine has it, else the CPU. A plain "cuda" is named by index (the current GPU), so
that `torch.cuda.set_device` and collectives accept it. Under torchrun, every process takes cuda:LOCAL_RANK.
"""

from __future__ import annotations

import torch

from actindex.kernels.errors import UserError


def resolve_device(requested: str | None, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device for this process: cuda:LOCAL_RANK when CUDA is asked for (or present) under torchrun."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise UserError(f"unknown device '{requested}'; use cpu, cuda or cuda:N") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{requested}' asked for but CUDA is not available; use --device cpu")
        if world_size > 1:
            if device.index is not None:
                raise UserError(f"under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda, not "
                                f"'{requested}' (use CUDA_VISIBLE_DEVICES to choose the GPUs)")
            count = torch.cuda.device_count()
            if local_rank >= count:
                raise UserError(f"local rank {local_rank} has no GPU: this node shows {count}; start at most "
                                f"{count} processes per node (--nproc_per_node)")
            device = torch.device("cuda", local_rank)
        elif device.index is None:  # 'cuda': the current GPU, named, so set_device and collectives accept it
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise UserError(f"unsupported device '{requested}'; use cpu, cuda or cuda:N")
    return device
