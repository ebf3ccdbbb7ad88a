"""Patch search: recall@10, per-query latency, bytes per vector and build time of the FAISS index over per-position
CNN feature vectors (one vector per image and spatial position, e.g. 7 x 7 = 49 a 224-pixel image at stride 32).

On `--images x --positions` seeded synthetic vectors of `--dim` dimensions, stored as float16 (the library stores
patch vectors as float16; `StoredVectors` hands back float32 rows), generated in blocks, of one of two kinds:
  * `--data patchlike` (the default): `patchlike`, relu(cluster mean + within-cluster spread - bias) with a
    decaying PCA spectrum in a random rotation, its three parameters chosen so that its statistics match those
    measured on real patch vectors (the demo's EfficientNet-Lite0 `bn2`, 7 x 7 x 1280; `--spectrum` prints both):
    share of variance in the top 16 / 64 / 128 / 256 principal components 0.36 / 0.55 / 0.68 / 0.84 (real: 0.38 /
    0.60 / 0.71 / 0.82), mean cosine between vectors 0.13 (0.09), mean cosine of the 10 nearest 0.69 (0.71);
  * `--data mixture`: bench_search's `mixture` (non-negative cluster means, isotropic noise, clipped at zero), a
    far harder case than real features: its variance is spread flat (0.05 / 0.17 / 0.33 / 0.59), so 4-bit codes
    of a PCA rotation cannot tell neighbours apart; measured too, to show where the rule stops working.
  * exact ground truth: the top-10 cosines of `--queries` held-out draws of the same mixture (not in the index),
    computed blockwise in numpy (float32 matmul of normalized queries and blocks, a running top-10), never as a
    faiss Flat over everything (4.9M x 512 float32 would take 10 GB); its time is printed;
  * for each `--factory` (default `auto`: `choose_factory(n, dim, --max-bytes, PATCH_MEMORY)`, e.g.
    `PCAR256,IVF1024,PQ64x4fs`): build time of `build_vector_index` (sampling, training, adding, calibration of
    nprobe and re-rank depth), the calibrated nprobe, re-rank factor and recall, recall@10 of `SimilarityIndex`
    (candidates re-ranked exactly on the float16 vectors, in memory here) searched in one batch, single-query
    latency p50 / p99 (one query at a time, as an interactive user asks), and the FAISS file's size per vector
    (`faiss.write_index` to a temporary file; codes, ids, inverted lists, PCA matrix and all);
  * on paper, for ImageNet train (1,281,167 images) at 7 x 7 and 14 x 14 positions and 512, 1024, 2048 dims:
    what `choose_factory` picks, its codes + 8-byte ids per vector and in all (in RAM while searching), and the
    float16 vectors on disk (2 bytes x dim x count) that candidates are re-ranked on.
With `--demo INDEX.h5`, also on every `/patches/<layer>` of an actindex index ((N*H*W, C) float16, row =
image*H*W + y*W + x; NaN and all-zero rows are not indexed), read from the file as a build would, with 200 indexed
vectors as queries (each query's own row excluded from both result lists).

Synthetic positions are independent draws: real patches of one image are correlated with each other, which this
does not model.

Targets (at 100k images x 49 positions = 4.9M vectors of 512): recall@10 >= 0.9, p50 <= 20 ms per single query,
<= 64 bytes a vector.

    python scripts/bench_patches.py --images 2000 --spectrum
    python scripts/bench_patches.py --images 100000 --positions 49 --dim 512 --threads 2
    python scripts/bench_patches.py --factory auto --factory PCAR192,IVF1024,PQ96x4fs --demo demo-output/index.h5
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass

import faiss
import h5py
import numpy as np
from bench_search import K, Measured, latencies_ms, mixture, recall_at_k, without_self

from actindex.indexer.similarity import (
    PATCH_MEMORY,
    PATCH_RECALL,
    SimilarityIndex,
    StoredVectors,
    VectorSource,
    build_vector_index,
    choose_factory,
    normalize,
)

TARGET_RECALL = 0.9
TARGET_P50_MS = 20.0
IMAGENET_TRAIN = 1_281_167
PAPER_POSITIONS = (7 * 7, 14 * 14)
PAPER_DIMS = (512, 1024, 2048)
DEMO_QUERIES = 200
SWEEP_NPROBE = (64, 128, 256, 512, 1024, 2048)
SWEEP_RERANK = (64, 128, 256)
SWEEP_LATENCY_QUERIES = 100
BLOCK = 65536  # rows per block: 64 MB of float16 at 512 dims, 128 MB once float32


@dataclass
class Row(Measured):
    """Measured, with the FAISS file's size."""

    file_bytes: int

    @property
    def bytes_per_vector(self) -> float:
        return self.file_bytes / max(1, self.n)

    def meets(self, max_bytes: int) -> bool:
        return self.recall >= TARGET_RECALL and self.p50_ms <= TARGET_P50_MS and self.bytes_per_vector <= max_bytes


