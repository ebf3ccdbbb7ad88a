"""The `actindex` console script: the indexer's commands plus the query side's.

Command modules import torch only when a command runs, so `actindex --help` is instant.
"""

from __future__ import annotations

from pathlib import Path

import click

from actindex.indexer.cli import COMMANDS, ActindexGroup, debug_option


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


@click.group(cls=ActindexGroup, commands={**COMMANDS, "demo": demo})
@click.version_option(package_name="actindex")
@debug_option
def main(debug: bool) -> None:
    """actindex: what does each unit of a CNN respond to? Index a dataset, then query it."""
