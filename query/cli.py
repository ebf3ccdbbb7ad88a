"""The `actindex` console script: the indexer's commands plus the query side's.

Command modules import torch only when a command runs, so `actindex --help` is instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from actindex.indexer.cli import COMMANDS, ActindexGroup, debug_option

if TYPE_CHECKING:  # the commands import what they run when they run, so that --help is instant
    from actindex.indexer.index_file import IndexInfo
    from actindex.indexer.models import LoadedModel


@click.command()
@click.option("--out", default="demo-output", show_default=True, type=click.Path(path_type=Path),
              help="Folder for the demo's weights, images and index.")
@click.option("--images-per-photo", default=16, show_default=True, type=int,
              help="Random crops, flips and scales made of each scikit-image photo.")
@click.option("--workers", default=2, show_default=True, type=int)
@click.option("--device", help="cpu, cuda or cuda:N. Default: cuda when present, else cpu.")
@click.option("--overwrite/--keep", default=True, show_default=True,
              help="Rebuild the demo index when it exists.")
def demo(out: Path, images_per_photo: int, workers: int, device: str | None, overwrite: bool) -> None:
    """The built-in default: index real photos with an ImageNet-trained EfficientNet-Lite0, offline."""
    from .demo import run_demo

    run_demo(out, images_per_photo=images_per_photo, workers=workers, device=device, overwrite=overwrite,
             echo=click.echo)


def _device(requested: str | None) -> str:
    from actindex.indexer.devices import resolve_device

    return str(resolve_device(requested))


@click.command()
@click.argument("index", type=click.Path(path_type=Path))
@click.option("--layer", required=True, help="Layer name, as listed by 'actindex info INDEX'.")
@click.option("--unit", required=True, type=int, help="Channel number in that layer.")
@click.option("--k", type=int, help="Hits to show. Default: all the index keeps.")
@click.option("--out", type=click.Path(path_type=Path),
              help="PNG to write. Default: LAYER-unitU.png here; with --json, none unless --out is given.")
@click.option("--context", is_flag=True, help="Also show each whole image with the patch's box.")
@click.option("--lowest", is_flag=True,
              help="The unit's lowest-scoring images instead (indexes built with --bottom-k): what suppresses it.")
@click.option("--methods", default="guided,gradient", show_default=True,
              help="Attribution maps, in order: guided, gradient, gradient-x-input, integrated-gradients, grad-cam, "
                   "occlusion.")
@click.option("--cam-layer", help="For grad-cam: the layer (running before the unit's) whose maps it weighs.")
@click.option("--ig-steps", default=32, show_default=True, type=int, help="Integrated gradients' steps.")
@click.option("--ig-baseline", type=click.Choice(["mean", "black"]), default="mean", show_default=True,
              help="Integrated gradients' start: the normalization's mean colour, or black.")
@click.option("--occlusion-patch", type=int, help="Occlusion's patch side in input pixels. Default: a sixth of "
                                                    "the receptive field's.")
@click.option("--occlusion-stride", type=int, help="Occlusion's step. Default: half the patch.")
@click.option("--sanity", is_flag=True, help="Re-run the methods with the weights up to the unit randomized in "
                                             "cascade (Adebayo et al. 2018) and report how much each map changes.")
@click.option("--sanity-steps", default=5, show_default=True, type=int, help="Steps of the cascade.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random weights.")
@click.option("--json", "as_json", is_flag=True, help="Print the hits and output paths as JSON.")
@click.option("--save-maps", type=click.Path(path_type=Path),
              help="Write the per-hit attribution and activation maps (and masks) to this .npz.")
@click.option("--data-root", type=click.Path(path_type=Path), help="Where the images are now, if they moved.")
@click.option("--weights", help="Where the index's weights file is now, if it moved (same contents).")
@click.option("--device", help="cpu, cuda or cuda:N. Default: cuda when present, else cpu.")
def neuron(index: Path, layer: str, unit: int, k: int | None, out: Path | None, context: bool, lowest: bool,
           methods: str, cam_layer: str | None, ig_steps: int, ig_baseline: str, occlusion_patch: int | None,
           occlusion_stride: int | None, sanity: bool, sanity_steps: int, seed: int, as_json: bool,
           save_maps: Path | None, data_root: Path | None, weights: str | None, device: str | None) -> None:
    """A unit's top image patches, with attribution maps of each (guided backprop and gradient by default)."""
    from actindex.kernels.errors import UserError

    from .attribution import Baseline, Settings, parse_methods
    from .neuron import describe_unguided, query_neuron
    from .neuron import save_maps as write_maps
    from .unit import profile_lines

    if sanity and sanity_steps < 1:
        raise UserError(f"--sanity-steps must be at least 1, got {sanity_steps}")
    settings = Settings(parse_methods(methods), cam_layer, ig_steps, Baseline(ig_baseline), occlusion_patch,
                        occlusion_stride)
    result = query_neuron(index, layer, unit, k=k, data=data_root, weights=weights, device=_device(device),
                          lowest=lowest, settings=settings, sanity=sanity_steps if sanity else 0, seed=seed)
    out = _picture_path(out, as_json, f"{layer}-unit{unit}{'-lowest' if lowest else ''}.png")
    if out is not None:
        from .render import neuron_sheet, save_png

        save_png(neuron_sheet(result, context=context), out)
    if save_maps is not None:
        write_maps(result, save_maps)
    if result.unguided:
        click.echo(f"Note: {describe_unguided(result.unguided)}", err=True)
    if as_json:
        click.echo(json.dumps({**result.to_json(), "outputs": {"image": str(out) if out else None,
                                                               "maps": str(save_maps) if save_maps else None}},
                              indent=2))
        return
    which = "lowest-scoring images" if lowest else "hits"
    click.echo(f"{layer} unit {unit}: {len(result.hits)} {which}, each activation reproduced from the image")
    for line in profile_lines(result.distribution, result.classes):
        click.echo(f"  {line}")
    if result.sanity is not None:
        click.echo("  sanity check: rank correlation with the trained network's maps as the weights up to the unit "
                   "are randomized, step by step (1.0: unchanged)")
        for step, names in enumerate(result.sanity.step_names(), 1):
            click.echo(f"    step {step}: {names}")
        for method, values in result.sanity.spearman.items():
            flag = "  (!) barely changes: it shows the image more than the unit" \
                if method in result.sanity.flagged else ""
            click.echo(f"    {method.label:<22} " + " ".join(f"{v:5.2f}" for v in values) + flag)
    for hit in result.hits:
        click.echo(f"  #{hit.rank + 1} {hit.score:9.4g}  {hit.path}  box {list(hit.box)} "
                   f"(original pixels {list(hit.box_original)})")
    click.echo(f"Wrote {out}" + (f" and {save_maps}" if save_maps else ""))