def patchlike(n: int, dim: int, clusters: int, seed: int, draw_seed: int, decay: float = 1.3, spread: float = 0.5,
              bias: float = 1.0) -> np.ndarray:
    """(n, dim) float32: relu(mean_c + spread * e + 0.05 * noise - bias), c uniform over `clusters`; the means and e
    are Gaussian with per-dimension standard deviations k^(-decay / 2) (k = 1 … dim, scaled to unit mean variance)
    in a random rotation: a decaying PCA spectrum, as real CNN features have (see the module docstring)."""
    setup = np.random.default_rng(seed)
    scale = np.arange(1, dim + 1, dtype=np.float64) ** (-decay / 2)
    scale = (scale * np.sqrt(dim / (scale ** 2).sum())).astype(np.float32)  # (D,)
    rotation = np.linalg.qr(setup.standard_normal((dim, dim)))[0].astype(np.float32)  # (D, D)
    means = (setup.standard_normal((clusters, dim), dtype=np.float32) * scale) @ rotation  # (clusters, D)
    rng = np.random.default_rng(draw_seed)
    out = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, BLOCK):
        b = min(n, a + BLOCK)
        spread_draw = (rng.standard_normal((b - a, dim), dtype=np.float32) * scale) @ rotation  # (B, D)
        out[a:b] = means[rng.integers(0, clusters, b - a)] + spread * spread_draw
        out[a:b] += 0.05 * rng.standard_normal((b - a, dim), dtype=np.float32) - bias
    return np.maximum(out, 0, out=out)


def draw(kind: str, n: int, dim: int, clusters: int, noise: float, draw_seed: int) -> np.ndarray:
    """(n, dim) float32 of `kind` ('patchlike' or 'mixture'), means from seed 0."""
    if kind == "patchlike":
        return patchlike(n, dim, clusters, seed=0, draw_seed=draw_seed)
    return mixture(n, dim, clusters, seed=0, draw_seed=draw_seed, noise=noise)


def synthetic(kind: str, n: int, dim: int, clusters: int, noise: float) -> np.ndarray:
    """(n, dim) float16 of `kind`, generated BLOCK rows at a time: float32 only per block."""
    out = np.empty((n, dim), dtype=np.float16)
    for i, a in enumerate(range(0, n, BLOCK)):
        b = min(n, a + BLOCK)
        # Block i draws with its own seed (10000 + i); the held-out queries use draw_seed 2.
        out[a:b] = draw(kind, b - a, dim, clusters, noise, 10_000 + i)
    return out


def statistics(x: np.ndarray, sample: int = 20_000) -> str:
    """Share of variance in the top 16 / 64 / 128 / 256 principal components of the normalized valid rows, mean
    cosine between rows, and mean cosine of each of 500 rows' 10 nearest others (in a sample of `sample` rows)."""
    rows = np.asarray(x[:sample], dtype=np.float64)
    rows = rows[valid_rows(rows)]
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    variance = np.sort(np.linalg.eigvalsh(np.cov(rows, rowvar=False)))[::-1]
    share = np.cumsum(variance) / variance.sum()
    cosines = rows[:500] @ rows.T  # (500, S)
    cosines[np.arange(len(cosines)), np.arange(len(cosines))] = -np.inf
    nearest = np.sort(cosines, axis=1)[:, -K:].mean()
    mean = cosines[np.isfinite(cosines)].mean()
    tops = " / ".join(f"{share[min(k, len(share)) - 1]:.2f}" for k in (16, 64, 128, 256))
    return f"variance in top 16 / 64 / 128 / 256 components {tops}, mean cosine {mean:.2f}, 10 nearest {nearest:.2f}"


def valid_rows(rows: np.ndarray) -> np.ndarray:
    """(B,) bool: the rows the index holds (finite and not all zero)."""
    return np.isfinite(rows).all(axis=1) & (rows != 0).any(axis=1)


