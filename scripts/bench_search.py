"""Vector search: recall@10 of the index `choose_factory` picks against exact search, and per-query latency.

At each size (default 10k, 100k, 1M vectors of 512 dimensions), on a seeded Gaussian mixture shaped like
pooled post-ReLU activations (non-negative cluster means, points clipped at zero):
  * build time of `build_vector_index` (sampling, training, adding, calibration of nprobe and re-rank depth);
  * recall@10 on 1000 held-out points of the same mixture (not in the index) against exact top-10
    (a faiss IndexFlatIP over the same normalized vectors, searched in one batch);
  * latency of single-query searches (one query at a time, as an interactive user asks), p50 and p99, for
    the chosen index (its candidates re-ranked exactly on the vectors, in memory here) and, side by side, for
    exact Flat search (on at most `--flat-seconds` worth of queries).
scripts/bench_scale.py measures the same on index files at ImageNet scale, re-ranking from the HDF5 file.
With `--demo INDEX.h5`, also on every `/embeddings/<layer>` of an actindex index, with 200 indexed vectors as
queries (each query's own row excluded from both result lists).

Targets: recall@10 >= 0.95 and p50 < 5 ms per query at 1M on a 2-core machine.

    python scripts/bench_search.py
    python scripts/bench_search.py --sizes 10000,100000 --demo demo-output/index.h5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import h5py
import numpy as np

from actindex.indexer.similarity import (
    SimilarityIndex,
    StoredVectors,
    build_vector_index,
    choose_factory,
    normalize,
    search,
)

K = 10


@dataclass
class Measured:
    """One vector index measured: what was built, its build time, recall@10 and single-query latency
    (bench_patches.py measures its indexes with these too)."""

    name: str
    n: int
    dim: int
    factory: str
    nprobe: int | None
    rerank: int
    build_s: float
    calibrated_recall: float | None
    recall: float
    p50_ms: float
    p99_ms: float

    @staticmethod
    def header(name: int = 16, factory: int = 26) -> str:
        """The shared columns' titles; `name` and `factory` are those columns' widths."""
        return (f"{'data':<{name}} {'n':>9} {'dim':>5} {'factory':<{factory}} {'nprobe':>6} {'rerank':>6} "
                f"{'build s':>8} {'calib r@10':>10} {'recall@10':>9} {'p50 ms':>7} {'p99 ms':>7}")

    def cells(self, name: int = 16, factory: int = 26) -> str:
        """This row's shared columns, under `header`."""
        calib = f"{self.calibrated_recall:.3f}" if self.calibrated_recall is not None else "exact"
        return (f"{self.name:<{name}} {self.n:>9} {self.dim:>5} {self.factory:<{factory}} {self.nprobe or '-':>6} "
                f"{self.rerank:>6} {self.build_s:>8.1f} {calib:>10} {self.recall:>9.3f} {self.p50_ms:>7.2f} "
                f"{self.p99_ms:>7.2f}")


@dataclass
class Row(Measured):
    """Measured, with exact (Flat) search's latency beside it."""

    flat_p50_ms: float
    flat_p99_ms: float
    flat_queries: int


def mixture(n: int, dim: int, clusters: int, seed: int, draw_seed: int, noise: float = 1.0, block: int = 65536,
            ) -> np.ndarray:
    """(n, dim) float32: relu(mean_c + noise * N(0, 1)), c uniform over `clusters` means from relu(N(0, 1)).

    noise 1.0 makes clusters overlap enough that IVF needs nprobe ~16-32 of 1024 for 0.95 (0.5 is solved
    by nprobe 1; 1.5 is close to structureless noise, where no IVF setting helps much).
    """
    means = np.maximum(np.random.default_rng(seed).standard_normal((clusters, dim), dtype=np.float32), 0)
    rng = np.random.default_rng(draw_seed)
    out = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, block):  # in blocks: a float64 1M x 512 temporary would take 4 GB
        b = min(n, a + block)
        out[a:b] = means[rng.integers(0, clusters, b - a)]
        out[a:b] += noise * rng.standard_normal((b - a, dim), dtype=np.float32)
    return np.maximum(out, 0, out=out)


