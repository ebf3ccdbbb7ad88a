"""Decoders and precisions, side by side in one run: what they cost and what they change.

Every mode works on one folder of ImageNet-like JPEGs: crops of the demo's photos (scikit-image's) resized to
500x375 or 375x500 and saved at quality 90, the size and quality of ImageNet's median photo.

  decode    images per second per core (one process, one thread) of the exact path (pil: Pillow decode +
            resize) and of turbo (libjpeg-turbo + torch's antialiased resize), with the largest and mean pixel
            difference; the same on 3000x2000 and 4000x3000 photos, and JPEG draft mode (DCT-domain
            downscaling in Pillow) measured beside them, which actindex leaves out (docs/BENCHMARKS.md).
  fidelity  for a network, every unit's per-image scores over the folder under each decoder and precision,
            against today's exact path (pil, fp32, contiguous memory): how many top-9 entries change, and the
            largest score difference relative to the unit's top score (the activation check's measure).
            Models: the demo's EfficientNet-Lite0 (its packaged weights) and resnet50 (random weights).
  e2e       for resnet18, resnet50 and the demo network at fp32 and bf16: the bare forward pass on preloaded
            tensors, today's build (--decoder pil), and the build with the fast decoder (gpu on CUDA, turbo on
            the CPU), in images/s, with ratios.

    python scripts/bench_decode.py decode
    python scripts/bench_decode.py fidelity --images 1000
    python scripts/bench_decode.py e2e --images 256                       # the CPU here
    python scripts/bench_decode.py e2e --device cuda --images 4000 --batch-size 256 --workers 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from actindex.indexer import jpeg
from actindex.indexer.build import BuildConfig, build_index
from actindex.indexer.choices import Decoder, Precision
from actindex.indexer.decode import network_input, resize_crop, worker_input
from actindex.indexer.images import DEFAULT_MAX_PIXELS, Normalize, crop_geometry, load_rgb, preprocess, scan_folder
from actindex.indexer.loader import DeviceDecode, collate
from actindex.indexer.models import LoadedModel, load_model
from actindex.indexer.precision import Numerics, choose_numerics
from actindex.indexer.taps import tapped
from actindex.kernels.spatial import spatial_max
from actindex.query.demo import LAYERS as DEMO_LAYERS
from actindex.query.demo import MODEL as DEMO_MODEL
from actindex.query.demo import PHOTOS, demo_weights, photo

SIZE = 224


# ------------------------------------------------------------------------------------------------ the folder


def _colour_photos() -> list[Image.Image]:
    out = []
    for name in PHOTOS:
        array = photo(name)
        if array.ndim == 3 and array.shape[2] == 3 and min(array.shape[:2]) >= 300:
            out.append(Image.fromarray(array))
    return out


def make_folder(root: Path, n: int, seed: int = 0) -> Path:
    """n JPEGs of about 500x375 (a quarter portrait), quality 90, in 10 class folders under root/jpegs-N-SEED;
    made once."""
    root = root / f"jpegs-{n}-{seed}"
    marker = root / ".complete"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    photos = _colour_photos()
    for i in range(n):
        im = photos[int(rng.integers(len(photos)))]
        width, height = (375, 500) if rng.random() < 0.25 else (500, 375)
        scale = float(rng.uniform(0.5, 1.0))
        w = max(64, int(min(im.width, im.height * width / height) * scale))
        h = max(64, int(w * height / width))
        x0, y0 = int(rng.integers(0, im.width - w + 1)), int(rng.integers(0, max(1, im.height - h + 1)))
        crop = im.crop((x0, y0, x0 + w, y0 + h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.resize((width, height), Image.Resampling.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    marker.touch()
    return root


def large_photo(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A camera-sized JPEG with real detail at its own scale: a mosaic of the photos at native resolution."""
    rng = np.random.default_rng(seed)
    photos = [np.asarray(p) for p in _colour_photos()]
    canvas = np.zeros((height, width, 3), dtype=np.uint8)  # (H, W, 3)
    y = 0
    while y < height:
        x, row = 0, 0
        while x < width:
            p = photos[int(rng.integers(len(photos)))]
            h, w = min(p.shape[0], height - y), min(p.shape[1], width - x)
            canvas[y:y + h, x:x + w] = p[:h, :w]
            x, row = x + p.shape[1], max(row, p.shape[0])
        y += row
    Image.fromarray(canvas).save(path, quality=90)
    return path


