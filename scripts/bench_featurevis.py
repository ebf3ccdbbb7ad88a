"""actindex's `dream` next to lucent's `render_vis`: the same objectives, steps, image size and seed.

Objectives on the demo network (timm:efficientnet_lite0 with the demo's packaged ImageNet weights, offline):
class logits (default 967 espresso, 11 goldfinch) and the spatial mean of one channel of an inner layer (default
blocks.4 channel 45, lucent's "blocks_4:45"). Methods: each entry of CONFIGS below (DreamConfig keyword
arguments; an entry whose keywords this DreamConfig does not accept yet is skipped with a note, except
parameterization="pixel", which a DreamConfig without that field does anyway) and lucent's
defaults: param.image(size, fft=True, decorrelate=True), transform.standard_transforms, Adam lr 0.05.

Per image, all measured by the same code for every method:
- objective: the logit, or the channel's mean over positions, of the network run on the final image, as floats
  ("float": dream's own value on its float image, the shared code on lucent's) and as the saved 8-bit PNG ("png");
- P(class): the network's softmax probability for the class on the 8-bit PNG (PIL round trip), and its top-1;
- HF energy: `kernels.blur.high_frequency_energy` of the PNG's [0, 1] pixels (share above a quarter of Nyquist);
- ms/step: wall time of the whole optimization divided by the steps.
One side-by-side PNG (rows = objectives, columns = methods) goes to --out.

lucent works in [0, 1] pixel space, so it gets the model behind a layer that applies the network's mean/std (its
own ImageNet `normalize` preprocessing is off); its layer names gain the wrapper's prefix ("net_blocks_4").
lucent draws from torch's, numpy's and Python's global RNGs: all three are seeded before each lucent render.
lucent puts its image on cuda:0 whenever CUDA is available, so use --device cuda (cuda:0) on a GPU machine.
Both methods run the network frozen (no weight gradients). lucent is not a dependency of actindex; install it with
    pip install --no-deps torch-lucent==0.1.8 kornia==0.4.1 decorator
(IPython, which lucent imports only to show images in notebooks, is stubbed here when missing).

    python scripts/bench_featurevis.py                       # 200 steps, 224 px, cpu, all methods
    python scripts/bench_featurevis.py --steps 50 --methods actindex-pixel,lucent
    python scripts/bench_featurevis.py --targets 967,blocks.4:45 --out /tmp/fv.png
    python scripts/bench_featurevis.py --model googlenet --weights IMAGENET1K_V1 --targets 967,inception4a:97
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import random
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from torchvision.models import ResNet18_Weights

from actindex.indexer.images import Normalize
from actindex.indexer.models import load_model
from actindex.indexer.taps import first_tensor, layer_value
from actindex.kernels.blur import high_frequency_energy
from actindex.kernels.errors import UserError
from actindex.kernels.freeze import frozen
from actindex.query.demo import MODEL, demo_weights
from actindex.query.dream import DreamConfig, dream
from actindex.query.render import font

# The actindex methods: name -> DreamConfig keyword arguments (objective, steps, input_size and seed are set per run).
CONFIGS: dict[str, dict[str, object]] = {
    "actindex-pixel": {"parameterization": "pixel"},  # Yosinski et al., actindex's method before the Fourier one
    "actindex": {},  # the defaults: lucid's Fourier parameterization
    "actindex-decay1.0": {"decay_power": 1.0},  # lucid's spectrum decay, to show why the default is 1.25
    "actindex-maco": {"parameterization": "maco"},  # Fel et al.'s phase-only optimization (--param maco)
}
# Keywords that name the only behaviour of a DreamConfig without that field: dropped there instead of skipping.
IMPLICIT = {("parameterization", "pixel")}
LUCENT = "lucent"
CATEGORIES = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]  # ImageNet's class names, shipped with torchvision


@dataclasses.dataclass(frozen=True)
class Target:
    layer: str | None  # None: the model's output (class logits)
    unit: int

    @property
    def label(self) -> str:
        return f"{self.unit} {CATEGORIES[self.unit]}" if self.layer is None else f"{self.layer}:{self.unit}"

    @property
    def objective(self) -> str:
        return "logit" if self.layer is None else "mean"


@dataclasses.dataclass
class Rendered:
    method: str
    target: Target
    float_value: float
    png: np.ndarray  # (S, S, 3) uint8, after the PNG round trip
    seconds: float
    steps: int


def parse_targets(text: str) -> list[Target]:
    """"967,11,blocks.4:45" -> logits 967 and 11, and channel 45 of blocks.4."""
    targets = []
    for item in text.split(","):
        layer, _, unit = item.strip().rpartition(":")
        targets.append(Target(layer or None, int(unit)))
    return targets


def import_lucent() -> types.ModuleType | None:
    """lucent.optvis, importable without IPython; None (with a note) when lucent or kornia is missing."""
    try:
        import IPython.display  # noqa: F401
    except ImportError:  # lucent.misc.io.showing imports it at import time, for notebooks only
        def unavailable(*_args: object, **_kwargs: object) -> None:
            raise RuntimeError("IPython is not installed (stubbed by bench_featurevis.py)")

        ipython, display = types.ModuleType("IPython"), types.ModuleType("IPython.display")
        display.display = display.HTML = unavailable  # type: ignore[attr-defined]
        ipython.display = display  # type: ignore[attr-defined]
        sys.modules.setdefault("IPython", ipython)
        sys.modules.setdefault("IPython.display", display)
    try:
        with warnings.catch_warnings():  # kornia 0.4.1 uses torch.jit.script at import (FutureWarning)
            warnings.simplefilter("ignore", FutureWarning)
            import lucent.optvis
            from lucent.optvis import objectives, param, render, transform  # noqa: F401
    except ImportError as error:
        print(f"note: skipping lucent ({error}); pip install --no-deps torch-lucent==0.1.8 kornia==0.4.1 decorator")
        return None
    return lucent.optvis


class Normalized(nn.Module):
    """The network behind its input normalization: lucent feeds [0, 1] pixels."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def png_round_trip(pixels: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8 -> the same read back from an 8-bit PNG."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    buffer.seek(0)
    return np.array(Image.open(buffer).convert("RGB"))


