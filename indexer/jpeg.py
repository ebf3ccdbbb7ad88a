"""JPEG bytes to pixels with libjpeg-turbo (CPU) or nvJPEG (CUDA): the one place that knows which library does it.

TorchCodec (`pip install actindex[fast]`) is torchvision's successor for image decoding and is used when it
imports; otherwise torchvision.io, whose decoders are the same libraries and give the same pixels (tested), but
which warns that it is deprecated. Both return upright RGB on the CPU (the EXIF orientation applied); callers
send the CUDA decoder only files whose orientation is 1, as neither documents what it does with the tag there.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch


@functools.cache
def _backend() -> tuple[str, Any]:
    try:
        import torchcodec
        from torchcodec.decoders import decode_jpeg

        return f"torchcodec {torchcodec.__version__}", decode_jpeg
    except (ImportError, OSError, RuntimeError):  # not installed, or built for another torch: its libraries fail
        import torchvision

        return f"torchvision.io {torchvision.__version__}", None


def backend() -> str:
    """'torchcodec 0.17.0' or 'torchvision.io 0.29.1': recorded in the index beside the decoder's name."""
    return _backend()[0]


def decode_jpeg(data: torch.Tensor | list[torch.Tensor], device: torch.device | str = "cpu",
                *, use_torchvision: bool = False) -> torch.Tensor | list[torch.Tensor]:
    """(N,) uint8 encoded bytes on the CPU, or a list of them -> (3, H, W) uint8 RGB on `device`, or a list.

    A list is decoded in one call (one nvJPEG batch on CUDA); any bad file fails the whole call, and the caller
    retries singly. `use_torchvision` forces the fallback backend (tests compare the two).
    """
    decode = None if use_torchvision else _backend()[1]
    if decode is not None:
        return decode(data, mode="RGB", device=device)
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as tv_decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "superseded by TorchCodec": the reason for the above
        warnings.simplefilter("ignore", UserWarning)  # its CUDA decoder warns once that it is in beta
        on_cpu = torch.device(device).type == "cpu"
        return tv_decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=on_cpu)