def exact_top(vectors: VectorSource, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) ids of the exact top-k cosines over the valid rows of `vectors`, best first; -1 where fewer."""
    q = normalize(queries)  # (Q, D)
    best_scores = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(q), k), -1, dtype=np.int64)
    n = vectors.shape[0]
    for a in range(0, n, BLOCK):
        rows = np.asarray(vectors[a:min(n, a + BLOCK)], dtype=np.float32)  # (B, D)
        scores = q @ normalize(rows).T  # (Q, B)
        scores[:, ~valid_rows(rows)] = -np.inf  # NaN and zero rows are not indexed
        if scores.shape[1] > k:
            top = np.argpartition(scores, scores.shape[1] - k, axis=1)[:, -k:]  # (Q, k), unordered
        else:
            top = np.broadcast_to(np.arange(scores.shape[1]), (len(q), scores.shape[1]))
        both_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, axis=1)], axis=1)
        both_ids = np.concatenate([best_ids, top + a], axis=1)
        order = np.lexsort((both_ids, -both_scores), axis=1)[:, :k]  # best first, ties to the lower id
        best_scores = np.take_along_axis(both_scores, order, axis=1)
        best_ids = np.take_along_axis(both_ids, order, axis=1)
    return np.where(np.isfinite(best_scores), best_ids, -1)


@dataclass
class SweepRow:
    name: str
    factory: str
    nprobe: int
    rerank: int
    recall: float
    p50_ms: float
    p99_ms: float
    bytes_per_vector: float

    def meets(self, max_bytes: int) -> bool:
        return self.recall >= TARGET_RECALL and self.p50_ms <= TARGET_P50_MS and self.bytes_per_vector <= max_bytes


def sweep(name: str, built: faiss.Index, x: VectorSource, factory: str, queries: np.ndarray, want: np.ndarray,
          own: np.ndarray | None, bytes_per_vector: float) -> list[SweepRow]:
    """Recall@10 and single-query latency (first SWEEP_LATENCY_QUERIES queries) over a grid of nprobe x re-rank
    factor, beyond what the build's calibration tries (it stops at 64): what deeper re-ranking buys. `want`: the
    exact top-K, each query's own row (`own`) already left out."""
    try:
        ivf = faiss.extract_index_ivf(built)
    except RuntimeError:
        return []
    calibrated = int(ivf.nprobe)
    probes = sorted({p for p in SWEEP_NPROBE if p <= ivf.nlist} | {calibrated})
    extra = 0 if own is None else 1
    out = []
    for nprobe in probes:
        ivf.nprobe = nprobe
        for rerank in SWEEP_RERANK:
            index = SimilarityIndex(built, StoredVectors(x), rerank)
            _, found = index.search(queries, K + extra)
            if own is not None:
                found = without_self(found, own)
            times = latencies_ms(index, queries[:SWEEP_LATENCY_QUERIES])
            index.close()
            out.append(SweepRow(name, factory, nprobe, rerank, recall_at_k(found, want),
                                float(np.percentile(times, 50)), float(np.percentile(times, 99)), bytes_per_vector))
            print(f"    sweep nprobe {nprobe:>5} rerank {rerank:>4}: recall@10 {out[-1].recall:.3f}, "
                  f"p50 {out[-1].p50_ms:.2f} ms", flush=True)
    ivf.nprobe = calibrated
    return out


