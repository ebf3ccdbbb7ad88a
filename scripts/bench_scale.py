"""actindex at ImageNet scale without running a network over ImageNet: similarity search, queries and the atlas
on indexes of N = 10k, 100k and 1.28M images, for vectors of D = 512, 1280 and 2048 dimensions.

How the indexes are made: one real build (resnet50, random weights from seed 0, 64 generated JPEGs at 64 px,
layer `layer4`: 2048 units) gives top-k tables that point at real images, so that `neuron` and the atlas run
for real. Its file is then extended to N images: the image list repeats the real files' paths (so that any
image a query or the atlas shows can be decoded), and `/embeddings/layer4` is replaced by N synthetic vectors of
D dimensions from a stated generator: 1000 classes of 8 sub-classes; a class prototype has each dimension
active with probability 0.25, with a Gamma(2, 1) value; a sub-class multiplies it by lognormal(0, 0.35) per
dimension; an image scales its sub-class by lognormal(0, 0.2), adds N(0, 0.6) noise and clips at zero (sparse,
non-negative, as pooled ReLU features are; an image's ten nearest neighbours have cosines within 0.01 of each
other at 1.28M x 2048, which makes recall@10 a demanding test).

For every (N, D), printed as one table:
  * `actindex faiss INDEX` as a command: the factory the size rule picks, build time, peak memory, file size,
    the calibrated recall@10;
  * recall@10 of `similar`'s search (FAISS candidates re-ranked on the HDF5 file's vectors) for 300 held-out
    queries (generated, not in the index) against exact cosine search over all N stored vectors, and the
    p50 / p99 latency of single-query searches with 2 threads, the index opened once;
  * wall time and peak memory of fresh `actindex` processes: `info`, `neuron` (9 hits, the network's forward
    and backward included), `similar --id --json`, and an atlas of one unit of the 2048-unit layer.

    python scripts/bench_scale.py                                  # everything: about 25 minutes, 11 GB of disk
    python scripts/bench_scale.py --sizes 10000,100000 --dims 512  # a quick look
    python scripts/bench_scale.py --sizes 10000000 --dims 512 --factory PCAR256,IVF4096,PQ128x4fs
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import h5py
import numpy as np
from PIL import Image

from actindex.indexer.index_file import IndexReader
from actindex.indexer.similarity import normalize, open_vector_index, vector_index_path

K = 10
QUERIES = 300
BLOCK = 32768
# The peak memory of the command itself: VmHWM belongs to the process's memory since exec. (ru_maxrss from wait4
# would also count the benchmark's own memory, which the child has before it execs.)
RUN = ("import sys\nfrom actindex.query.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as stop:\n"
       "    code = stop.code\nelse:\n    code = 0\n"
       "peak = next(line for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
       "print('PEAK_KB', peak.split()[1], file=sys.stderr)\nsys.exit(code)\n")


class Generator:
    """The synthetic vectors: see the module docstring. Rows are drawn per block from seeds derived from the
    block's first row, so any block can be made again alone; held-out queries come from rows past N."""

    def __init__(self, dim: int, seed: int = 0, classes: int = 1000, sub: int = 8) -> None:
        rng = np.random.default_rng(seed)
        active = rng.random((classes, dim)) < 0.25
        prototypes = np.where(active, rng.gamma(2.0, 1.0, (classes, dim)), 0.0).astype(np.float32)  # (C, D)
        self.subclasses = prototypes[:, None, :] * rng.lognormal(0, 0.35, (classes, sub, dim)).astype(np.float32)
        self.seed, self.classes, self.sub, self.dim = seed, classes, sub, dim

    def rows(self, start: int, count: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, start])
        c, s = rng.integers(0, self.classes, count), rng.integers(0, self.sub, count)
        x = self.subclasses[c, s] * rng.lognormal(0, 0.2, (count, 1)).astype(np.float32)  # (B, D)
        x += rng.normal(0, 0.6, (count, self.dim)).astype(np.float32)
        return np.maximum(x, 0, out=x)


def small_build(folder: Path) -> Path:
    """The real index the synthetic ones extend: resnet50 (random, seed 0), 64 generated JPEGs, layer4."""
    data = folder / "images"
    for i in range(64):
        path = data / f"class{i % 4}" / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        small = np.random.default_rng(i).integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((96, 72), Image.Resampling.BICUBIC).save(path)
    out = folder / "real.h5"
    run(["build", str(data), "--model", "resnet50", "--layers", "layer4", "--input-size", "64", "--workers", "0",
         "--device", "cpu", "--faiss-factory", "none", "--out", str(out)])
    return out


def extend(real: Path, out: Path, n: int, generator: Generator) -> None:
    """`real` with N images: its paths repeated, N synthetic vectors, no FAISS file yet."""
    with h5py.File(real, "r") as source, h5py.File(out, "w") as h5:
        for name in ("layers", "skipped"):
            source.copy(name, h5)
        paths = source["images/path"].asstr()[()]
        labels = source["images/label"][()]
        images = h5.create_group("images")
        images.attrs["classes"] = source["images"].attrs["classes"]
        repeat = np.arange(n) % len(paths)
        images.create_dataset("path", data=np.array(paths, dtype=object)[repeat], dtype=h5py.string_dtype())
        images.create_dataset("label", data=labels[repeat])
        embeddings = h5.create_dataset("embeddings/layer4", shape=(n, generator.dim), dtype="<f4",
                                       fill_time="never")
        for start in range(0, n, BLOCK):
            embeddings[start:start + BLOCK] = generator.rows(start, min(BLOCK, n - start))
        for key, value in source.attrs.items():
            if not key.startswith("faiss_"):
                h5.attrs[key] = value
        h5.attrs["num_images"] = n


