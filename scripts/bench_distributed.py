"""What running as several processes and checkpointing cost, as fractions of the build time.

Side by side in one run, on the same folder of generated JPEGs and the same model (resnet18 by default):
  1 process,  checkpoints only at the end of the shard              (the baseline)
  1 process,  a checkpoint every --every images                     -> checkpoint cost
  P processes under torchrun (gloo on cpu, nccl on cuda), same      -> gather + merge cost, final write cost
Every build runs in a fresh child process; rank 0 reports `BuildSummary.timings` as JSON. The three variants
run interleaved for --rounds rounds and each figure is the median. All indexes are compared with the
baseline's and must be identical, dataset for dataset.

Then, at ImageNet scale without the images:
  merge   folding 8 ranks' top-k states of resnet50's four stages (3840 channels, k = 9) into one;
  copy    rank 0's final copy of embedding rows into the HDF5 file, in MB/s, and what it means for
          1.28M images x 2048 floats (10.5 GB).

    python scripts/bench_distributed.py                          # cpu, gloo, 2 processes
    python scripts/bench_distributed.py --device cuda --processes 8 --images 20000 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

from actindex.indexer.build import BuildConfig, build_index
from actindex.indexer.rows import RowFile
from actindex.kernels.topk import RunningTopK


def make_jpegs(root: Path, n: int, size: int = 160) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:06d}.jpg")


def child(spec: dict, report: Path) -> None:
    """Run one build (as one rank of a torchrun job, or alone); rank 0 writes its summary."""
    config = BuildConfig(**{**spec, "data": Path(spec["data"]), "out": Path(spec["out"])})
    summary = build_index(config)
    if summary.rank == 0:
        report.write_text(json.dumps({"seconds": summary.seconds, "timings": summary.timings,
                                      "world_size": summary.world_size}))


def run_build(spec: dict, processes: int, folder: Path, name: str) -> dict:
    spec = {**spec, "out": str(folder / f"{name}.h5")}
    report = folder / f"{name}.json"
    command = [sys.executable, __file__, "--child", json.dumps(spec), "--report", str(report)]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   *command[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return {**json.loads(report.read_text()), "out": spec["out"]}


def median_run(results: list[dict]) -> dict:
    """Median build time, and each stage's median."""
    middle = sorted(results, key=lambda r: r["seconds"])[len(results) // 2]
    timings = {key: float(np.median([r["timings"][key] for r in results])) for key in middle["timings"]}
    return {**middle, "timings": timings}


def same_index(a: str, b: str) -> bool:
    def datasets(path: str) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        with h5py.File(path) as f:
            f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
        return out

    x, y = datasets(a), datasets(b)
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k], equal_nan=x[k].dtype.kind == "f") for k in x)