@click.command()
@click.argument("index", type=click.Path(path_type=Path))
@click.option("--layer", required=True, help="Layer name, as listed by 'actindex info INDEX'.")
@click.option("--unit", required=True, type=int, help="Channel number in that layer.")
@click.option("--k", type=int, help="Images to list. Default: all the index keeps.")
@click.option("--classes", default=5, show_default=True, type=int, help="Best classes to list.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def unit(index: Path, layer: str, unit: int, k: int | None, classes: int, as_json: bool) -> None:
    """A unit's profile from the index alone: firing rate, quantiles, class selectivity, best classes, top (and
    lowest) images. Needs neither the network nor the images."""
    from .unit import unit_summary

    summary = unit_summary(index, layer, unit, k=k, classes=classes)
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))
        return
    for line in summary.lines():
        click.echo(line)


def _picture_path(out: Path | None, as_json: bool, default: str) -> Path | None:
    """Where a query's picture goes: --out; without it, `default` in this folder, unless the answer is --json
    (which names the files it wrote, so a picture nobody asked for is not left behind)."""
    if out is not None or as_json:
        return out
    return Path(default)


def _model_for(index: Path | None, model: str | None, weights: str | None,
               device: str) -> tuple[LoadedModel, IndexInfo | None]:
    """(the network, the index's description or None) from an index, or from --model/--weights."""
    from actindex.indexer.models import load_model
    from actindex.kernels.errors import UserError

    if index is not None:
        from actindex.indexer.index_file import IndexReader

        from .loading import load_index_model

        with IndexReader(index) as reader:
            info = reader.info
        if model is not None and model != info.model:
            raise UserError(f"--model '{model}' is not the index's model '{info.model}'; give one or the other")
        return load_index_model(info, weights, device), info
    if model is None:
        raise UserError("give an index (INDEX.h5) or --model NAME [--weights W]")
    return load_model(model, weights, device), None


