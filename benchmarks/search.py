"""Search speed and recall@k of simimg's index kinds against exact Flat search, on embedding-like vectors.

    python benchmarks/search.py --n 200000 --dim 1024 --json
    python benchmarks/search.py --n 1000000 --dim 1024 --queries 100 --json        # 8 GB of RAM
    python benchmarks/search.py --device cuda --n 1000000 --json                    # adds simimg's GPU search

The vectors are not uniform noise (on which every ANN index looks bad and nothing like real use): they are
unit-length, share a positive mean direction like pooled ReLU features do, and sit in clusters of uneven size
(Zipf) inside a low-rank subspace, plus per-image noise. Queries are fresh draws, not gallery members.
Times are per single query (the app's path), median over the queries; recall@k is against exact search.
"""

from __future__ import annotations

import time

import faiss
import numpy as np

from _common import EmbeddingLike, finish, hardware, median, parser
from simimg.models.device import resolve_device
from simimg.store.ann import (
    FaissSearcher,
    TorchFlatSearcher,
    VectorSearcher,
    build_ann,
    index_kind_for,
    ivf_lists_for,
    make_searcher,
)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="gallery vectors")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--clusters", type=int, default=0, help="default: n / 200")
    p.add_argument("--nprobe", default="auto", help="comma list of nprobe values to sweep besides simimg's choice")
    p.add_argument("--hnsw", action="store_true", help="also build and sweep HNSW (slow to build on few cores)")
    args = p.parse_args()
    device = resolve_device(args.device)
    started = time.perf_counter()
    gallery, queries = embedding_like(args.n, args.queries, args.dim, args.clusters or max(10, args.n // 200))
    _, truth = faiss.knn(queries, gallery, args.k, metric=faiss.METRIC_INNER_PRODUCT)
    ids = np.arange(args.n, dtype=np.int64)
    rows = [_measure("flat (faiss exact)", _ExactSearcher(gallery), queries, truth, args.k, limit=20)]
    if device.type == "cuda":
        rows.append(_measure("flat (torch, GPU)", TorchFlatSearcher(ids, gallery, device), queries, truth, args.k))
    build = time.perf_counter()
    ivf = build_ann(ids, gallery, args.dim, "ivf")
    build = time.perf_counter() - build
    chosen = faiss.extract_index_ivf(ivf).nprobe
    for nprobe in sorted({chosen, *_sweep(args.nprobe, ivf_lists_for(args.n))}):
        faiss.extract_index_ivf(ivf).nprobe = nprobe
        rows.append(
            _measure(
                f"ivf nprobe={nprobe}" + (" (simimg)" if nprobe == chosen else ""),
                FaissSearcher(ivf),
                queries,
                truth,
                args.k,
            )
        )
    faiss.extract_index_ivf(ivf).nprobe = chosen
    gpu = {}
    if device.type == "cuda":  # what a SearchService on this GPU serves the IVF index with
        searcher = make_searcher(ivf, device)
        rows.append(_measure(f"simimg on {device} ({type(searcher).__name__})", searcher, queries, truth, args.k))
        gpu = {
            "gpu_searcher": type(searcher).__name__,
            "gpu_ms_per_query": rows[-1]["ms_per_query"],
            "gpu_recall_at_k": rows[-1]["recall_at_k"],
        }
    if args.hnsw:
        rows += _hnsw_rows(gallery, queries, truth, args.k)
    simimg_row = next(r for r in rows if r["index"].endswith("(simimg)"))
    summary = {
        "benchmark": "search",
        "device": str(device),
        "N": args.n,
        "dim": args.dim,
        "k": args.k,
        "queries": args.queries,
        "simimg_kind_at_N": index_kind_for(args.n),
        "ivf_nlist": ivf_lists_for(args.n),
        "ivf_nprobe": chosen,
        "ivf_build_s": round(build, 1),
        "ivf_ms_per_query": simimg_row["ms_per_query"],
        "ivf_recall_at_k": simimg_row["recall_at_k"],
        "flat_ms_per_query": rows[0]["ms_per_query"],
        "ratio_flat_over_ivf_ms": rows[0]["ms_per_query"] / simimg_row["ms_per_query"],
        **gpu,
        "total_s": round(time.perf_counter() - started, 1),
        "rows": rows,
        "hardware": hardware(device),
    }
    finish(
        f"search, N={args.n} x {args.dim}, k={args.k} (ms per single query; recall@k vs exact)",
        rows,
        summary,
        args.json,
    )


def embedding_like(n: int, queries: int, dim: int, clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """(gallery, queries) from one EmbeddingLike draw (see _common.py)."""
    vectors = EmbeddingLike(dim, clusters)
    return vectors.draw(n), vectors.draw(queries)


class _ExactSearcher:
    """faiss's exact inner-product kernel over the gallery array (what IndexFlatIP runs), without a copy."""

    def __init__(self, gallery: np.ndarray) -> None:
        self.gallery = gallery

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return faiss.knn(queries, self.gallery, k, metric=faiss.METRIC_INNER_PRODUCT)


def _measure(
    name: str, searcher: VectorSearcher, queries: np.ndarray, truth: np.ndarray, k: int, limit: int | None = None
) -> dict:
    """Median ms per single query, and recall@k against `truth`, over the first `limit` queries."""
    searcher.search(queries[:1], k)
    times, hits = [], 0
    for i in range(min(limit or len(queries), len(queries))):
        start = time.perf_counter()
        _, ids = searcher.search(queries[i : i + 1], k)
        times.append((time.perf_counter() - start) * 1e3)
        hits += len(np.intersect1d(ids[0], truth[i]))
    return {
        "index": name,
        "ms_per_query": round(median(times), 3),
        "p95_ms": round(float(np.percentile(times, 95)), 3),
        "recall_at_k": round(hits / (len(times) * k), 4),
    }


def _sweep(spec: str, nlist: int) -> list[int]:
    if spec != "auto":
        return [int(v) for v in spec.split(",")]
    return [v for v in (4, 8, 16, 32, 64, 128, 256) if v <= nlist]


def _hnsw_rows(gallery: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int) -> list[dict]:
    start = time.perf_counter()
    index = faiss.IndexHNSWFlat(gallery.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.add(gallery)
    built = round(time.perf_counter() - start, 1)
    rows = []
    for ef in (16, 32, 64, 128):
        index.hnsw.efSearch = ef
        rows.append(_measure(f"hnsw M=32 ef={ef} (built in {built} s)", FaissSearcher(index), queries, truth, k))
    return rows


if __name__ == "__main__":
    main()
