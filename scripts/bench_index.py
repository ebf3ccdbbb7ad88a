"""Indexing cost against the forward pass it rides on, and against what a user would write without actindex.

Side by side, in one process, on the same in-memory batches and model:
  (a) forward   the bare forward pass under torch.inference_mode (normalization included);
  (b) actindex  IndexAccumulator.add_batch on the same layers, with the embedding copied to the host;
  (c) naive     forward hooks appending per-image channel maxima (and the embedding) to lists, one topk at
                the end;
  (b0) actindex-plain   (b) without the optional statistics and rows (class sums over --classes, --bottom-k,
                --patch-layer's vectors written to a float16 row file as the build writes them), when they are
                on: the difference between b/a and b0/a is their cost.
Rounds are interleaved (a, b, c, a, b, c, …) and the median time per variant is reported.

Peak memory of (b) and (c) at N and 10·N images is measured in fresh child processes (peak RSS on the CPU,
torch.cuda.max_memory_allocated on a GPU), next to the bytes each keeps per image.

End to end on a folder of JPEGs: `build_index` (decode, index, write HDF5) against a plain
torchvision ImageFolder + DataLoader + model loop with the same preprocessing.

    python scripts/bench_index.py                      # resnet18, 224 px, cpu here
    python scripts/bench_index.py --device cuda --batch-size 256 --rounds 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from actindex.indexer.accumulate import IndexAccumulator
from actindex.indexer.layers import resolve_layers
from actindex.indexer.models import IMAGENET_MEAN, IMAGENET_STD
from actindex.indexer.rows import EMBEDDING, PATCHES, RowFile, RowSink

LAYERS = "conv1,layer1,layer2,layer3,layer4"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bare:
    """(a) the forward pass alone."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.device = device

    @torch.inference_mode()
    def step(self, pixels: torch.Tensor, ids: torch.Tensor) -> None:
        x = pixels.to(self.device, non_blocking=True).float().div_(255).sub_(self.mean).div_(self.std)
        self.model(x)

    def finish(self) -> int:
        return 0


class Ours:
    """(b) actindex's indexing step: running top-k, exact sums, score histograms and (with --classes) per-class
    sums on every layer, (with --bottom-k) the lowest-k too, plus the embedding fetched to the host."""

    def __init__(self, model: nn.Module, device: torch.device, channels: dict[str, int], k: int, images: int,
                 classes: int = 0, bottom_k: int = 0, patch_layer: str = "", patch_dim: int = 0) -> None:
        embed = list(channels)[-1]
        # Class folders: each image's label, as the build passes them (random over `classes`, ImageNet's 1 000).
        labels = torch.randint(0, classes, (images,), generator=torch.Generator().manual_seed(0)) if classes else None
        self.acc = IndexAccumulator(model, channels, k, IMAGENET_MEAN, IMAGENET_STD, embed, device,
                                    labels=labels, classes=classes, bottom_k=bottom_k,
                                    patch_layer=patch_layer or None)
        # Embeddings go where the build puts them while streaming: a row file on disk, not memory.
        self.folder = tempfile.TemporaryDirectory()
        folder = Path(self.folder.name)
        self.rows = RowSink({EMBEDDING: RowFile(folder / "rows", 0, images, channels[embed]),
                             PATCHES: RowFile(folder / "patches", 0, images, patch_dim, np.float16)
                             if patch_layer else None})

    def step(self, pixels: torch.Tensor, ids: torch.Tensor) -> None:
        # As the build does: embeddings go to host memory, copied while the next batch runs.
        self.rows.push(int(ids[0]), len(ids), ids, self.acc.add_batch(pixels, ids))

    def finish(self) -> int:
        """Bytes of the whole state it keeps: top-k, exact sums, histograms, class sums, bottom-k (flat in N)."""
        self.rows.flush()
        return sum(t.numel() * t.element_size() for t in self.acc.state_dict().values())


