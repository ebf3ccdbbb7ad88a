"""Does blur do what Yosinski et al. say? The demo network's dreams with the default blur and without it.

For each class, side by side in one run with the same seed: the logit reached, the probability the network
itself gives the class on the saved 8-bit image, and the share of spectral energy above a quarter of Nyquist
(`kernels.blur.high_frequency_energy`), with the ratio without/with blur. Offline: the demo's packaged weights.

    python scripts/bench_dream.py            # goldfinch (11) and espresso (967), 200 steps, 224 px, cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.models import ResNet18_Weights

from actindex.indexer.images import Normalize
from actindex.indexer.models import load_model
from actindex.kernels.blur import high_frequency_energy
from actindex.query.demo import MODEL, demo_weights
from actindex.query.dream import DreamConfig, dream

CATEGORIES = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]  # ImageNet's class names, shipped with torchvision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", default="11,967")
    parser.add_argument("--steps", type=int, default=DreamConfig().steps)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(MODEL, str(demo_weights(Path(tmp))), args.device)
    normalize = Normalize(loaded.mean, loaded.std, args.device)
    base = DreamConfig(objective="logit", steps=args.steps)
    print(f"{MODEL}, {args.steps} steps at {base.input_size} px, blur sigma {base.blur_sigma} every "
          f"{base.blur_every} steps, seed {base.seed}, {args.device}, torch {torch.__version__}")
    print(f"{'class':<22} {'blur':>5} {'logit':>15} {'P(class)':>9} {'top-1':>6} {'HF energy':>10} {'ms/step':>8}")
    for cls in (int(c) for c in args.classes.split(",")):
        energies = []
        for label, config in (("yes", base), ("no", dataclasses.replace(base, blur_every=0))):
            start = time.perf_counter()
            result = dream(loaded.module, None, cls, loaded.mean, loaded.std, config, args.device)
            seconds = time.perf_counter() - start
            pixels = torch.from_numpy(np.ascontiguousarray(result.image)).permute(2, 0, 1)[None]  # (1, 3, S, S)
            x = pixels.float().div(255)
            with torch.inference_mode():
                p = loaded.module(normalize(pixels)).softmax(1)[0]
            energy = float(high_frequency_energy(x)[0])
            energies.append(energy)
            name = f"{cls} {CATEGORIES[cls]}"
            print(f"{name:<22} {label:>5} {result.start_activation:6.2f} -> {result.activation:5.2f} "
                  f"{float(p[cls]):9.3f} {int(p.argmax()):6d} {energy:10.3f} {seconds / config.steps * 1e3:8.0f}")
        print(f"{'':<22} high-frequency energy without blur / with blur = {energies[1] / energies[0]:.2f}")


if __name__ == "__main__":
    main()