def latencies_ms(index: SimilarityIndex, queries: np.ndarray, budget_s: float = np.inf) -> np.ndarray:
    """Milliseconds per single-query search, one query at a time, until `budget_s` is spent."""
    times = []
    started = time.perf_counter()
    for q in queries:
        t = time.perf_counter()
        index.search(q[None], K)
        times.append((time.perf_counter() - t) * 1e3)
        if time.perf_counter() - started > budget_s:
            break
    return np.array(times)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f[f >= 0], t[t >= 0])) / max(1, (t >= 0).sum())
                          for f, t in zip(found, truth, strict=True)]))


def without_self(ids: np.ndarray, own: np.ndarray) -> np.ndarray:
    """(Q, K + 1) ids -> (Q, K): each query's own row removed (or the last column, if absent)."""
    out = np.empty((len(ids), K), dtype=np.int64)
    for i, (row, me) in enumerate(zip(ids, own, strict=True)):
        out[i] = row[row != me][:K]
    return out


def exact_index(x: np.ndarray, block: int = 65536) -> faiss.Index:
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(x.shape[1]))
    for a in range(0, len(x), block):
        flat.add_with_ids(normalize(x[a:a + block]), np.arange(a, min(len(x), a + block), dtype=np.int64))
    return flat


def measure(name: str, x: np.ndarray, queries: np.ndarray, own: np.ndarray | None, flat_seconds: float) -> Row:
    """`own`: the queries' own row ids when they are indexed vectors (excluded from both result lists)."""
    built, info = build_vector_index(x)
    index = SimilarityIndex(built, StoredVectors(x), info.rerank)
    flat = exact_index(x)
    extra = 0 if own is None else 1
    _, truth = search(flat, queries, K + extra)  # one batch: BLAS, not the latency being measured
    _, found = index.search(queries, K + extra)
    if own is not None:
        truth, found = without_self(truth, own), without_self(found, own)
    ours = latencies_ms(index, queries)
    exact = latencies_ms(SimilarityIndex(flat), queries, flat_seconds)
    return Row(name, info.count, info.dim, info.factory, info.nprobe, info.rerank, info.seconds, info.recall_at_10,
               recall_at_k(found, truth), float(np.percentile(ours, 50)), float(np.percentile(ours, 99)),
               float(np.percentile(exact, 50)), float(np.percentile(exact, 99)), len(exact))


def demo_sets(path: str) -> Iterator[tuple[str, np.ndarray]]:
    with h5py.File(path, "r") as h5:
        for name in h5["embeddings"]:
            yield name, h5["embeddings"][name][...]


def print_table(rows: list[Row]) -> None:
    head = Measured.header() + f" {'flat p50':>8} {'flat p99':>8} {'speedup':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(r.cells() + f" {r.flat_p50_ms:>8.2f} {r.flat_p99_ms:>8.2f} {r.flat_p50_ms / r.p50_ms:>6.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--noise", type=float, default=1.0, help="within-cluster spread (cluster means ~ 0.4)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--flat-seconds", type=float, default=10.0, help="time budget for exact single queries")
    parser.add_argument("--demo", metavar="INDEX.h5", help="also on an actindex index's embeddings")
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: faiss's default)")
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; targets: recall@10 >= 0.95, "
          "p50 < 5 ms at 1M")
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        x = mixture(n, args.dim, args.clusters, seed=0, draw_seed=1, noise=args.noise)
        # Held out: the same means, other draws.
        queries = mixture(args.queries, args.dim, args.clusters, seed=0, draw_seed=2, noise=args.noise)
        print(f"{n} x {args.dim}: choose_factory -> {choose_factory(n, args.dim)}", flush=True)
        rows.append(measure(f"mixture-{n // 1000}k", x, queries, None, args.flat_seconds))
        del x
    if args.demo:
        for name, x in demo_sets(args.demo):
            valid = np.flatnonzero(np.isfinite(x).all(axis=1) & (x != 0).any(axis=1))
            own = np.random.default_rng(0).choice(valid, min(200, len(valid)), replace=False)
            rows.append(measure(f"demo:{name}", x, x[own], own, args.flat_seconds))
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