def merge_at_scale(device: torch.device, ranks: int = 8, channels: int = 3840, k: int = 9) -> float:
    """Seconds to fold `ranks` top-k states of `channels` units into one (median of 5)."""
    generator = torch.Generator().manual_seed(0)
    states = []
    for rank in range(ranks):
        topk = RunningTopK(channels, k, device)
        ids = torch.arange(rank * 1000, rank * 1000 + 256)
        topk.add(torch.randn(256, channels, generator=generator).to(device), ids.to(device),
                 torch.zeros(256, channels, dtype=torch.int64, device=device))
        states.append(topk.state_dict())
    times = []
    for _ in range(5):
        merged = RunningTopK(channels, k, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for state in states:
            other = RunningTopK(channels, k, device)
            other.load_state_dict(state)
            merged.merge(other)
        merged.result()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[2]


def copy_rate(folder: Path, rows: int = 65_536, dim: int = 1024) -> float:
    """MB/s of the final copy: a rank's row file into an HDF5 dataset, as `_Build._copy_rows` does."""
    path = folder / "rows"
    source = RowFile(path, 0, rows, dim)
    block = np.random.default_rng(0).standard_normal((4096, dim)).astype(np.float32)
    for start in range(0, rows, 4096):
        source[start:start + 4096] = block
    source.sync()
    start_time = time.perf_counter()
    with h5py.File(folder / "copy.h5", "w") as h5:
        dataset = h5.create_dataset("e", (rows, dim), np.float32, chunks=(256, dim))
        step = (32 << 20) // (4 * dim)
        for start in range(0, rows, step):
            dataset[start:start + step] = source.read(start, min(start + step, rows))
    seconds = time.perf_counter() - start_time
    source.close()
    return rows * dim * 4 / seconds / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--every", type=int, default=64, help="images per process between checkpoints")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child), args.report)
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_jpegs(folder / "data", args.images)
        spec = {"data": str(folder / "data"), "model": args.model, "k": 9, "input_size": args.input_size,
                "batch_size": args.batch_size, "workers": args.workers, "device": args.device}
        print(f"{args.model}, {args.images} images at {args.input_size} px, batch {args.batch_size}, "
              f"device {args.device}, torch {torch.__version__}, {os.cpu_count()} cores")
        variants = {"1 process, no checkpoints": (0, 1, "base"),
                    f"1 process, checkpoint every {args.every}": (args.every, 1, "ckpt"),
                    f"{args.processes} processes, checkpoint every {args.every}": (args.every, args.processes,
                                                                                  "multi")}
        rounds: dict[str, list[dict]] = {label: [] for label in variants}
        for index in range(args.rounds):
            for label, (every, processes, name) in variants.items():
                rounds[label].append(run_build({**spec, "checkpoint_every": every}, processes, folder,
                                               f"{name}{index}"))
        runs = {label: median_run(results) for label, results in rounds.items()}
        identical = all(same_index(run["out"], rounds["1 process, no checkpoints"][0]["out"])
                        for results in rounds.values() for run in results)
        base = runs["1 process, no checkpoints"]
        print(f"medians of {args.rounds} rounds; stages as fractions of the build time")
        print(f"{'':<38} {'build s':>8} {'img/s':>7} {'stream':>7} {'ckpt':>7} {'merge':>7} {'write':>7}")
        for label, run in runs.items():
            t, s = run["timings"], run["seconds"]
            print(f"{label:<38} {s:8.2f} {args.images / s:7.1f} {t['stream'] / s:7.1%} {t['checkpoint'] / s:7.1%} "
                  f"{t['merge'] / s:7.1%} {t['write'] / s:7.1%}")
        print(f"all {args.rounds * len(variants)} indexes identical to the first: {identical}")
        ckpt = runs[f"1 process, checkpoint every {args.every}"]
        print(f"checkpointing every {args.every} images: {ckpt['timings']['checkpoint'] / ckpt['seconds']:.2%} "
              f"of the build; build time ratio against no checkpoints {ckpt['seconds'] / base['seconds']:.3f}")
        multi = runs[f"{args.processes} processes, checkpoint every {args.every}"]
        print(f"{args.processes} processes: gather + merge {multi['timings']['merge'] * 1e3:.1f} ms "
              f"({multi['timings']['merge'] / multi['seconds']:.2%} of the build), final write "
              f"{multi['timings']['write'] / multi['seconds']:.2%}; speed-up over 1 process "
              f"{base['seconds'] / multi['seconds']:.2f}x (on {os.cpu_count()} cores)")

        device = torch.device(args.device if args.device != "cuda" else "cuda:0")
        seconds = merge_at_scale(device)
        print(f"at ImageNet scale: merging 8 ranks' top-k of resnet50's 4 stages (3840 units, k=9) takes "
              f"{seconds * 1e3:.1f} ms on {device.type}")
        rate = copy_rate(folder)
        print(f"embedding copy into HDF5: {rate:.0f} MB/s, i.e. {10.5e9 / rate / 1e6:.0f} s for ImageNet's "
              "1.28M x 2048 floats (10.5 GB)")


if __name__ == "__main__":
    main()