def file_bytes(index: faiss.Index) -> int:
    """Size of the index as `faiss.write_index` writes it."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "index.faiss")
        faiss.write_index(index, path)
        return os.path.getsize(path)


def measure(name: str, x: VectorSource, factory: str, queries: np.ndarray, truth: np.ndarray,
            own: np.ndarray | None, with_sweep: bool = False) -> tuple[Row, list[SweepRow]]:
    """`truth`: exact top-K (top-(K + 1) with `own`, the queries' own row ids, excluded from both lists)."""
    print(f"  {name}: building '{factory}' ...", flush=True)
    built, info = build_vector_index(x, factory, target_recall=PATCH_RECALL)  # as the build calibrates
    if info.note:
        print(f"  note: {info.note}")
    index = SimilarityIndex(built, StoredVectors(x), info.rerank)
    try:
        extra = 0 if own is None else 1
        _, found = index.search(queries, K + extra)  # one batch
        want = truth if own is None else without_self(truth, own)
        if own is not None:
            found = without_self(found, own)
        times = latencies_ms(index, queries)
    finally:
        index.close()
    row = Row(name, info.count, info.dim, info.factory, info.nprobe, info.rerank, info.seconds, info.recall_at_10,
              recall_at_k(found, want), float(np.percentile(times, 50)), float(np.percentile(times, 99)),
              file_bytes(built))
    print(f"  built in {row.build_s:.1f} s: nprobe {row.nprobe}, rerank {row.rerank}, recall@10 {row.recall:.3f}, "
          f"p50 {row.p50_ms:.2f} ms, {row.bytes_per_vector:.1f} B/vector", flush=True)
    sweeps = sweep(name, built, x, info.factory, queries, want, own, row.bytes_per_vector) if with_sweep else []
    return row, sweeps


def factories_for(requested: list[str], n: int, dim: int, max_bytes: int) -> list[str]:
    """`auto` -> choose_factory(n, dim, max_bytes); others as given; duplicates dropped, order kept."""
    chosen = [choose_factory(n, dim, max_bytes, PATCH_MEMORY) if f == "auto" else f for f in requested]
    return list(dict.fromkeys(chosen))


def code_bytes(factory: str, dim: int) -> int:
    """Bytes an index of `factory` keeps per vector: its code, plus an 8-byte id in an IVF."""
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    try:
        return int(faiss.extract_index_ivf(index).code_size) + 8
    except RuntimeError:  # not an IVF: an id map's 8 bytes beside the codes
        return int(index.sa_code_size()) + 8


def print_table(rows: list[Row], max_bytes: int) -> None:
    head = Measured.header(18, 28) + f" {'B/vector':>8} {'targets':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(r.cells(18, 28) + f" {r.bytes_per_vector:>8.1f} {'met' if r.meets(max_bytes) else 'MISSED':>7}")


def print_sweep(rows: list[SweepRow], max_bytes: int) -> None:
    head = (f"{'data':<18} {'factory':<28} {'nprobe':>6} {'rerank':>6} {'candidates':>10} {'recall@10':>9} "
            f"{'p50 ms':>7} {'p99 ms':>7} {'B/vector':>8} {'targets':>7}")
    print(f"Sweep beyond the calibration (latency on the first {SWEEP_LATENCY_QUERIES} queries):")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.name:<18} {r.factory:<28} {r.nprobe:>6} {r.rerank:>6} {K * r.rerank:>10} {r.recall:>9.3f} "
              f"{r.p50_ms:>7.2f} {r.p99_ms:>7.2f} {r.bytes_per_vector:>8.1f} "
              f"{'met' if r.meets(max_bytes) else 'MISSED':>7}")


def print_paper(max_bytes: int, overrides: list[str]) -> None:
    """ImageNet train on paper: index RAM (codes + ids) and float16 vectors on disk."""
    print(f"On paper: ImageNet train ({IMAGENET_TRAIN:,} images), choose_factory(n, dim, {max_bytes}, 16 GB)")
    head = (f"{'positions':>9} {'dim':>5} {'vectors':>13} {'factory':<28} {'B/vector':>8} {'codes+ids GB':>12} "
            f"{'float16 GB':>10}")
    print(head)
    print("-" * len(head))
    for positions in PAPER_POSITIONS:
        count = IMAGENET_TRAIN * positions
        side = round(positions ** 0.5)
        for dim in PAPER_DIMS:
            factory = choose_factory(count, dim, max_bytes, PATCH_MEMORY)
            per = code_bytes(factory, dim)
            print(f"{f'{side}x{side}':>9} {dim:>5} {count:>13,} {factory:<28} {per:>8} {per * count / 1e9:>12.1f} "
                  f"{2 * dim * count / 1e9:>10.1f}")
    for factory in overrides:
        per = code_bytes(factory, max(PAPER_DIMS))
        sizes = ", ".join(f"{round(p ** 0.5)}x{round(p ** 0.5)}: {per * IMAGENET_TRAIN * p / 1e9:.1f} GB"
                          for p in PAPER_POSITIONS)
        print(f"  '{factory}': {per} B/vector of codes + ids -> {sizes}")


