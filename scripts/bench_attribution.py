"""The attribution methods: do their maps depend on the weights (Adebayo et al. 2018), and what do they cost.

    python scripts/bench_attribution.py sanity    # on the demo's index (run `make demo` first): real weights
    python scripts/bench_attribution.py time      # resnet18 (random weights), 9 hits, against Captum's loop

sanity: for a few units of three layers of the demo network (EfficientNet-Lite0, ImageNet weights), each
method's maps on the unit's top hits, then again with the weights up to the unit re-drawn in cascade, the unit's
own layer first (`actindex neuron --sanity`); prints the Spearman rank correlation with the trained maps after
each step, per method, averaged over the units of the layer (1: unchanged, 0: unrelated).

time: the attribution step alone for 9 hits of resnet18's layer3, per method: actindex (batched over the hits,
each with its own position) beside Captum's own class called once per hit (as a loop over images must, since
each hit has its own position); medians of interleaved rounds and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from actindex.indexer.images import Normalize
from actindex.query.attribution import Method, Settings, attribute_methods, occlusion_windows
from actindex.query.index import Index

SANITY_UNITS = {"blocks.2": ([21, 5], "blocks.1"), "blocks.4": ([45, 20], "blocks.2"),
                "conv_head": ([26, 300], "blocks.4")}


def sanity(args: argparse.Namespace) -> None:
    settings = Settings(tuple(Method), steps=args.ig_steps)
    print(f"sanity check on {args.index}: {args.k} hits a unit, {args.steps} cascade steps, integrated gradients "
          f"in {args.ig_steps} steps, seed 0; Spearman rank correlation with the trained network's maps")
    with Index(args.index, device="cpu") as index:
        for layer, (units, cam_layer) in SANITY_UNITS.items():
            config = Settings(settings.methods, cam_layer, settings.steps)
            start = time.perf_counter()
            rows: dict[Method, list[tuple[float, ...]]] = {m: [] for m in config.methods}
            for unit in units:
                from actindex.query.neuron import unit_hits

                result = unit_hits(index, layer, unit, args.k, settings=config, sanity=args.steps)
                assert result.sanity is not None
                for method, values in result.sanity.spearman.items():
                    rows[method].append(values)
                names = result.sanity.step_names()
            print(f"\n{layer}, units {', '.join(map(str, units))} (Grad-CAM from {cam_layer}); "
                  f"{time.perf_counter() - start:.0f} s")
            print("  steps: " + "; ".join(f"{i + 1}: {n}" for i, n in enumerate(names)))
            print(f"  {'method':<22}" + "".join(f"  step {i + 1}" for i in range(len(names))))
            for method, values in rows.items():
                mean = np.nanmean(np.array(values), axis=0)
                print(f"  {method.label:<22}" + "".join(f"  {v:6.2f}" for v in mean))


def captum_call(method: Method, model: nn.Module, layer: str, cam_layer: str, unit: int, x: torch.Tensor,
                y: int, xp: int, box: tuple[int, int, int, int], steps: int) -> torch.Tensor:
    """Captum's class for `method`, on one image."""
    from captum.attr import (
        InputXGradient,
        LayerAttribution,
        LayerGradCam,
        NeuronGradient,
        NeuronGuidedBackprop,
        NeuronIntegratedGradients,
        Occlusion,
    )

    modules = dict(model.named_modules())
    module = modules[layer]
    selector = (unit, y, xp)

    def unit_of(inputs: torch.Tensor) -> torch.Tensor:
        taken: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda m, i, o: taken.append(o))
        try:
            model(inputs)
        finally:
            handle.remove()
        return taken[0][:, unit, y, xp]

    if method is Method.GUIDED:
        return NeuronGuidedBackprop(model, module).attribute(x, neuron_selector=selector)
    if method is Method.GRADIENT:
        return NeuronGradient(model, module).attribute(x, neuron_selector=selector)
    if method is Method.GRADIENT_X_INPUT:
        return InputXGradient(unit_of).attribute(x.clone().requires_grad_(True))
    if method is Method.INTEGRATED_GRADIENTS:
        return NeuronIntegratedGradients(model, module).attribute(x, neuron_selector=selector, n_steps=steps,
                                                                  method="gausslegendre")
    if method is Method.GRAD_CAM:
        cam = LayerGradCam(unit_of, modules[cam_layer]).attribute(x, relu_attributions=True)
        return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")
    side, stride = _patch_and_stride(box, x.shape[-1])
    return Occlusion(unit_of).attribute(x, sliding_window_shapes=(3, side, side), strides=(3, stride, stride),
                                        baselines=0)