# ------------------------------------------------------------------------------------------------ decode


def draft_input(path: Path, margin: float) -> torch.Tensor:
    """Pillow's draft mode asked for `margin` times the resize target, then the torch resize: measured only."""
    with Image.open(path) as im:
        g = crop_geometry(im.width, im.height, SIZE)
        im.draft("RGB", (int(g.resized_width * margin), int(g.resized_height * margin)))
        pixels = torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1)  # (3, h, w)
    return resize_crop(pixels, g)


def timed(files: list[Path], make: Callable[[Path], torch.Tensor], rounds: int = 3) -> float:
    """Images per second, the median of `rounds` passes over `files` (after one warm-up pass)."""
    times = []
    for round_ in range(rounds + 1):
        start = time.perf_counter()
        for path in files:
            make(path)
        if round_:
            times.append(time.perf_counter() - start)
    return len(files) / statistics.median(times)


def pixel_difference(files: list[Path], make: Callable[[Path], torch.Tensor]) -> tuple[int, float]:
    """The largest and the mean |make - pil| over all pixels of `files`, in levels."""
    worst, total, count = 0, 0.0, 0
    for path in files:
        diff = (make(path).int() - preprocess(load_rgb(path), SIZE).int()).abs()
        worst, total, count = max(worst, int(diff.max())), total + float(diff.sum()), count + diff.numel()
    return worst, total / count


