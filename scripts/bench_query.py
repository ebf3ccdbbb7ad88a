"""The neuron query's speed: end to end, and its attribution step against an established library.

Side by side in one run, on the same index, model and hits:
  query     `query_neuron` end to end (read the index, load and check 9 images, model, both maps) and the
            PNG, as `actindex neuron` does, without the process start;
  ours      the attribution step alone: plain gradient and guided backprop of the unit for all 9 hits, one
            batched backward each (`actindex.query.neuron.attribute`);
  captum    captum's `NeuronGuidedBackprop` + `NeuronGradient`, called once per hit, as a loop over images
            would (the usual way, since each hit has its own position).
Each is timed over --rounds interleaved rounds; medians are reported with the ratio captum / ours.

    python scripts/bench_query.py            # resnet18, 224 px, layer3, 9 hits, cpu
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from actindex.indexer.build import BuildConfig, build_index
from actindex.indexer.images import Normalize
from actindex.indexer.index_file import IndexReader
from actindex.indexer.models import IMAGENET_MEAN, IMAGENET_STD
from actindex.query.attribution import attribute
from actindex.query.loading import load_index_model
from actindex.query.neuron import query_neuron
from actindex.query.render import neuron_sheet, save_png


def make_jpegs(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((500, 375), Image.Resampling.BICUBIC).save(folder / f"{i:04d}.jpg")


def captum_loop(model: torch.nn.Module, layer: str, unit: int, x: torch.Tensor, ys: torch.Tensor,
                xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from captum.attr import NeuronGradient, NeuronGuidedBackprop

    warnings.filterwarnings("ignore", module="captum")  # it warns on every call that hooks are set and removed
    module = dict(model.named_modules())[layer]
    guided = NeuronGuidedBackprop(model, module)
    gradient = NeuronGradient(model, module)
    g, p = [], []
    for b in range(x.shape[0]):
        selector = (unit, int(ys[b]), int(xs[b]))
        g.append(guided.attribute(x[b:b + 1], neuron_selector=selector))
        p.append(gradient.attribute(x[b:b + 1], neuron_selector=selector))
    return torch.cat(g), torch.cat(p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--layer", default="layer3")
    parser.add_argument("--unit", type=int, default=17)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_jpegs(folder / "data", args.images)
        index = folder / "index.h5"
        build_index(BuildConfig(data=folder / "data", model=args.model, out=index, layers=(args.layer,), k=9,
                                batch_size=32, workers=1, device=args.device, embed_layer=""))
        first = query_neuron(index, args.layer, args.unit, device=args.device)
        with IndexReader(index) as reader:
            model = load_index_model(reader.info, None, args.device).module
        x = Normalize(IMAGENET_MEAN, IMAGENET_STD, args.device)(torch.stack([image.pixels for image in first.images]))
        ys = torch.tensor([h.y for h in first.hits])
        xs = torch.tensor([h.x for h in first.hits])

        ours = attribute(model, args.layer, args.unit, x, ys, xs)
        theirs_guided, theirs_gradient = captum_loop(model, args.layer, args.unit, x, ys, xs)
        times: dict[str, list[float]] = {"query": [], "ours": [], "captum": []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            result = query_neuron(index, args.layer, args.unit, device=args.device)
            save_png(neuron_sheet(result), folder / "unit.png")
            times["query"].append(time.perf_counter() - start)
            start = time.perf_counter()
            attribute(model, args.layer, args.unit, x, ys, xs)
            times["ours"].append(time.perf_counter() - start)
            start = time.perf_counter()
            captum_loop(model, args.layer, args.unit, x, ys, xs)
            times["captum"].append(time.perf_counter() - start)
    median = {key: statistics.median(values) for key, values in times.items()}
    print(f"{args.model}, {args.layer} unit {args.unit}, {len(first.hits)} hits at 224 px, {args.device}, "
          f"torch {torch.__version__}, medians of {args.rounds} rounds")
    print(f"  neuron query end to end (index, 9 images checked, both maps, PNG): {median['query'] * 1e3:8.1f} ms")
    print(f"  attribution, actindex (one batched backward per method):           {median['ours'] * 1e3:8.1f} ms")
    print(f"  attribution, captum loop (9 x NeuronGuidedBackprop + NeuronGradient): "
          f"{median['captum'] * 1e3:8.1f} ms")
    print(f"  ratio captum / actindex = {median['captum'] / median['ours']:.2f}")
    print(f"  max |actindex - captum|: gradient {float((ours.gradient - theirs_gradient).abs().max()):.2e}, "
          f"guided {float((ours.guided - theirs_guided).abs().max()):.2e} (resnet18's ReLUs are all nn.ReLU "
          "modules, which captum's hooks do see)")


if __name__ == "__main__":
    main()