class Naive:
    """(c) the usual script: hooks append channel maxima to lists; concatenate and topk at the end."""

    def __init__(self, model: nn.Module, device: torch.device, layers: list[str], k: int) -> None:
        self.model, self.k, self.layers = model, k, layers
        self.bare = Bare(model, device)
        self.maxima: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        self.embeddings: list[torch.Tensor] = []
        modules = dict(model.named_modules())
        for name in layers:
            modules[name].register_forward_hook(self._hook(name))

    def _hook(self, name: str):  # noqa: ANN202
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            self.maxima[name].append(output.amax(dim=(2, 3)))
            if name == self.layers[-1]:
                self.embeddings.append(output.mean(dim=(2, 3)).cpu())
        return hook

    def step(self, pixels: torch.Tensor, ids: torch.Tensor) -> None:
        self.bare.step(pixels, ids)

    def finish(self) -> int:
        kept = sum(t.numel() * t.element_size() for ts in self.maxima.values() for t in ts)
        kept += sum(t.numel() * t.element_size() for t in self.embeddings)
        for chunks in self.maxima.values():
            torch.topk(torch.cat(chunks).t(), self.k, dim=1)
            chunks.clear()
        self.embeddings.clear()
        return kept


def make_model(name: str, device: torch.device) -> nn.Module:
    return torchvision.models.get_model(name, weights=None).eval().to(device)


def make_variant(kind: str, model: nn.Module, device: torch.device, channels: dict[str, int], k: int,  # noqa: ANN201
                 images: int, args: argparse.Namespace):
    if kind == "forward":
        return Bare(model, device)
    if kind == "actindex":
        return Ours(model, device, channels, k, images, args.classes, args.bottom_k, args.patch_layer,
                    args.patch_dim)
    return Naive(model, device, list(channels), k)


def batches(n_batches: int, batch_size: int, size: int, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for b in range(n_batches):
        pixels = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator)
        ids = torch.arange(b * batch_size, (b + 1) * batch_size)
        if device.type == "cuda":  # as the build's DataLoader(pin_memory=True) delivers them
            pixels, ids = pixels.pin_memory(), ids.pin_memory()
        out.append((pixels, ids))
    return out