def decode_mode(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    root = make_folder(args.root, args.images)
    files = [root / p for p in scan_folder(root).paths]
    print(f"decode: one process, one thread, {len(files)} JPEGs of 500x375 (q90) to {SIZE} px; "
          f"JPEG backend {jpeg.backend()}")
    pil = lambda p: preprocess(load_rgb(p), SIZE)  # noqa: E731
    turbo = lambda p: network_input(p, SIZE, DEFAULT_MAX_PIXELS, Decoder.TURBO)  # noqa: E731
    rows = [("pil (today)", pil), ("turbo", turbo)]
    speeds = {name: timed(files, make) for name, make in rows}
    for name, make in rows:
        worst, mean = pixel_difference(files, make)
        print(f"  {name:<12} {speeds[name]:8.1f} images/s/core   max |diff| {worst} levels, mean {mean:.4f}")
    print(f"  turbo / pil = {speeds['turbo'] / speeds['pil (today)']:.2f}x")
    with tempfile.TemporaryDirectory() as tmp:
        for width, height in ((3000, 2000), (4000, 3000)):
            big = [large_photo(Path(tmp) / f"big{i}.jpg", width, height, seed=i) for i in range(4)]
            variants = rows + [(f"draft {m:g}x", lambda p, m=m: draft_input(p, m)) for m in (1.0, 2.0)]
            print(f"  {width}x{height} photos (q90, {len(big)} of them):")
            base = timed(big, pil, rounds=2)
            for name, make in variants:
                speed = base if name.startswith("pil") else timed(big, make, rounds=2)
                worst, mean = pixel_difference(big, make)
                print(f"    {name:<12} {speed:7.2f} images/s/core ({speed / base:4.2f}x)   max |diff| {worst:2d} "
                      f"levels, mean {mean:.3f}")


# ------------------------------------------------------------------------------------------------ fidelity


def decode_all(files: list[Path], decoder: Decoder, device: torch.device, batch_size: int) -> list[torch.Tensor]:
    """The (3, S, S) network inputs the build makes with `decoder` (gpu: in batches on `device`), on the CPU."""
    if decoder is not Decoder.GPU:
        return [network_input(p, SIZE, DEFAULT_MAX_PIXELS, decoder) for p in files]
    out: list[torch.Tensor] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        batch = collate([(i, worker_input(p, SIZE, DEFAULT_MAX_PIXELS, decoder), "") for i, p in enumerate(chunk)])
        done = DeviceDecode(device, DEFAULT_MAX_PIXELS)(batch)
        assert not done.skipped, done.skipped
        out += list(done.pixels.cpu())
    return out


def unit_scores(model: torch.nn.Module, layers: list[str], inputs: list[torch.Tensor], numerics: Numerics,
                mean: tuple[float, ...], std: tuple[float, ...], batch_size: int,
                device: torch.device) -> dict[str, np.ndarray]:
    """Per layer, the (N, C) float32 score of every unit on every image, as the build computes it."""
    normalize = Normalize(mean, std, device)
    found: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    numerics.prepare(model)
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            x = normalize(torch.stack(inputs[start:start + batch_size]))  # (B, 3, S, S)
            record = lambda name, out: found[name].append(spatial_max(out)[0].cpu())  # noqa: E731
            with tapped(model, layers, record), numerics.running(device):
                model(numerics.input(x))
    model.to(memory_format=torch.contiguous_format)
    return {name: torch.cat(chunks).numpy() for name, chunks in found.items()}


def compare(reference: dict[str, np.ndarray], other: dict[str, np.ndarray],
            k: int = 9) -> tuple[int, int, float, float]:
    """(top-k entries whose image changed, entries, largest |score - reference| / the unit's top score, and the
    99th percentile over units of each unit's largest such difference)."""
    changed = entries = 0
    per_unit: list[np.ndarray] = []
    for name, ref in reference.items():  # (N, C)
        got = other[name]
        # the index's order: score descending, then image id ascending (kernels.topk's tie rule)
        ref_top = np.lexsort((np.arange(ref.shape[0])[:, None].repeat(ref.shape[1], 1), -ref), axis=0)[:k]
        got_top = np.lexsort((np.arange(got.shape[0])[:, None].repeat(got.shape[1], 1), -got), axis=0)[:k]
        changed += int((ref_top != got_top).sum())
        entries += ref_top.size
        top = np.abs(ref).max(axis=0)  # (C,)
        per_unit.append((np.abs(got - ref) / np.maximum(top, 1e-12)).max(axis=0))
    units = np.concatenate(per_unit)
    return changed, entries, float(units.max()), float(np.percentile(units, 99))


def fidelity_mode(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    root = make_folder(args.root, args.images)
    files = [root / p for p in scan_folder(root).paths]
    cuda = device.type == "cuda"
    decoders = (Decoder.PIL, Decoder.TURBO, Decoder.GPU) if cuda else (Decoder.PIL, Decoder.TURBO)
    decoded = {decoder: decode_all(files, decoder, device, args.batch_size) for decoder in decoders}
    where = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"fidelity: {len(files)} JPEGs (500x375, q90), top-9 per unit, against pil / fp32 / contiguous; {where}, "
          f"torch {torch.__version__}, JPEG backend {jpeg.backend()}")
    settings = [(Decoder.PIL, Numerics(Precision.FP32, True)), (Decoder.TURBO, Numerics(Precision.FP32, False)),
                (Decoder.TURBO, Numerics(Precision.FP32, True)), (Decoder.PIL, Numerics(Precision.BF16, True)),
                (Decoder.TURBO, Numerics(Precision.BF16, True))]
    if cuda:
        settings += [(Decoder.GPU, Numerics(Precision.FP32, False))] + [
            (decoder, Numerics(precision, True)) for decoder in (Decoder.PIL, Decoder.GPU)
            for precision in (Precision.TF32, Precision.BF16, Precision.FP16)]
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(demo_weights(Path(tmp)))
        models = [("demo EfficientNet-Lite0", DEMO_MODEL, weights, list(DEMO_LAYERS)),
                  ("resnet50 (random)", "resnet50", None, ["layer1", "layer2", "layer3", "layer4", "fc"])]
        for label, spec, model_weights, layers in models:
            loaded = load_model(spec, model_weights, device)

            def scores(decoder: Decoder, numerics: Numerics, loaded: LoadedModel = loaded,
                       layers: list[str] = layers) -> dict[str, np.ndarray]:
                return unit_scores(loaded.module, layers, decoded[decoder], numerics, loaded.mean, loaded.std,
                                   args.batch_size, device)

            reference = scores(Decoder.PIL, Numerics(Precision.FP32, False))
            print(f"  {label}, layers {','.join(layers)}:")
            for decoder, numerics in settings:
                found = scores(decoder, numerics)
                changed, entries, worst, p99 = compare(reference, found)
                print(f"    {decoder.value:<6} {numerics.precision.value:<5} {numerics.memory_format:<14} "
                      f"top-9 entries changed {changed:5d} of {entries} ({100 * changed / entries:6.3f} %)   "
                      f"score difference / unit's top: largest {100 * worst:7.4f} %, p99 of units {100 * p99:7.4f} %")
                if decoder is Decoder.PIL:  # what a query's check sees: the same setting, another batch
                    again = unit_scores(loaded.module, layers, decoded[decoder], numerics, loaded.mean, loaded.std,
                                        9, device)
                    _, _, worst, p99 = compare(found, again)
                    allowed = 100 * numerics.precision.tolerance
                    print(f"      the same, recomputed in batches of 9 (a query's): largest {100 * worst:7.4f} %, "
                          f"p99 of units {100 * p99:7.4f} % (the check allows {allowed:g} %)")


# ------------------------------------------------------------------------------------------------ end to end


def e2e_mode(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    fast = Decoder.GPU if device.type == "cuda" else Decoder.TURBO
    root = make_folder(args.root, args.images)
    files = [root / p for p in scan_folder(root).paths]
    inputs = torch.stack([preprocess(load_rgb(p), SIZE) for p in files])  # (N, 3, S, S), decoded beforehand
    if device.type == "cuda":
        inputs = inputs.pin_memory()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"end to end on {name}: {len(files)} JPEGs (500x375, q90), batch {args.batch_size}, {args.workers} "
          f"decoding workers, torch {torch.__version__}, JPEG backend {jpeg.backend()}")
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(demo_weights(Path(tmp)))
        for spec, model_weights in (("resnet18", None), ("resnet50", None), (DEMO_MODEL, weights)):
            for precision in (Precision.FP32, Precision.BF16):
                speeds = e2e_row(args, root, inputs, spec, model_weights, precision, fast, Path(tmp) / "i.h5")
                short = "demo" if spec == DEMO_MODEL else spec
                figures = "   ".join(f"{label} {value:8.1f}" for label, value in speeds.items())
                print(f"  {short:<9} {precision.value}  images/s: {figures}   {fast.value}/forward "
                      f"{speeds[f'build {fast.value}'] / speeds['forward']:.2f}, {fast.value}/pil "
                      f"{speeds[f'build {fast.value}'] / speeds['build pil']:.2f}x")


def e2e_row(args: argparse.Namespace, root: Path, inputs: torch.Tensor, spec: str, weights: str | None,
            precision: Precision, fast: Decoder, out: Path) -> dict[str, float]:
    """Images/s of the bare forward pass on `inputs`, of today's build and of the build with `fast`."""
    device = torch.device(args.device)
    loaded = load_model(spec, weights, device)
    numerics = choose_numerics(precision, device, loaded.module, SIZE)
    normalize = Normalize(loaded.mean, loaded.std, device)

    def forward() -> None:
        with torch.inference_mode(), numerics.running(device):
            for start in range(0, len(inputs), args.batch_size):
                loaded.module(numerics.input(normalize(inputs[start:start + args.batch_size])))
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def build(decoder: Decoder) -> None:
        build_index(BuildConfig(data=root, model=spec, weights=weights, out=out, batch_size=args.batch_size,
                                workers=args.workers, device=args.device, overwrite=True, decoder=decoder,
                                precision=precision, faiss_factory="none"))

    speeds = {}
    for label, run in (("forward", forward), ("build pil", lambda: build(Decoder.PIL)),
                       (f"build {fast.value}", lambda: build(fast))):
        times = []
        for round_ in range(args.rounds + 1):  # round 0 warms up: page cache, cuDNN autotuning
            start = time.perf_counter()
            run()
            if round_:
                times.append(time.perf_counter() - start)
        speeds[label] = len(inputs) / statistics.median(times)
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("decode", "fidelity", "e2e"))
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "actindex-bench-jpegs",
                        help="where the JPEG folder is made (kept for the next run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    {"decode": decode_mode, "fidelity": fidelity_mode, "e2e": e2e_mode}[args.mode](args)


if __name__ == "__main__":
    main()