@click.command()
@click.argument("index", required=False, type=click.Path(path_type=Path))
@click.option("--model", help="Instead of an index: torchvision name, timm:NAME, or package.module:factory.")
@click.option("--weights", help="Weights enum name or state-dict file (with --model), or where the index's "
                                "weights file is now.")
@click.option("--layer", help="A convolution layer. Default: the first one the input reaches.")
@click.option("--out", default="filters.png", show_default=True, type=click.Path(path_type=Path))
@click.option("--scale", default=8, show_default=True, type=int, help="Screen pixels per weight (no blur).")
def filters(index: Path | None, model: str | None, weights: str | None, layer: str | None, out: Path,
            scale: int) -> None:
    """A convolution's filters as pictures: RGB tiles for the first layer, grey per input channel deeper."""
    from .filters import filter_grid, first_conv, layer_weight
    from .render import save_png

    loaded, info = _model_for(index, model, weights, "cpu")
    name = layer or first_conv(loaded.module, info.input_size if info else 224)
    weight = layer_weight(loaded.module, name)
    save_png(filter_grid(weight, scale=scale), out)
    o, i, kh, kw = weight.shape
    kind = "RGB" if i == 3 else "grey, one tile per input channel" if i > 1 else "grey"
    click.echo(f"{name}: {o} filters of {i}x{kh}x{kw} ({kind}, scaled symmetrically around 0 = mid-grey)")
    click.echo(f"Wrote {out}")


@click.command()
@click.option("--index", type=click.Path(path_type=Path),
              help="Take model, weights and preprocessing from this index, and compare with its best images.")
@click.option("--model", help="torchvision name, timm:NAME, or package.module:factory (or give --index).")
@click.option("--weights", help="Weights enum name or state-dict file.")
@click.option("--layer", help="Layer of the unit to maximize (omit with --class).")
@click.option("--unit", type=int, help="Channel of that layer.")
@click.option("--class", "class_index", type=int, help="Maximize this class logit (the model's output) instead.")
@click.option("--objective", type=click.Choice(["center", "mean"]), default="center", show_default=True,
              help="The unit at the centre position of its map, or its spatial mean.")
@click.option("--direction", help="Maximize a direction instead of one unit: UNIT:WEIGHT,… over --layer's units "
                                  "(e.g. the units 'similar --explain' names); --unit is then not needed.")
@click.option("--negative", is_flag=True, help="Minimize the objective instead.")
@click.option("--param", "parameterization", type=click.Choice(["fourier", "pixel", "maco"]),
              help="fourier: a 1/f spectrum with decorrelated colours under random jitter, scale and rotation (lucid; "
                   "the default); pixel: gradient ascent on pixels with blur and L2 decay (Yosinski et al.); maco: "
                   "the spectrum's phase only, its magnitude fixed (Fel et al. 2023).")
@click.option("--batch", type=int, help="Images optimized together (with --diversity, different facets).")
@click.option("--diversity", type=float, help="Weight of the Gram-matrix dissimilarity between the batch's images.")
@click.option("--no-decorrelate", is_flag=True, help="fourier: plain RGB instead of decorrelated colours.")
@click.option("--index-colours", is_flag=True, help="fourier with --index: decorrelate with the colour covariance of "
                                                    "the index's images instead of ImageNet's.")
@click.option("--out", default="dream.png", show_default=True, type=click.Path(path_type=Path))
@click.option("--steps", type=int, help="Optimization steps.")
@click.option("--lr", type=float, help="pixel: step size, in normalized input units per pixel.")
@click.option("--blur-every", type=int, help="Gaussian blur after every N steps (0: never).")
@click.option("--blur-sigma", type=float, help="Blur radius in pixels.")
@click.option("--l2", "l2_decay", type=float, help="L2 decay per step.")
@click.option("--jitter", type=int, help="Random shift per step, in pixels.")
@click.option("--clip-norm", type=float, help="Zero pixels below this percentile of RGB norm each step.")
@click.option("--clip-contribution", type=float,
              help="Zero pixels below this percentile of |x·gradient| each step.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--input-size", type=int, help="Image size. Default: the index's, else 224.")
