"""What a query costs as a person runs it: a whole `actindex` process, start-up included, against an older release.

Side by side in one run, interleaved over --rounds rounds, each command a fresh process:
  ours      the working tree (the installed `actindex`);
  baseline  the same commands with the code of git revision --baseline (checked out into a temporary folder and
            put first on PYTHONPATH), reading the same index files.
For each command: median wall time, peak memory (the process's maximum RSS) and which heavy libraries it
imported (torch, torchvision, timm), with the ratio baseline / ours.

Commands: `neuron` on the demo index (timm's EfficientNet-Lite0) and on a small resnet18 index (torchvision;
built here with random weights), and `similar --id` with --json and with its picture. Run `make demo` first.

    python scripts/bench_startup.py --baseline cf49f99
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "timm")
# Peak memory as VmHWM, the process's own since exec (ru_maxrss from wait4 would count what the benchmark held
# before the child exec'd).
RUN = ("import sys\nfrom actindex.query.cli import main\ncode = 0\ntry:\n    main(sys.argv[1:])\n"
       "except SystemExit as stop:\n    code = stop.code or 0\n"
       f"print('IMPORTED', ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
       "peak = next(line for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
       "print('PEAK_KB', peak.split()[1], file=sys.stderr)\nsys.exit(code)")


def checkout(revision: str, folder: Path) -> Path:
    """The package `actindex` of `revision`, importable from the returned folder."""
    folder.mkdir(parents=True)
    subprocess.run(f"git -C {ROOT} archive {revision} kernels indexer query | tar -x -C {folder}", shell=True,
                   check=True)
    package = folder / "pythonpath" / "actindex"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in ("kernels", "indexer", "query"):
        (package / name).symlink_to(folder / name)
    return folder / "pythonpath"


def resnet_index(folder: Path) -> Path:
    """16 generated JPEGs indexed with resnet18 (random weights from seed 0), layer3 and layer4, 128 px."""
    data = folder / "images" / "a"
    data.mkdir(parents=True)
    for i in range(16):
        small = np.random.default_rng(i).integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((160, 120), Image.Resampling.BICUBIC).save(data / f"{i:02d}.jpg")
    out = folder / "resnet18.h5"
    subprocess.run([sys.executable, "-c", RUN, "build", str(folder / "images"), "--model", "resnet18", "--layers",
                    "layer3,layer4", "--input-size", "128", "--workers", "0", "--device", "cpu", "--out", str(out)],
                   check=True, capture_output=True)
    return out


def measure(args: list[str], pythonpath: Path | None, cwd: Path) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, heavy libraries imported) of one `actindex` process."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", RUN, *args], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr}")
    imported = next((line.split(" ", 1)[1] if " " in line else "" for line in result.stderr.splitlines()
                     if line.startswith("IMPORTED")), "?")
    peak_kb = int(result.stderr.rsplit("PEAK_KB", 1)[1].split()[0])
    return seconds, peak_kb / 1024, imported or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="git revision to compare with (e.g. the commit before a change)")
    parser.add_argument("--demo", type=Path, default=ROOT / "demo-output" / "index.h5")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not args.demo.is_file():
        raise SystemExit(f"{args.demo} is missing: run 'make demo' first")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        resnet = resnet_index(work)
        commands = {
            "neuron, timm (demo)": ["neuron", str(args.demo), "--layer", "blocks.4", "--unit", "45", "--out",
                                    str(work / "n.png")],
            "neuron, torchvision": ["neuron", str(resnet), "--layer", "layer3", "--unit", "3", "--out",
                                    str(work / "r.png")],
            "similar --id --json": ["similar", str(args.demo), "--id", "5", "--json"],
            "similar --id (picture)": ["similar", str(args.demo), "--id", "5", "--out", str(work / "s.png")],
        }
        versions: dict[str, Path | None] = {"ours": None}
        if args.baseline:
            versions["baseline"] = checkout(args.baseline, work / "baseline")
        results: dict[tuple[str, str], list[tuple[float, float, str]]] = {}
        for _ in range(args.rounds):
            for name, command in commands.items():
                for version, pythonpath in versions.items():
                    results.setdefault((name, version), []).append(measure(command, pythonpath, work))
    print(f"{args.rounds} rounds, medians; {os.cpu_count()} cores, python {sys.version.split()[0]}")
    print(f"{'command':<24} {'version':<9} {'seconds':>8} {'peak MB':>8}  imported")
    for name in commands:
        rows = {}
        for version in versions:
            runs = results[(name, version)]
            rows[version] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), runs[0][2])
            seconds, memory, imported = rows[version]
            print(f"{name:<24} {version:<9} {seconds:8.2f} {memory:8.0f}  {imported}")
        if "baseline" in rows:
            print(f"{'':<24} {'ratio':<9} {rows['baseline'][0] / rows['ours'][0]:8.2f} "
                  f"{rows['baseline'][1] / rows['ours'][1]:8.2f}  (baseline / ours)")


if __name__ == "__main__":
    main()