def objective_value(model: nn.Module, normalize: Normalize, target: Target, x01: torch.Tensor) -> float:
    """The objective of a (1, 3, S, S) [0, 1] image: the logit, or the channel's mean over positions."""
    x = (x01.to(normalize.device).float() - normalize.mean) / normalize.std
    with torch.inference_mode():
        if target.layer is None:
            return float(first_tensor(model(x))[0, target.unit])
        return float(layer_value(model, target.layer, x, reduce=lambda out: out[0, target.unit].mean()))


def render_actindex(model: nn.Module, loaded_mean: tuple[float, ...], loaded_std: tuple[float, ...], name: str,
                    target: Target, args: argparse.Namespace) -> Rendered:
    known = {field.name for field in dataclasses.fields(DreamConfig)}
    keywords = {key: value for key, value in CONFIGS[name].items() if key in known}
    config = DreamConfig(objective=target.objective, steps=args.steps, input_size=args.size, seed=args.seed,
                         **keywords)  # type: ignore[arg-type]
    start = time.perf_counter()
    result = dream(model, target.layer, target.unit, loaded_mean, loaded_std, config, args.device)
    seconds = time.perf_counter() - start
    return Rendered(name, target, result.activation, png_round_trip(result.image), seconds, args.steps)


def render_lucent(optvis: types.ModuleType, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                  target: Target, args: argparse.Namespace) -> tuple[Rendered, torch.Tensor]:
    """lucent's defaults; returns the result and lucent's float image (1, 3, S, S) in [0, 1]."""
    # render_vis hooks every module and never removes the hooks: give it a copy of the network each time
    wrapped = Normalized(copy.deepcopy(model), mean, std).to(args.device)
    layer = "net_classifier" if target.layer is None else "net_" + target.layer.replace(".", "_")
    from lucent.modelzoo.util import get_model_layers

    if layer not in get_model_layers(wrapped):
        raise UserError(f"lucent has no layer '{layer}'")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # lucent's jitter, scale and rotation draw from numpy's global RNG
    random.seed(args.seed)
    with frozen(wrapped), torch.enable_grad():
        start = time.perf_counter()
        images = optvis.render.render_vis(
            wrapped, f"{layer}:{target.unit}",  # objectives.channel: -mean over positions (a logit as it is)
            param_f=lambda: optvis.param.image(args.size, fft=True, decorrelate=True),
            optimizer=lambda params: torch.optim.Adam(params, lr=5e-2),
            transforms=optvis.transform.standard_transforms, thresholds=(args.steps,),
            preprocess=False, progress=False, show_image=False)
        seconds = time.perf_counter() - start
    x01 = torch.from_numpy(images[-1]).permute(0, 3, 1, 2).contiguous()  # (1, 3, S, S) float in [0, 1]
    pixels = (x01[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    rendered = Rendered(LUCENT, target, float("nan"), png_round_trip(pixels), seconds, args.steps)
    return rendered, x01


def side_by_side(grid: dict[tuple[str, Target], Rendered], methods: list[str], targets: list[Target],
                 stats: dict[tuple[str, Target], str], size: int) -> Image.Image:
    """Rows = targets, columns = methods; a header row of method names, a label column, a caption per cell."""
    gap, head, side, caption = 6, 24, 130, 18
    face, small = font(14), font(11)
    width = side + len(methods) * (size + gap)
    height = head + len(targets) * (size + caption + gap)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, method in enumerate(methods):
        draw.text((side + j * (size + gap) + 4, 4), method, fill=(0, 0, 0), font=face)
    for i, target in enumerate(targets):
        y = head + i * (size + caption + gap)
        draw.text((4, y + size // 2 - 10), target.label, fill=(0, 0, 0), font=face)
        for j, method in enumerate(methods):
            x = side + j * (size + gap)
            if (method, target) in grid:
                canvas.paste(Image.fromarray(grid[method, target].png), (x, y))
                draw.text((x + 2, y + size + 1), stats[method, target], fill=(60, 60, 60), font=small)
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="967,11,blocks.4:45",
                        help="comma-separated: a class index (logit) or layer:channel (spatial mean)")
    parser.add_argument("--methods", default=",".join([*CONFIGS, LUCENT]),
                        help=f"comma-separated, of: {', '.join([*CONFIGS, LUCENT])}")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=MODEL, help="any actindex model spec (torchvision name, timm:NAME, …); "
                                                       "default: the demo network with its packaged weights")
    parser.add_argument("--weights", help="with --model: its weights (torchvision enum, timm:NAME or a file)")
    parser.add_argument("--out", type=Path, default=Path("featurevis-side-by-side.png"))
    args = parser.parse_args()
    targets = parse_targets(args.targets)

    known = {field.name for field in dataclasses.fields(DreamConfig)}
    methods: list[str] = []
    optvis = None
    for name in (m.strip() for m in args.methods.split(",")):
        if name == LUCENT:
            optvis = import_lucent()
            if optvis is not None:
                methods.append(name)
        elif name not in CONFIGS:
            parser.error(f"unknown method '{name}'; choose from {', '.join([*CONFIGS, LUCENT])}")
        elif missing := sorted(key for key, value in CONFIGS[name].items()
                               if key not in known and (key, value) not in IMPLICIT):
            print(f"note: skipping {name}: DreamConfig has no field {', '.join(missing)} (yet)")
        else:
            methods.append(name)

    with tempfile.TemporaryDirectory() as tmp:
        weights = str(demo_weights(Path(tmp))) if args.model == MODEL and args.weights is None else args.weights
        loaded = load_model(args.model, weights, args.device)
    model, mean, std = loaded.module, tuple(loaded.mean), tuple(loaded.std)
    normalize = Normalize(mean, std, args.device)
    print(f"{args.model} ({weights or 'random init'}), {args.steps} steps at {args.size} px, seed {args.seed}, "
          f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'target':<18} {'method':<24} {'obj float':>9} {'obj png':>8} {'P(class)':>8} {'top-1':<20} "
          f"{'HF energy':>9} {'ms/step':>8}")
    grid: dict[tuple[str, Target], Rendered] = {}
    stats: dict[tuple[str, Target], str] = {}
    for target in targets:
        for method in methods:
            try:
                if method == LUCENT:
                    rendered, x01 = render_lucent(optvis, model, mean, std, target, args)  # type: ignore[arg-type]
                    rendered.float_value = objective_value(model, normalize, target, x01)
                else:
                    rendered = render_actindex(model, mean, std, method, target, args)
            except UserError as error:
                print(f"{target.label:<18} {method:<24} skipped: {error}")
                continue
            pixels = torch.from_numpy(np.ascontiguousarray(rendered.png)).permute(2, 0, 1)[None]  # (1, 3, S, S)
            x01 = pixels.float().div(255)
            png_value = objective_value(model, normalize, target, x01)
            with torch.inference_mode():
                p = first_tensor(model(normalize(pixels))).softmax(1)[0]
            top = int(p.argmax())
            energy = float(high_frequency_energy(x01)[0])
            prob = f"{float(p[target.unit]):8.3f}" if target.layer is None else f"{'-':>8}"
            top_label = f"{top} {CATEGORIES[top]}"[:20]
            print(f"{target.label:<18} {method:<24} {rendered.float_value:9.2f} {png_value:8.2f} {prob} "
                  f"{top_label:<20} {energy:9.3f} {rendered.seconds / rendered.steps * 1e3:8.0f}")
            grid[method, target] = rendered
            stats[method, target] = (f"obj {png_value:.2f}" + (f"  P {float(p[target.unit]):.2f}"
                                     if target.layer is None else f"  top-1 {top}") + f"  HF {energy:.3f}")
    side_by_side(grid, methods, targets, stats, args.size).save(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