@click.option("--device", help="cpu, cuda or cuda:N. Default: cuda when present, else cpu.")
def dream(index: Path | None, model: str | None, weights: str | None, layer: str | None, unit: int | None,
          class_index: int | None, objective: str, direction: str | None, negative: bool,
          parameterization: str | None, batch: int | None, diversity: float | None, no_decorrelate: bool,
          index_colours: bool, out: Path, steps: int | None, lr: float | None,
          blur_every: int | None, blur_sigma: float | None, l2_decay: float | None, jitter: int | None,
          clip_norm: float | None, clip_contribution: float | None, seed: int, input_size: int | None,
          device: str | None) -> None:
    """Synthesize an image that excites a unit, a direction or a class: by default lucid's Fourier
    parameterization with transformation robustness; --param pixel for Yosinski et al.'s."""
    import dataclasses

    import numpy as np
    from PIL import Image

    from actindex.kernels.errors import UserError

    from .dream import DreamConfig, parse_direction
    from .dream import dream as run_dream
    from .render import save_png

    weights_of = parse_direction(direction) if direction else ()
    if weights_of:
        unit = unit if unit is not None else weights_of[0][0]
    if (class_index is None) == (layer is None and unit is None) or (layer is None) != (unit is None):
        raise UserError("give --layer L --unit U (or --direction), or --class C")
    if index_colours and index is None:
        raise UserError("--index-colours needs --index (the images whose colours to use)")
    target = _device(device)
    loaded, info = _model_for(index, model, weights, target)
    changes: dict[str, Any] = {key: value for key, value in (
        ("steps", steps), ("lr", lr), ("blur_every", blur_every), ("blur_sigma", blur_sigma),
        ("l2_decay", l2_decay), ("jitter", jitter), ("clip_norm_percentile", clip_norm),
        ("clip_contribution_percentile", clip_contribution), ("parameterization", parameterization),
        ("batch", batch), ("diversity", diversity),
        ("input_size", input_size or (info.input_size if info else None))) if value is not None}
    config = dataclasses.replace(DreamConfig(), objective="logit" if class_index is not None else objective,
                                 seed=seed, negative=negative, decorrelate=not no_decorrelate,
                                 direction=weights_of, **changes)
    mean, std = (info.mean, info.std) if info else (loaded.mean, loaded.std)
    chosen = class_index if class_index is not None else unit
    assert chosen is not None
    covariance = None
    if index_colours and index is not None:
        from .dream import index_colour_covariance

        covariance = index_colour_covariance(index)
    result = run_dream(loaded.module, layer, chosen, mean, std, config, target, covariance)
    save_png(Image.fromarray(np.concatenate(result.images, axis=1)) if len(result.images) > 1 else
             Image.fromarray(result.image), out)
    what = f"class {class_index}" + (f" ({loaded.categories[class_index]})" if class_index is not None and
                                     class_index < len(loaded.categories) else "") \
        if class_index is not None else f"{layer} direction {direction} ({config.objective})" if weights_of \
        else f"{layer} unit {unit} ({config.objective})"
    what += " minimized" if negative else ""
    click.echo(f"{what}: activation {result.start_activation:.4g} -> {result.activation:.4g} after "
               f"{config.steps} steps (seed {seed})")
    if index is not None and layer is not None and unit is not None:
        from actindex.indexer.index_file import IndexReader

        with IndexReader(index) as reader:
            if layer in reader.layer_names:
                hits = reader.layer(layer)
                best, image = float(hits.value[unit][0]), int(hits.image[unit][0])
                click.echo(f"best in the dataset: {best:.4g} (spatial max) on {reader.paths_of([image])[0]}; "
                           f"the dream reaches {result.activation / best:.2f}x of it" if image >= 0 else
                           "the index has no hits for this unit")
    click.echo(f"Wrote {out}")


@click.command()
@click.argument("index", type=click.Path(path_type=Path))
@click.option("--image", type=click.Path(path_type=Path), help="A new image, embedded with the index's network.")
@click.option("--id", "image_id", type=int, help="An indexed image, by id (its stored vector is used).")
@click.option("--k", default=9, show_default=True, type=int)
@click.option("--layer", help="Embedding layer. Default: the one the FAISS index was built from.")
@click.option("--out", type=click.Path(path_type=Path),
              help="PNG to write. Default: similar.png here; with --json, none unless --out is given.")
@click.option("--json", "as_json", is_flag=True, help="Print the hits and output path as JSON.")
@click.option("--explain", is_flag=True, help="Guided backprop of each hit's similarity, and its top units.")
@click.option("--box", help="Patch search: y0,x0,y1,x1 on the image (original pixels); the hits are the patches "
                            "of other images most like it (indexes built with --patch-layer).")