def demo(path: str, requested: list[str], max_bytes: int, with_sweep: bool, spectrum: bool = False,
         ) -> tuple[list[Row], list[SweepRow]]:
    rows: list[Row] = []
    sweeps: list[SweepRow] = []
    with h5py.File(path, "r") as h5:  # read-only: StoredVectors reads contiguous float16 rows with pread
        group = h5.get("patches")
        if not isinstance(group, h5py.Group) or not len(group):
            print(f"{path}: no /patches group (built without patch vectors); demo skipped")
            return rows, sweeps
        for layer, dataset in group.items():
            if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 2:
                continue
            n, dim = dataset.shape
            if spectrum:
                print(f"  demo:{layer}: {statistics(dataset)}", flush=True)
            valid = np.concatenate([np.flatnonzero(valid_rows(np.asarray(dataset[a:min(n, a + BLOCK)],
                                                                         dtype=np.float32))) + a
                                    for a in range(0, n, BLOCK)]) if n else np.zeros(0, dtype=np.int64)
            if len(valid) <= K:
                print(f"demo:{layer}: {len(valid)} valid rows of {n}; skipped")
                continue
            own = np.sort(np.random.default_rng(0).choice(valid, min(DEMO_QUERIES, len(valid)), replace=False))
            queries = np.asarray(dataset[own], dtype=np.float32)  # h5py reads increasing ids
            started = time.perf_counter()
            truth = exact_top(dataset, queries, K + 1)
            print(f"demo:{layer}: {len(valid)} valid of {n} x {dim} ({dataset.dtype}); exact top-{K + 1} of "
                  f"{len(own)} queries in {time.perf_counter() - started:.1f} s", flush=True)
            for factory in factories_for(requested, len(valid), dim, max_bytes):
                row, swept = measure(f"demo:{layer}", dataset, factory, queries, truth, own, with_sweep)
                rows.append(row)
                sweeps += swept
    return rows, sweeps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--positions", type=int, default=49, help="vectors per image (7 x 7 = 49)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--data", choices=("patchlike", "mixture"), default="patchlike",
                        help="synthetic vectors: matched to real patch vectors' statistics, or bench_search's mixture")
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--noise", type=float, default=1.0, help="mixture: within-cluster spread (means ~ 0.4)")
    parser.add_argument("--spectrum", action="store_true",
                        help="print the synthetic and the demo's vectors' statistics (PCA spectrum, cosines)")
    parser.add_argument("--queries", type=int, default=500, help="held-out queries (recall and latency)")
    parser.add_argument("--factory", action="append", metavar="F",
                        help="index factory to measure; repeat to compare several side by side ('auto': "
                             "choose_factory(n, dim, max_bytes)); default: auto")
    parser.add_argument("--max-bytes", type=int, default=64, help="code + id bytes a vector may take")
    parser.add_argument("--demo", metavar="INDEX.h5", help="also on an actindex index's /patches/<layer>")
    parser.add_argument("--sweep", action="store_true",
                        help="also recall and latency over nprobe x re-rank factors (up to 256) beyond the calibration")
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: faiss's default)")
    args = parser.parse_args()
    requested = args.factory or ["auto"]
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; targets: recall@10 >= {TARGET_RECALL}, "
          f"p50 <= {TARGET_P50_MS:g} ms, <= {args.max_bytes} B/vector", flush=True)
    rows: list[Row] = []
    sweeps: list[SweepRow] = []
    n = args.images * args.positions
    if n:
        started = time.perf_counter()
        x = synthetic(args.data, n, args.dim, args.clusters, args.noise)
        queries = draw(args.data, args.queries, args.dim, args.clusters, args.noise, draw_seed=2)
        print(f"{args.images} images x {args.positions} positions = {n} x {args.dim} float16 {args.data} "
              f"({x.nbytes / 1e9:.2f} GB) generated in {time.perf_counter() - started:.1f} s", flush=True)
        if args.spectrum:
            print(f"  {args.data}: {statistics(x)}", flush=True)
        started = time.perf_counter()
        truth = exact_top(x, queries, K)
        print(f"exact top-{K} of {len(queries)} queries (blockwise numpy) in {time.perf_counter() - started:.1f} s",
              flush=True)
        name = f"{args.data}-{args.images // 1000}kx{args.positions}" if args.images >= 1000 else \
            f"{args.data}-{args.images}x{args.positions}"
        for factory in factories_for(requested, n, args.dim, args.max_bytes):
            row, swept = measure(name, x, factory, queries, truth, None, args.sweep)
            rows.append(row)
            sweeps += swept
        del x
    if args.demo:
        demo_rows, demo_sweeps = demo(args.demo, requested, args.max_bytes, args.sweep, args.spectrum)
        rows += demo_rows
        sweeps += demo_sweeps
    print()
    if rows:
        print_table(rows, args.max_bytes)
        print()
    if sweeps:
        print_sweep(sweeps, args.max_bytes)
        print()
    print_paper(args.max_bytes, [f for f in requested if f != "auto"])


if __name__ == "__main__":
    main()
