"""What the atlas's batching and worker processes buy, per unit page, against the per-unit query tool.

Side by side in one run, for the same units of one layer of an index (the demo's by default):
  baseline   `query_neuron` + `neuron_sheet` per unit, as a script over the query API would do it: each call
             loads the network and the unit's hit images, runs one batched backward of its k hits, draws a PNG;
  atlas -j1  `build_atlas` for those units in this process: images decoded once and kept, (unit, hit) pairs of
             16 units at a time in batches of --batch-size, patches and guided crops written as WebP;
  atlas -jN  the same with N worker processes;
  resume     `build_atlas` again on the finished site: what an interrupted or extended build costs when
             nothing is left to do (pages are rewritten, no network runs).
Each atlas run starts from an empty folder and gives pages for exactly these units (all other units of the
layer get only their tile, as in any atlas of a subset). Medians of --rounds rounds, interleaved.

    make demo && python scripts/bench_atlas.py                 # blocks.4, 16 units, cpu
    python scripts/bench_atlas.py --index INDEX.h5 --layer layer3 --units 64 --device cuda --jobs 8
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from actindex.query.atlas import AtlasConfig, build_atlas
from actindex.query.neuron import query_neuron
from actindex.query.render import neuron_sheet, save_png


def baseline(index: Path, layer: str, units: range, device: str, folder: Path) -> float:
    start = time.perf_counter()
    for unit in units:
        save_png(neuron_sheet(query_neuron(index, layer, unit, device=device)), folder / f"{unit}.png")
    return time.perf_counter() - start


def atlas(index: Path, layer: str, units: range, device: str, jobs: int, folder: Path) -> tuple[float, float, int]:
    """(seconds to build, seconds to rerun on the finished site, bytes of the unit pages' pictures)."""
    config = AtlasConfig(index=index, out=folder, layers=(layer,), units=f"{units.start}-{units.stop - 1}",
                         device=device, jobs=jobs)
    start = time.perf_counter()
    build_atlas(config)
    built = time.perf_counter() - start
    start = time.perf_counter()
    again = build_atlas(config)
    rerun = time.perf_counter() - start
    assert again.units_computed == 0
    size = sum(p.stat().st_size for unit in units for p in (folder / "img" / "u" / layer / str(unit)).iterdir())
    return built, rerun, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, default=Path("demo-output/index.h5"))
    parser.add_argument("--layer", default="blocks.4")
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not args.index.is_file():
        sys.exit(f"no index at {args.index}: run 'make demo' first, or pass --index")
    units = range(args.units)
    rows: dict[str, list[float]] = {"baseline": [], "atlas -j1": [], f"atlas -j{args.jobs}": [], "rerun": []}
    size = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for round_ in range(args.rounds):
            for name in rows:
                folder = work / f"{round_}-{name.replace(' ', '')}"
                folder.mkdir()
                if name == "baseline":
                    rows[name].append(baseline(args.index, args.layer, units, args.device, folder))
                elif name.startswith("atlas"):
                    jobs = 1 if name == "atlas -j1" else args.jobs
                    built, rerun, size = atlas(args.index, args.layer, units, args.device, jobs, folder / "site")
                    rows[name].append(built)
                    if jobs == 1:
                        rows["rerun"].append(rerun)
                shutil.rmtree(folder, ignore_errors=True)
    median = {name: sorted(times)[len(times) // 2] for name, times in rows.items() if times}
    print(f"{args.units} units of '{args.layer}' of {args.index} on {args.device}, medians of {args.rounds} rounds")
    print(f"{'':<14}{'seconds':>9}{'s / unit':>10}{'vs baseline':>13}")
    for name, seconds in median.items():
        print(f"{name:<14}{seconds:9.2f}{seconds / args.units:10.3f}{median['baseline'] / seconds:12.2f}x")
    print(f"pictures per unit page: {size / args.units / 1e3:.1f} kB (WebP); the atlas runs also write the "
          "layer's tiles and the hit images' thumbnails, the baseline does not")


if __name__ == "__main__":
    main()