@click.option("--from-unit", help="Patch search from a unit's hit: LAYER:UNIT:RANK (RANK 1 is its best), the box "
                                  "being the hit's receptive field.")
@click.option("--per-image", default=2, show_default=True, type=int, help="Patch search: the most hits from one "
                                                                          "image.")
@click.option("--data-root", type=click.Path(path_type=Path), help="Where the images are now, if they moved.")
@click.option("--weights", help="Where the index's weights file is now, if it moved (same contents).")
@click.option("--device", help="cpu, cuda or cuda:N. Default: cuda when present, else cpu.")
def similar(index: Path, image: Path | None, image_id: int | None, k: int, layer: str | None, out: Path | None,
            as_json: bool, explain: bool, box: str | None, from_unit: str | None, per_image: int,
            data_root: Path | None, weights: str | None, device: str | None) -> None:
    """The images the network sees as most alike (cosine of activation vectors), from a new or indexed image;
    with --box or --from-unit, the patches most like a part of one."""
    if box is not None or from_unit is not None:
        _patches(index, image, image_id, box, from_unit, k, per_image, layer, out, as_json, explain, data_root,
                 weights, device)
        return
    from .similar import find_similar

    out = _picture_path(out, as_json, "similar.png")
    result = find_similar(index, image=image, image_id=image_id, k=k, layer=layer, data=data_root,
                          weights=weights, device=_device(device) if image is not None or explain else "cpu",
                          explain=explain, pictures=out is not None)
    if out is not None:
        from .render import save_png, similar_sheet

        save_png(similar_sheet(result), out)
    if result.unguided:
        from .neuron import describe_unguided

        click.echo(f"Note: {describe_unguided(result.unguided)}", err=True)
    if as_json:
        click.echo(json.dumps({**result.to_json(), "outputs": {"image": str(out) if out else None}}, indent=2))
        return
    click.echo(f"Nearest to {result.query.get('path', result.query.get('image'))} by '{result.layer}':")
    for hit in result.hits:
        units = ("  units " + ", ".join(f"{u} ({c:+.3f})" for u, c in hit.units)) if hit.units else ""
        click.echo(f"  #{hit.rank + 1} {hit.score:.4f}  {hit.path}{units}")
    click.echo(f"Wrote {out}")


def _patches(index: Path, image: Path | None, image_id: int | None, box: str | None, from_unit: str | None, k: int,
             per_image: int, layer: str | None, out: Path | None, as_json: bool, explain: bool,
             data_root: Path | None, weights: str | None, device: str | None) -> None:
    """`similar --box` / `--from-unit`: a patch search."""
    from .patches import UnitHit, find_patches, parse_box

    out = _picture_path(out, as_json, "patches.png")
    result = find_patches(index, image=image, image_id=image_id, box=parse_box(box) if box else None,
                          from_unit=UnitHit.parse(from_unit) if from_unit else None, k=k, per_image=per_image,
                          layer=layer, data=data_root, weights=weights,
                          device=_device(device) if image is not None or explain else "cpu", explain=explain)
    if out is not None:
        from .render import patch_sheet, save_png

        save_png(patch_sheet(result), out)
    if result.unguided:
        from .neuron import describe_unguided

        click.echo(f"Note: {describe_unguided(result.unguided)}", err=True)
    if result.nearest:
        click.echo("Note: no receptive-field centre of the layer lies inside the box along one axis; the nearest "
                   "position was taken", err=True)
    if as_json:
        click.echo(json.dumps({**result.to_json(), "outputs": {"image": str(out) if out else None}}, indent=2))
        return
    source = result.query.get("path", result.query.get("image"))
    unit = f" (hit of unit {result.query['unit']})" if "unit" in result.query else ""
    click.echo(f"Nearest patches to box {','.join(map(str, result.box_original))} of {source}{unit} by "
               f"'{result.layer}' ({len(result.positions)} positions), at most {result.per_image} per image:")
    for hit in result.hits:
        units = ("  units " + ", ".join(f"{u} ({c:+.3f})" for u, c in hit.units)) if hit.units else ""
        click.echo(f"  #{hit.rank + 1} {hit.score:.4f}  {hit.path} at ({hit.y}, {hit.x}), box "
                   f"{','.join(map(str, hit.box_original))}{units}")
    if out is not None:
        click.echo(f"Wrote {out}")