def _patch_and_stride(box: tuple[int, int, int, int], size: int) -> tuple[int, int]:
    """actindex's default occlusion patch and stride for `box`, for Captum to use the same."""
    windows = occlusion_windows(box, size, None, None)
    side = windows[0][2] - windows[0][0]
    return side, max(1, side // 2)


def timing(args: argparse.Namespace) -> None:
    sys_path = Path(__file__).resolve().parent
    import sys

    sys.path.insert(0, str(sys_path))
    from bench_query import make_jpegs

    from actindex.indexer.build import BuildConfig, build_index

    warnings.filterwarnings("ignore")  # captum warns on every call that it sets and removes hooks
    layer, cam_layer, unit = "layer3", "layer2", 17
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_jpegs(folder / "data", 64)
        build_index(BuildConfig(data=folder / "data", model="resnet18", out=folder / "index.h5", layers=(layer,),
                                k=9, batch_size=32, workers=1, device=args.device, embed_layer=""))
        with Index(folder / "index.h5", device=args.device) as index:
            hits = index.layer(layer)
            images = index.images([int(i) for i in hits.image[unit]])
            model = index.loaded.module
            info = index.info
    x = Normalize(info.mean, info.std, args.device)(torch.stack([image.pixels for image in images]))
    ys, xs = torch.tensor(hits.y[unit]), torch.tensor(hits.x[unit])
    boxes = [(int(a), int(b), int(c), int(d)) for a, b, c, d in hits.box[unit]]
    print(f"resnet18 (random weights), {layer} unit {unit}, {len(boxes)} hits at 224 px, {args.device} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}; integrated gradients in {args.ig_steps} "
          f"steps, Grad-CAM from {cam_layer}; medians of {args.rounds} rounds")
    print(f"  {'method':<22} {'actindex':>10} {'captum loop':>12} {'ratio':>7}  max |difference| / max |map|")
    for method in Method:
        settings = Settings((method,), cam_layer, args.ig_steps)

        def ours(method: Method = method, settings: Settings = settings) -> torch.Tensor:
            return attribute_methods(model, layer, unit, x, ys, xs, boxes, settings).maps[method]

        def theirs(method: Method = method) -> torch.Tensor:
            return torch.cat([captum_call(method, model, layer, cam_layer, unit, x[i:i + 1], int(ys[i]), int(xs[i]),
                                          boxes[i], args.ig_steps).detach() for i in range(len(boxes))])

        times: dict[str, list[float]] = {"ours": [], "captum": []}
        results: dict[str, torch.Tensor] = {}
        for _ in range(args.rounds):
            for name, run in (("ours", ours), ("captum", theirs)):
                start = time.perf_counter()
                results[name] = run()
                if x.is_cuda:
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
        a, b = statistics.median(times["ours"]), statistics.median(times["captum"])
        mine, other = results["ours"], results["captum"]
        if method is Method.OCCLUSION:  # captum slides over the whole image, actindex over each hit's box only
            ours_count = sum(len(occlusion_windows(box, x.shape[-1], None, None)) for box in boxes)
            whole = sum(len(occlusion_windows((0, 0, x.shape[-1], x.shape[-1]), x.shape[-1],
                                              *_patch_and_stride(box, x.shape[-1]))) for box in boxes)
            note = f"not comparable: Captum slides over the whole image ({whole} windows against {ours_count})"
        else:
            note = f"{float((mine - other).abs().max() / other.abs().max().clamp_min(1e-12)):.1e}"
        print(f"  {method.label:<22} {a * 1e3:8.0f} ms {b * 1e3:9.0f} ms {b / a:7.2f}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["sanity", "time"])
    parser.add_argument("--index", type=Path, default=Path("demo-output/index.h5"))
    parser.add_argument("--k", type=int, default=3, help="hits a unit (sanity)")
    parser.add_argument("--steps", type=int, default=5, help="cascade steps (sanity)")
    parser.add_argument("--ig-steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (time)")
    parser.add_argument("--device", default="cpu", help="for time")
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    runs: dict[str, Callable[[argparse.Namespace], None]] = {"sanity": sanity, "time": timing}
    runs[args.mode](args)


if __name__ == "__main__":
    main()