def throughput(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    model = make_model(args.model, device)
    geometry = resolve_layers(model, args.layers.split(","), args.input_size, device)
    channels = {name: g.channels for name, g in geometry.items()}
    data = batches(args.batches, args.batch_size, args.input_size, device)
    images = args.batches * args.batch_size
    if args.patch_layer:
        if args.patch_layer not in geometry:
            raise SystemExit(f"--patch-layer must be one of --layers ({args.layers})")
        shape = geometry[args.patch_layer]
        args.patch_dim = shape.channels * shape.height * shape.width
    variants = {kind: make_variant(kind, model, device, channels, args.k, images, args)
                for kind in ("forward", "actindex")}
    if args.classes or args.bottom_k or args.patch_layer:  # what the optional parts cost, in the same rounds
        variants["actindex-plain"] = Ours(model, device, channels, args.k, images)
    # The naive variant's hooks stay registered for its lifetime, so it gets its own copy of the model.
    variants["naive"] = make_variant("naive", make_model(args.model, device), device, channels, args.k, images, args)
    times: dict[str, list[float]] = {kind: [] for kind in variants}
    for round_ in range(args.rounds + 1):  # round 0 warms up (cudnn autotuning, allocator)
        for kind in variants:
            variant = variants[kind]
            sync(device)
            start = time.perf_counter()
            for pixels, ids in data:
                variant.step(pixels, ids)
            variant.finish()
            sync(device)
            if round_:
                times[kind].append(time.perf_counter() - start)
    return {kind: images / statistics.median(t) for kind, t in times.items()}


def child_memory(args: argparse.Namespace, kind: str, n_images: int) -> dict[str, float]:
    """Run one variant over n_images in a fresh process; report its peak memory."""
    command = [sys.executable, __file__, "--child", kind, "--child-images", str(n_images), "--model", args.model,
               "--layers", args.layers, "--batch-size", str(args.batch_size), "--input-size",
               str(args.input_size), "--device", args.device, "--k", str(args.k), "--classes", str(args.classes),
               "--bottom-k", str(args.bottom_k)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's own peak RSS. Not ru_maxrss: Linux carries the parent's peak across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best effort


def run_child(args: argparse.Namespace, device: torch.device) -> None:
    model = make_model(args.model, device)
    geometry = resolve_layers(model, args.layers.split(","), args.input_size, device)
    channels = {name: g.channels for name, g in geometry.items()}
    variant = make_variant(args.child, model, device, channels, args.k, args.child_images, args)
    pixels = torch.randint(0, 256, (args.batch_size, 3, args.input_size, args.input_size), dtype=torch.uint8)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for b in range(args.child_images // args.batch_size):
        variant.step(pixels, torch.arange(b * args.batch_size, (b + 1) * args.batch_size))
    kept = variant.finish()
    sync(device)
    result = {"peak_rss_mb": peak_rss_mb(), "kept_bytes": kept}
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(result))


def end_to_end(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """build_index on a JPEG folder vs a plain ImageFolder + DataLoader + model loop."""
    from PIL import Image
    from torchvision import transforms

    from actindex.indexer.build import BuildConfig, build_index

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        rng = np.random.default_rng(0)
        for i in range(args.jpegs):
            folder = root / f"class{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)  # smooth content: realistic JPEG sizes
            Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC).save(folder / f"{i:05d}.jpg",
                                                                                   quality=90)
        model = make_model(args.model, device)
        preprocess = transforms.Compose([
            transforms.Resize(round(args.input_size * 256 / 224)), transforms.CenterCrop(args.input_size),
            transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        dataset = torchvision.datasets.ImageFolder(str(root), transform=preprocess)
        times: dict[str, list[float]] = {"plain loop": [], "actindex build": []}
        for round_ in range(3):
            start = time.perf_counter()
            loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                                 pin_memory=device.type == "cuda")
            with torch.inference_mode():
                for x, _ in loader:
                    model(x.to(device, non_blocking=True))
            sync(device)
            times["plain loop"].append(time.perf_counter() - start)
            start = time.perf_counter()
            build_index(BuildConfig(data=root, model=args.model, out=Path(tmp) / "index.h5",
                                    layers=tuple(args.layers.split(",")), k=args.k, input_size=args.input_size,
                                    batch_size=args.batch_size, workers=args.workers, device=args.device,
                                    overwrite=True))
            times["actindex build"].append(time.perf_counter() - start)
            if round_ == 0:  # warm-up: page cache, cudnn
                times = {kind: [] for kind in times}
        return {kind: args.jpegs / statistics.median(t) for kind, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--layers", default=LAYERS)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4, help="in-memory batches per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=9)
    parser.add_argument("--classes", type=int, default=1000, help="per-class sums over this many classes (0: none)")
    parser.add_argument("--bottom-k", type=int, default=0, help="also keep the lowest k per unit")
    parser.add_argument("--patch-layer", default="", help="also write this layer's patch vectors (one of --layers)")
    parser.set_defaults(patch_dim=0)  # H * W * C of --patch-layer, set once its shape is traced
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-images", type=int, default=64, help="N for the memory runs (N and 10·N)")
    parser.add_argument("--jpegs", type=int, default=128, help="images in the end-to-end folder (0: skip)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-images", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.child:
        run_child(args, device)
        return

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.model} at {args.input_size} px, layers {args.layers}, batch {args.batch_size}, on {name}, "
          f"torch {torch.__version__}; class sums over {args.classes} classes, bottom-k {args.bottom_k}, "
          f"patch layer {args.patch_layer or 'none'}")
    speed = throughput(args, device)
    print("\nthroughput (images/s, median of interleaved rounds):")
    for kind, value in speed.items():
        print(f"  {kind:<10} {value:9.1f}")
    print(f"  ratio actindex/forward = {speed['actindex'] / speed['forward']:.3f}   (target >= 0.95)")
    print(f"  ratio actindex/naive   = {speed['actindex'] / speed['naive']:.3f}")
    if "actindex-plain" in speed:
        print(f"  ratio actindex-plain/forward = {speed['actindex-plain'] / speed['forward']:.3f}   (without class "
              f"sums, bottom-k and patch vectors: their cost is the difference)")
    figures: dict[str, object] = {"device": name, "throughput": speed}

    print(f"\npeak memory at N = {args.memory_images} and 10·N = {10 * args.memory_images} images:")
    memory = {}
    for kind in ("actindex", "naive"):
        for n in (args.memory_images, 10 * args.memory_images):
            m = child_memory(args, kind, n)
            memory[f"{kind}@{n}"] = m
            cuda = f", peak CUDA {m['peak_cuda_mb']:8.1f} MB" if "peak_cuda_mb" in m else ""
            print(f"  {kind:<8} N={n:<6} peak RSS {m['peak_rss_mb']:8.1f} MB{cuda}, "
                  f"kept state {m['kept_bytes'] / 2**20:8.3f} MB")
    figures["memory"] = memory

    if args.jpegs:
        e2e = end_to_end(args, device)
        print(f"\nend to end on {args.jpegs} JPEGs (500x375), {args.workers} workers (images/s):")
        for kind, value in e2e.items():
            print(f"  {kind:<15} {value:9.1f}")
        print(f"  ratio actindex build / plain loop = {e2e['actindex build'] / e2e['plain loop']:.3f}")
        figures["end_to_end"] = e2e
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