@click.command()
@click.argument("index", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for the site (new, empty, or an atlas of the same index to extend).")
@click.option("--layers", help="Comma-separated layers. Default: every layer of the index.")
@click.option("--units", help="Units that get a page: '0-15', '3,7', 'LAYER:N', 'LAYER:A-B', comma-separated; plain "
                              "entries apply to every chosen layer. Default: all units. Every unit gets a tile.")
@click.option("--dream", is_flag=True, help="Also synthesize each chosen unit's dream (200 steps each).")
@click.option("--jobs", default=1, show_default=True, type=int,
              help="Worker processes, each with its own copy of the network.")
@click.option("--batch-size", type=int, help="Hit images per backward pass. Default: 8 on the CPU, 64 on a GPU.")
@click.option("--format", "image_format", type=click.Choice(["webp", "png"]), default="webp", show_default=True,
              help="Picture format.")
@click.option("--overwrite", is_flag=True, help="Replace a site that was built from another index.")
@click.option("--methods", help="Attribution maps on the unit pages, as for neuron (guided, gradient, "
                                "gradient-x-input, integrated-gradients, grad-cam, occlusion). Default: the site's "
                                "(guided at first).")
@click.option("--cam-layer", help="For grad-cam: a layer that runs before every layer of the atlas.")
@click.option("--patch-boxes", default=3, show_default=True, type=int,
              help="Indexes built with --patch-layer: each image page's strongest boxes searched for alike patches "
                   "of other images; 0 for none.")
@click.option("--data-root", type=click.Path(path_type=Path), help="Where the images are now, if they moved.")
@click.option("--weights", help="Where the index's weights file is now, if it moved (same contents).")
@click.option("--device", help="cpu, cuda or cuda:N. Default: cuda when present, else cpu.")
@click.option("--crash-after", type=int, hidden=True, help="Testing: stop after this many tasks.")
@click.option("--kill-worker", hidden=True, help="Testing: TASK[:ATTEMPTS], the worker running that task dies.")
def atlas(index: Path, out: Path, layers: str | None, units: str | None, dream: bool, jobs: int,
          batch_size: int | None, image_format: str, overwrite: bool, methods: str | None, cam_layer: str | None,
          patch_boxes: int, data_root: Path | None, weights: str | None, device: str | None, crash_after: int | None,
          kill_worker: str | None) -> None:
    """A static website of the index: every layer, unit and hit image, with guided backprop and similar images.

    Run it again with more --layers or --units to extend a site; an interrupted build continues where it
    stopped. Open OUT/index.html in a browser, or copy OUT to any web server.
    """
    from .atlas import AtlasConfig, build_atlas
    from .atlas.build import AtlasFault
    from .atlas.pool import KillTask
    from .attribution import parse_methods

    fault = AtlasFault(crash_after, KillTask(*(int(n) for n in kill_worker.split(":"))) if kill_worker else None)
    config = AtlasConfig(index=index, out=out, layers=tuple(_names(layers)) if layers else None, units=units,
                         dream=dream, jobs=jobs, batch_size=batch_size, device=_device(device), data=data_root,
                         weights=weights, image_format=image_format, overwrite=overwrite,
                         methods=parse_methods(methods) if methods else None, cam_layer=cam_layer,
                         patch_boxes=patch_boxes)
    summary = build_atlas(config, progress=True, fault=fault)
    click.echo(f"Atlas of {summary.layers} layers: {summary.unit_pages} unit pages ({summary.units_computed} made "
               f"now), {summary.image_pages} image pages; {summary.files} files, "
               f"{(summary.page_bytes + summary.picture_bytes) / 1e6:.1f} MB ({summary.picture_bytes / 1e6:.1f} MB "
               f"pictures) in {summary.seconds:.1f} s")
    click.echo(f"Open {summary.front_page}")


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


@click.group(cls=ActindexGroup, commands={**COMMANDS, "demo": demo, "neuron": neuron, "unit": unit,
                                          "filters": filters, "dream": dream, "similar": similar, "atlas": atlas})
@click.version_option(package_name="actindex")
@debug_option
def main(debug: bool) -> None:
    """actindex: what does each unit of a CNN respond to? Index a dataset, then query it."""
