"""Compressed indexes at scale: simimg's IVF-PQ + exact re-rank over vectors that never sit in RAM all at once.

    python benchmarks/scale.py --n 2000000 --dim 1024 --json      # 8.2 GB of shards on disk; ~5 min on 2 cores
    python benchmarks/scale.py --n 2000000 --dim 1024 --on-disk --json   # the same vectors, lists merged on disk
    python benchmarks/scale.py --n 20000 --dim 64 --queries 20 --json

1. Writes N embedding-like vectors (_common.EmbeddingLike) shard by shard in simimg's own shard format
   (vectors.py), and held-out queries; kept in --work and reused by a later run with the same shape.
2. Exact top-10 of every query, streamed shard by shard (faiss.knn + ResultHeap): the ground truth.
3. In a fresh child process (so its peaks are the build's own): the build simimg runs for `--index-kind ivfpq`
   (ann_ivfpq.build: train on a sample drawn across all shards, encode part by part, merge_from; or with
   --on-disk, merge_on_disk into the list file beside the index, as `simimg index --on-disk` publishes it).
4. In another fresh child process: the index read back as a reader reads it (ann.load_index: the lists
   memory-mapped when on disk), then single queries through the searcher a SearchService serves on --device
   (RefinedSearcher: IVF-PQ candidates, on faiss' GPU index where there is one, re-ranked from the memory-mapped
   shards). The build runs on the CPU either way.

index_bytes is the index's files (FAISS file and list file); flat_bytes is N x dim float32, what a flat or
IVF-Flat index holds. peak_rss_mib is the build process's high-water RSS, which counts the shard pages it read
through memory maps (page cache); peak_anon_mib is its anonymous memory alone. search_peak_rss_mib is the search
process's high-water RSS (the index, the list and shard pages it touched, the interpreter and libraries);
serving_rss_anon_mib its anonymous resident memory while it answers queries: the shards it re-ranks from, and
lists on disk, are page cache, shared and evictable.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from _common import EmbeddingLike, finish, hardware, median, parser
from simimg.models.device import resolve_device
from simimg.store import ann_ivfpq
from simimg.store.ann import VectorSearcher, load_index, make_searcher, save_index
from simimg.store.layout import lists_file
from simimg.store.vectors import StoredVectors, append_rows, rows_per_shard, shard_path

EMBEDDING = "synthetic"
K = 10


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000, help="gallery vectors")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--nprobe", default="16,32,64", help="comma list swept besides simimg's choice")
    p.add_argument(
        "--on-disk",
        action="store_true",
        help="merge the parts into an on-disk list file "
        "(faiss.contrib.ondisk), as for an index larger than RAM, and serve it memory-mapped",
    )
    p.add_argument("--work", help="where the shards go (default: a folder under the system temp dir, kept)")
    args = p.parse_args()
    work = Path(args.work or Path(tempfile.gettempdir()) / f"simimg-scale-{args.n}x{args.dim}")
    gen_s = _write_vectors(work, args.n, args.dim, args.queries)
    truth_s, truth = _ground_truth(work, args.n, args.dim)
    context = multiprocessing.get_context("spawn")  # fresh processes: each peak is the build's, or the search's
    with context.Pool(1, maxtasksperchild=1) as pool:
        built = pool.apply(_build, (str(work), args.n, args.dim, args.on_disk))
        device = str(resolve_device(args.device))
        served = pool.apply(_query, (str(work), args.n, args.dim, truth, _sweep(args.nprobe), args.on_disk, device))
    rows = served["rows"]
    chosen = next(r for r in rows if r["simimg"])
    summary = {
        "benchmark": "scale",
        "device": str(resolve_device(args.device)),
        "n": args.n,
        "dim": args.dim,
        "index": built["index"],
        "build_s": built["build_s"],
        "peak_rss_mib": built["peak_rss_mib"],
        "peak_anon_mib": built["peak_anon_mib"],
        "index_bytes": built["index_bytes"],
        "flat_bytes": args.n * args.dim * 4,
        "ratio_index_over_flat": built["index_bytes"] / (args.n * args.dim * 4),
        "recall_at_10": chosen["recall_at_10"],
        "ms_per_query": chosen["ms_per_query"],
        "p95_ms": chosen["p95_ms"],
        "nprobe": chosen["nprobe"],
        "refine_candidates": built["refine_candidates"],
        "on_disk": args.on_disk,
        "search_peak_rss_mib": served["search_peak_rss_mib"],
        "serving_rss_anon_mib": served["serving_rss_anon_mib"],
        "queries": args.queries,
        "generate_s": gen_s,
        "truth_s": truth_s,
        "rows": rows,
        "hardware": hardware(resolve_device(args.device)),
    }
    finish(
        f"scale: IVF-PQ + re-rank, N={args.n} x {args.dim} (ms per single query; recall@10 vs exact)",
        rows,
        summary,
        args.json,
    )


def _write_vectors(work: Path, n: int, dim: int, queries: int) -> float:
    """Shards of `n` vectors plus queries.npy; skipped when a finished set of this shape is there."""
    done = work / "done.json"
    shape = {"n": n, "dim": dim, "queries": queries}
    if done.exists() and json.loads(done.read_text()) == shape:
        return 0.0
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    vectors = EmbeddingLike(dim, max(10, n // 200))
    per_shard = rows_per_shard(dim)
    for shard, start in enumerate(range(0, n, per_shard)):
        rows = min(per_shard, n - start)
        for offset in range(0, rows, EmbeddingLike.CHUNK):
            append_rows(
                shard_path(work / EMBEDDING, shard), offset, vectors.draw(min(EmbeddingLike.CHUNK, rows - offset))
            )
    np.save(work / "queries.npy", vectors.draw(queries))
    (work / "truth.npy").unlink(missing_ok=True)
    done.write_text(json.dumps(shape))
    return round(time.perf_counter() - started, 1)


def _stored(work: Path, n: int, dim: int) -> StoredVectors:
    """Ids 0..n-1 in shard order: the same lookup a catalog hands a SearchService."""
    ids = np.arange(n, dtype=np.int64)
    per_shard = rows_per_shard(dim)
    return StoredVectors(work, EMBEDDING, dim, ids, ids // per_shard, ids % per_shard)


def _ground_truth(work: Path, n: int, dim: int) -> tuple[float, np.ndarray]:
    path = work / "truth.npy"
    if path.exists():
        return 0.0, np.load(path)
    started = time.perf_counter()
    queries = np.load(work / "queries.npy")
    heap = faiss.ResultHeap(len(queries), K, keep_max=True)
    stored = _stored(work, n, dim)
    for part in ann_ivfpq.part_ranges(n):
        ids = stored.ids[part]
        scores, at = faiss.knn(queries, stored(ids), K, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, ids[at])
    heap.finalize()
    np.save(path, heap.I)
    return round(time.perf_counter() - started, 1), heap.I


def _build(work: str, n: int, dim: int, on_disk: bool) -> dict:
    """The build simimg runs, its file written as `simimg index` writes it; in a fresh process, for its peaks."""
    stored = _stored(Path(work), n, dim)
    folder = Path(work) / ("ivfpq-on-disk" if on_disk else "ivfpq")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    started = time.perf_counter()
    with _PeakAnon() as peak_anon:
        lists = lists_file(folder / "index.faiss") if on_disk else None
        index = ann_ivfpq.build(dim, stored.ids, stored, on_disk=lists)
        save_index(index, folder / "index.faiss")
    where = " (lists on disk)" if on_disk else ""
    return {
        "index": f"IVF{index.nlist},PQ{index.pq.M} + re-rank of {ann_ivfpq.candidates_for(K)}{where}",
        "build_s": round(time.perf_counter() - started, 1),
        "index_bytes": sum(f.stat().st_size for f in folder.iterdir()),
        "refine_candidates": ann_ivfpq.candidates_for(K),
        "nprobe": index.nprobe,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_anon_mib": peak_anon.mib,
    }


def _query(work: str, n: int, dim: int, truth: np.ndarray, nprobes: list[int], on_disk: bool, device: str) -> dict:
    """What a reader does, in another fresh process: load the index (the lists memory-mapped when on disk), then
    single queries through the searcher a SearchService serves on `device`."""
    stored = _stored(Path(work), n, dim)
    index = load_index(Path(work) / ("ivfpq-on-disk" if on_disk else "ivfpq") / "index.faiss")
    chosen = index.nprobe
    searcher = make_searcher(index, torch.device(device), stored)
    queries = np.load(Path(work) / "queries.npy")
    rows = []
    for nprobe in sorted({chosen, *nprobes}):
        faiss.extract_index_ivf(index).nprobe = nprobe
        rows.append({"nprobe": nprobe, "simimg": nprobe == chosen, **_measure(searcher, queries, truth)})
    return {
        "rows": rows,
        "search_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "serving_rss_anon_mib": _rss_anon_mib(),
    }


def _measure(searcher: VectorSearcher, queries: np.ndarray, truth: np.ndarray) -> dict:
    """One query at a time (the app's path): median and p95 ms, recall@10 against exact search."""
    searcher.search(queries[:1], K)
    times, hits = [], 0
    for i in range(len(queries)):
        start = time.perf_counter()
        _, ids = searcher.search(queries[i : i + 1], K)
        times.append((time.perf_counter() - start) * 1e3)
        hits += len(np.intersect1d(ids[0], truth[i]))
    return {
        "ms_per_query": round(median(times), 3),
        "p95_ms": round(float(np.percentile(times, 95)), 3),
        "recall_at_10": round(hits / (len(queries) * K), 4),
    }


class _PeakAnon:
    """The highest anonymous RSS seen while the block runs, polled every 50 ms: peak RSS proper also counts the
    shard pages the build read through its memory maps, which are page cache the kernel can take back."""

    def __enter__(self) -> _PeakAnon:
        self.mib, self._stop = _rss_anon_mib(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self.mib = max(self.mib, _rss_anon_mib())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _rss_anon_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return round(int(line.split()[1]) / 1024)
    return -1


def _sweep(spec: str) -> list[int]:
    return [int(v) for v in spec.split(",") if v]


if __name__ == "__main__":
    main()