def run(args: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, stderr) of a fresh `actindex` process; raises when it fails."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", RUN, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, check=False,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"actindex {' '.join(args)} failed:\n{result.stderr}")
    peak_kb = int(result.stderr.rsplit("PEAK_KB", 1)[1].split()[0])
    return seconds, peak_kb / 1024, result.stderr


def exact_truth(dataset: h5py.Dataset, queries: np.ndarray) -> np.ndarray:
    """(Q, K) ids of the exact cosine top-k over every stored row, read in blocks."""
    best_scores = np.full((len(queries), K), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), K), -1, dtype=np.int64)
    for start in range(0, dataset.shape[0], BLOCK):
        block = normalize(dataset[start:start + BLOCK])
        scores = np.concatenate([best_scores, queries @ block.T], axis=1)  # (Q, K + B)
        ids = np.concatenate([best_ids, np.broadcast_to(np.arange(start, start + len(block)),
                                                         (len(queries), len(block)))], axis=1)
        top = np.argpartition(-scores, K, axis=1)[:, :K]
        best_scores, best_ids = np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
    return best_ids


@dataclass
class Row:
    n: int
    dim: int
    factory: str
    rerank: int
    build_s: float
    build_mb: float
    file_mb: float
    calibrated: float | None
    recall: float
    p50_ms: float
    p99_ms: float
    commands: dict[str, tuple[float, float]]


def measure(real: Path, folder: Path, n: int, dim: int, factory: str | None = None) -> Row:
    generator = Generator(dim)
    index = folder / f"n{n}-d{dim}.h5"
    extend(real, index, n, generator)
    build_s, build_mb, _ = run(["faiss", str(index), *(["--factory", factory] if factory else [])])
    queries = normalize(generator.rows(n + 10**7, QUERIES))  # past the index's rows: held out
    faiss.omp_set_num_threads(2)
    with IndexReader(index) as reader:
        record = reader.info.faiss
        assert record is not None
        truth = exact_truth(reader.embeddings("layer4"), queries)
        similarity = open_vector_index(reader)
        similarity.search(queries[:20], K)  # a warm index, as in a notebook
        found, times = [], []
        for query in queries:
            tick = time.perf_counter()
            found.append(similarity.search(query[None], K)[1][0])
            times.append(time.perf_counter() - tick)
        similarity.close()
    recall = float(np.mean([len(np.intersect1d(f, t)) / K for f, t in zip(found, truth, strict=True)]))
    site = folder / f"site-{n}-{dim}"
    commands = {"info": run(["info", str(index)])[:2],
                "neuron": run(["neuron", str(index), "--layer", "layer4", "--unit", "7", "--json"])[:2],
                "similar --json": run(["similar", str(index), "--id", "5", "--json"])[:2],
                "atlas, 1 unit": run(["atlas", str(index), "--out", str(site), "--layers", "layer4", "--units",
                                      "7", "--device", "cpu"])[:2]}
    row = Row(n, dim, record.factory, record.rerank, build_s, build_mb, vector_index_path(index).stat().st_size / 1e6,
              record.recall_at_10, recall, 1e3 * float(np.percentile(times, 50)),
              1e3 * float(np.percentile(times, 99)), commands)
    index.unlink()
    vector_index_path(index).unlink()
    shutil.rmtree(site)
    return row


def print_table(rows: list[Row]) -> None:
    print(f"\n{'N':>9} {'D':>5} {'factory':<26} {'rerank':>6} {'build s':>8} {'build MB':>8} {'file MB':>8} "
          f"{'calib':>6} {'recall@10':>9} {'p50 ms':>7} {'p99 ms':>7}")
    for r in rows:
        calibrated = f"{r.calibrated:.3f}" if r.calibrated is not None else "exact"
        print(f"{r.n:>9} {r.dim:>5} {r.factory:<26} {r.rerank:>6} {r.build_s:>8.1f} {r.build_mb:>8.0f} "
              f"{r.file_mb:>8.1f} {calibrated:>6} {r.recall:>9.3f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f}")
    names = list(rows[0].commands)
    print(f"\n{'N':>9} {'D':>5} " + " ".join(f"{name + ' s / MB':>22}" for name in names))
    for r in rows:
        print(f"{r.n:>9} {r.dim:>5} " + " ".join(f"{r.commands[m][0]:>13.2f} / {r.commands[m][1]:>6.0f}"
                                                for m in names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1281167")
    parser.add_argument("--dims", default="512,1280,2048")
    parser.add_argument("--folder", type=Path, help="where to write the indexes (default: a temporary folder)")
    parser.add_argument("--factory", help="FAISS factory for every index (default: the size rule's choice)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, faiss {faiss.__version__}, python {sys.version.split()[0]}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        folder = Path(tmp)
        real = small_build(folder)
        rows = []
        for dim in (int(d) for d in args.dims.split(",")):
            for n in (int(s) for s in args.sizes.split(",")):
                rows.append(measure(real, folder, n, dim, args.factory))
                print_table(rows[-1:])
                sys.stdout.flush()
    print_table(rows)


if __name__ == "__main__":
    main()
