"""Thin click commands over the indexer API: parse, call one function, print.

Nothing heavy is imported at module level, so `actindex --help` answers at once; torch and h5py load when a
command runs.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from .choices import Decoder, Precision


class ActindexGroup(click.Group):
    """A group whose commands turn user errors into one line and a non-zero exit (a traceback with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug")) or os.environ.get("ACTINDEX_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            if debug:
                traceback.print_exc()
            click.echo("Interrupted (Ctrl-C); every output is written whole or not at all, so none was left "
                       "half-written", err=True)
            sys.exit(130)
        except BrokenPipeError:  # `actindex layers … | head`: the reader left, nothing more to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except Exception as error:  # noqa: BLE001 - the one place where every failure becomes a message
            from actindex.kernels.errors import UserError, one_line

            code = error.exit_code if isinstance(error, UserError) else 1
            if getattr(error, "quiet", False) and not debug:
                sys.exit(code)  # another process of the job prints this error
            # Under torchrun every process writes to the same console: say which one speaks.
            who = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            if debug:
                traceback.print_exc()
            else:
                hint = "" if isinstance(error, UserError) else " (rerun with --debug for the traceback)"
                click.echo(f"Error: {who}{one_line(error)}{hint}", err=True)
            sys.exit(code)


def debug_option(function: Any) -> Any:
    return click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")(function)


def _floats3(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter("give three comma-separated numbers, e.g. 0.485,0.456,0.406") from None
    if len(numbers) != 3:
        raise click.BadParameter(f"give three comma-separated numbers (R,G,B), got {len(numbers)}")
    return numbers


def _names(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    return names or None


@click.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--model", required=True, help="torchvision name (resnet18), timm:NAME, or package.module:factory.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Index file to write (.h5).")
@click.option("--weights", help="Weights enum name (DEFAULT, IMAGENET1K_V1) or a state-dict file. "
                                "Default: random initialisation.")
@click.option("--layers", callback=_names, help="Comma-separated layer names. Default: the model's main stages "
                                                 "(see 'actindex layers').")
@click.option("--k", default=9, show_default=True, type=int, help="Images kept per unit.")
@click.option("--bottom-k", default=0, show_default=True, type=int,
              help="Also keep the N images with the lowest score (the unit's minimum over positions) per unit, to "
                   "see what suppresses it; 0: off.")
@click.option("--input-size", default=224, show_default=True, type=int,
              help="Network input size; images are resized to size·256/224 and centre-cropped.")
@click.option("--mean", callback=_floats3, help="R,G,B mean. Default: the weights' own, else ImageNet's.")
@click.option("--std", callback=_floats3, help="R,G,B std. Default: the weights' own, else ImageNet's.")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--workers", type=int, help="Image decoding processes per process of the job. Default: the CPU "
                                         "cores shared among the processes on this node, at most 8.")
@click.option("--device", help="cpu, cuda or cuda:N. Default: cuda when present, else cpu.")
@click.option("--embed-layer", help="Layer whose spatial mean is stored per image. Default: the last indexed "
                                     "layer; '' for none.")
@click.option("--max-pixels", type=int, help="Skip images with more pixels than this (decompression bombs).")
@click.option("--overwrite", is_flag=True, help="Replace an existing index at --out.")
@click.option("--checkpoint-every", type=int, default=50_000, show_default=True,
              help="Images per process between checkpoints (in OUT.partial/); 0: only at the end of a shard.")
@click.option("--resume", is_flag=True, help="Continue the partial build beside --out after a crash (same "
                                             "options, same number of processes); starts afresh if there is none.")
@click.option("--faiss-factory", help="FAISS index_factory string for the similarity index (e.g. Flat, "
                                     "IVF1024,Flat); 'none' for no FAISS file. Default: chosen by the data's size.")
@click.option("--patch-layer", help="Also store every feature position's vector of this layer (float16, "
                                     "2 x C bytes a position) and a FAISS index over them, for patch search "
                                     "('similar --box'). Default: off.")
@click.option("--patch-factory", help="FAISS index_factory string for the patch vectors; 'none' for no FAISS file. "
                                      "Default: chosen by the data's size, at most 64 bytes a vector.")
@click.option("--decoder", type=click.Choice([d.value for d in Decoder]), default="pil", show_default=True,
              help="pil: Pillow, the exact path; turbo: JPEGs decoded by libjpeg-turbo and resized by torch on the "
                   "CPU (pixels within 1 level of pil, faster); gpu: JPEGs decoded in batches on the CUDA device.")
@click.option("--precision", type=click.Choice([p.value for p in Precision]), default="fp32", show_default=True,
              help="What the network computes in: fp32, tf32 (CUDA), bf16 or fp16 (CUDA) autocast. Scores are "
                   "stored as float32 whatever it is; the README says how much each changes.")
@click.option("--crash-at", hidden=True, help="Testing: RANK:IMAGES[:raise|kill] injects a failure.")
def build(data: Path, model: str, out: Path, weights: str | None, layers: tuple[str, ...] | None, k: int,
          bottom_k: int, input_size: int, mean: tuple[float, float, float] | None,
          std: tuple[float, float, float] | None, batch_size: int, workers: int | None, device: str | None,
          embed_layer: str | None, max_pixels: int | None, overwrite: bool, checkpoint_every: int, resume: bool,
          faiss_factory: str | None, patch_layer: str | None, patch_factory: str | None, decoder: str,
          precision: str, crash_at: str | None) -> None:
    """Index the images under DATA: every unit's top-k images, positions and receptive-field boxes (and, with
    --bottom-k, its lowest-scoring images).

    Under torchrun (python -m torch.distributed.run … -m actindex.indexer build …) every process indexes a
    contiguous share of the images and rank 0 writes the file.
    """
    from .build import BuildConfig, Fault, build_index
    from .images import DEFAULT_MAX_PIXELS

    config = BuildConfig(data=data, model=model, out=out, weights=weights, layers=layers, k=k,
                         bottom_k=bottom_k, input_size=input_size, mean=mean, std=std, batch_size=batch_size,
                         workers=workers, device=device, embed_layer=embed_layer,
                         max_pixels=max_pixels or DEFAULT_MAX_PIXELS, overwrite=overwrite,
                         checkpoint_every=checkpoint_every, resume=resume, faiss_factory=faiss_factory,
                         patch_layer=patch_layer or None, patch_factory=patch_factory,
                         decoder=Decoder(decoder), precision=Precision(precision))
    summary = build_index(config, progress=TqdmProgress, fault=Fault.parse(crash_at) if crash_at else None)
    if summary.rank != 0:
        return
    if summary.resumed is not None:
        click.echo(f"Resumed from a checkpoint of {summary.resumed} images" if summary.resumed else
                   "No checkpoint to resume from: built from the beginning")
    processes = f" x {summary.world_size} processes" if summary.world_size > 1 else ""
    click.echo(f"Indexed {summary.indexed} of {summary.num_images} images ({summary.skipped} skipped) in "
               f"{summary.seconds:.1f} s, {summary.images_per_second:.1f} images/s on {summary.device}{processes}")
    click.echo(f"Layers: {', '.join(summary.layers)}; embeddings: {summary.embed_layer or 'none'}")
    if summary.skipped:
        click.echo(f"Skipped files are listed by 'actindex info {summary.out}'")
    if summary.faiss_note:
        click.echo(f"Warning: {summary.faiss_note}", err=True)
    click.echo(f"Wrote {summary.out}")


class TqdmProgress:
    """A progress bar on stderr with images/s and ETA."""

    def __init__(self, total: int, done: int = 0) -> None:
        from tqdm import tqdm

        self.skipped = 0
        self.bar = tqdm(total=total, initial=done, unit="img", desc="indexing", file=sys.stderr,
                        dynamic_ncols=True, smoothing=0.1)

    def update(self, images: int, skipped: int) -> None:
        if skipped:
            self.skipped += skipped
            self.bar.set_postfix(skipped=self.skipped, refresh=False)
        self.bar.update(images)

    def close(self) -> None:
        self.bar.close()


@click.command()
@click.option("--model", required=True, help="torchvision name, timm:NAME, or package.module:factory.")
@click.option("--weights", help="Weights enum name or state-dict file (changes nothing in the geometry).")
@click.option("--input-size", default=224, show_default=True, type=int)
@click.option("--all", "show_all", is_flag=True, help="Also list modules that do not run or have no field.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def layers(model: str, weights: str | None, input_size: int, show_all: bool, as_json: bool) -> None:
    """List a model's addressable layers: channels, feature-map size, receptive field (* = default)."""
    from .layers import layer_table

    rows, defaults = layer_table(model, weights, input_size)
    if not show_all:
        rows = [row for row in rows if row["rf_size"] is not None]
    if as_json:
        click.echo(json.dumps({"model": model, "input_size": input_size, "default": defaults, "layers": rows},
                              indent=2))
        return
    width = max([len(r["name"]) for r in rows] + [5])
    click.echo(f"  {'layer':<{width}}  {'type':<20} {'output':>12} {'channels':>8} {'size':>9} {'rf size':>9} "
               f"{'stride':>7} {'padding':>9}")
    for r in rows:
        mark = "*" if r["name"] in defaults else " "
        output = "x".join(str(n) for n in r["shape"]) if r["shape"] else "-"
        size = f"{r['height']}x{r['width']}" if r["height"] is not None else "-"
        rf = _show_yx(r["rf_size"]) if r["rf_size"] else "-"
        stride = _show_yx(r["rf_stride"]) if r["rf_stride"] else "-"
        padding = _show_yx(r["rf_padding"]) if r["rf_padding"] else (r["note"] or "-")
        click.echo(f"{mark} {r['name']:<{width}}  {r['type']:<20} {output:>12} {r['channels'] or '-':>8} {size:>9} "
                   f"{rf:>9} {stride:>7} {padding:>9}")
    if any(r["shape"] and not r["indexable"] for r in rows):
        click.echo("- channels: the output is neither a (C, H, W) feature map nor a (C,) vector (e.g. a transformer's "
                   "tokens x features); such layers cannot be indexed")
    click.echo(f"* default layers: {','.join(defaults) or 'none found (name them with --layers)'}")


@click.command()
@click.argument("index", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(index: Path, as_json: bool) -> None:
    """Describe an index: model, data, layers, receptive fields, skipped files."""
    from .index_file import IndexReader

    with IndexReader(index) as reader:
        summary = reader.describe()
        skipped = reader.skipped()
    summary["skipped"] = [{"path": p, "reason": r} for p, r in skipped]
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{summary['path']}: actindex format {summary['format_version']}")
    bottom = f", bottom-k = {summary['bottom_k']}" if summary["bottom_k"] else ""
    click.echo(f"  model {summary['model']}, weights {summary['weights'] or '(random init)'}, "
               f"input {summary['input_size']} px, k = {summary['k']}{bottom}")
    click.echo(f"  data {summary['data_root']}: {summary['num_images']} images, {summary['num_skipped']} skipped")
    backend = summary["build"].get("jpeg_backend")
    click.echo(f"  decoder {summary['decoder']}{f' ({backend})' if backend else ''}, precision {summary['precision']}, "
               f"memory format {summary['memory_format']}")
    build_info = summary["build"]
    if build_info:
        click.echo(f"  built {build_info.get('created', '?')} on {build_info.get('device', '?')} in "
                   f"{build_info.get('seconds', 0):.1f} s ({build_info.get('images_per_second', 0):.1f} images/s)")
    for layer in summary["layers"]:
        click.echo(f"  layer {layer['name']}: {layer['channels']} channels, {layer['height']}x{layer['width']}, "
                   f"receptive field {_show_yx(layer['rf_size'])} stride {_show_yx(layer['rf_stride'])} "
                   f"padding {_show_yx(layer['rf_padding'])}")
    for name, shape in summary["embeddings"].items():
        click.echo(f"  embeddings {name}: {shape[0]} x {shape[1]}")
    for name, shape in summary.get("patches", {}).items():
        click.echo(f"  patch vectors {name}: {shape[0]} x {shape[1]}")
    for what, key, option in (("similarity index", "faiss", ""), ("patch index", "patch_faiss", " --patches")):
        vectors = summary.get(key)
        if vectors and not vectors.get("present", True):
            click.echo(f"  {what} {vectors['index']}: missing (deleted, or not copied with the index); "
                       f"rebuild it with: actindex faiss {index}{option}")
        elif vectors:
            recall = f", recall@10 {vectors['recall_at_10']:.3f}" if vectors.get("recall_at_10", -1) >= 0 else ""
            rerank = f", {10 * vectors['rerank']} candidates re-ranked per 10" if vectors.get("rerank", 1) > 1 else ""
            click.echo(f"  {what} {vectors['index']}: {vectors['factory']} over {vectors['count']} vectors "
                       f"of '{vectors['layer']}'{rerank}{recall}")
            if vectors.get("note"):
                click.echo(f"  warning: {vectors['note']}")
    for item in summary["skipped"]:
        click.echo(f"  skipped {item['path']}: {item['reason']}")


def _show_yx(pair: list[int]) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


@click.command("faiss")
@click.argument("index", type=click.Path(path_type=Path))
@click.option("--layer", help="Embedding layer to index. Default: the one indexed before, else the build's.")
@click.option("--factory", help="FAISS index_factory string. Default: chosen by the data's size.")
@click.option("--patches", is_flag=True, help="The patch vectors' index (INDEX.patches.faiss, from --patch-layer) "
                                              "instead of the images'.")
def faiss_command(index: Path, layer: str | None, factory: str | None, patches: bool) -> None:
    """(Re)build the FAISS similarity index beside INDEX from its stored vectors (no network needed)."""
    from tqdm import tqdm

    from .similarity import rebuild, rebuild_patches

    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        """One bar per pass over the vectors, each counting to the number of vectors."""
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            bars[stage] = tqdm(total=total, unit="vec", desc=f"faiss {stage}", file=sys.stderr, dynamic_ncols=True)
        bars[stage].update(done - bars[stage].n)

    try:
        path, info, chosen = rebuild_patches(index, layer, factory, progress) if patches else \
            rebuild(index, layer, factory, progress)
    finally:
        for bar in bars.values():
            bar.close()
    recall = f", recall@10 {info.recall_at_10:.3f} against exact search" if info.recall_at_10 is not None else \
        " (exact search)"
    nprobe = f", nprobe {info.nprobe}" if info.nprobe is not None else ""
    rerank = f", {10 * info.rerank} candidates re-ranked exactly per 10 results" if info.rerank > 1 else ""
    click.echo(f"Indexed {info.count} vectors of '{chosen}' ({info.dim} dimensions) with {info.factory}{nprobe}"
               f"{rerank}{recall} in {info.seconds:.1f} s")
    if info.note:
        click.echo(f"Warning: {info.note}", err=True)
    click.echo(f"Wrote {path}")


COMMANDS = {"build": build, "layers": layers, "info": info, "faiss": faiss_command}


@click.group(cls=ActindexGroup, commands=COMMANDS)
@debug_option
def cli(debug: bool) -> None:
    """actindex indexer: build and inspect activation indexes (usable under torchrun)."""


def main() -> None:
    cli(prog_name="python -m actindex.indexer")
