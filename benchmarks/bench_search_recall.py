"""(f) Retrieval on real embeddings: recall@3 of the bank's usearch HNSW graph against the exact scan, and how often
the top 3 holds a window of the question's own document ("gold"), for a few connectivity / expansion_add /
expansion_search settings; single-query latency (as `GradientBank.search` makes them), build time with one thread
(as a bank inserts), and memory per document. Prints a table and writes benchmarks/results/search_recall.json.

    python benchmarks/search_corpus.py                 # once, untimed: embeds and caches the corpus (resumable)
    flock /work/wt/bench.lock python benchmarks/bench_search_recall.py [--builds 16:128 32:128] \\
        [--expansion_search 64 128 256]

The corpus (benchmarks/search_corpus.py): SQuAD, HotpotQA and TOFU texts cut into overlapping word windows,
embedded with the bank's default embedder (all-MiniLM-L6-v2); queries are 3,000 of their questions. The exact top 3
of each query comes from a float32 matrix product over every stored vector; "HNSW recall@3" is the overlap of the
graph's top 3 with it. The exact scan's own latency is that of `Index.search(exact=True)`, the bank's path up to
`EXACT_SEARCH_MAX_DOCUMENTS`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import usearch
from bench_record import write_record
from usearch.index import Index

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_corpus import STRIDE, WINDOW, embedded  # noqa: E402

from regrad_hf.bank.index import DEFAULT_INDEX_SETTINGS, EXACT_SEARCH_MAX_DOCUMENTS, INDEX_DTYPE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
K = 3


def exact_top(passages: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row indices of each query's `k` most similar passages (vectors are normalised: cosine = dot product)."""
    top = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 256):
        scores = queries[start : start + 256] @ passages.T
        best = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1)
        top[start : start + 256] = np.take_along_axis(best, order, axis=1)
    return top


def single_queries(index: Index, queries: np.ndarray, exact: bool) -> tuple[list[np.ndarray], np.ndarray]:
    """Each query searched alone, as `GradientBank.search` does for one question: found keys and seconds."""
    found, seconds = [], np.empty(len(queries))
    for row, query in enumerate(queries):
        start = time.perf_counter()
        matches = index.search(query, K, exact=exact)
        seconds[row] = time.perf_counter() - start
        found.append(matches.keys)
    return found, seconds


def quality(found: list[np.ndarray], seconds: np.ndarray, truth: np.ndarray, owner: np.ndarray, gold: list) -> dict:
    overlap = [len(set(keys.tolist()) & set(truth[row].tolist())) / K for row, keys in enumerate(found)]
    gold_hits = [bool(set(owner[keys].tolist()) & gold[row]) for row, keys in enumerate(found) if gold[row]]
    return {
        "recall_at_3_vs_exact": float(np.mean(overlap)),
        "gold_in_top_3": float(np.mean(gold_hits)),
        "search_ms_median": float(np.median(seconds) * 1e3),
        "search_ms_p99": float(np.percentile(seconds, 99) * 1e3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", nargs="+", default=["16:128", "32:128"], help="connectivity:expansion_add")
    parser.add_argument("--expansion_search", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--exact_queries", type=int, default=300, help="queries timed with the exact scan")
    parser.add_argument(
        "--crossover_sizes",
        type=int,
        nargs="*",
        default=[1000, 2000, 5000, 10_000, 20_000, 50_000],
        help="sizes at which to time the exact scan against the graph with the bank's default settings",
    )
    parser.add_argument("--max_passages", type=int, default=None, help="use at most this many cached passages")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "search_recall.json"))
    args = parser.parse_args()

    data = embedded(budget_seconds=0)  # the cache as it is: embedding is done, untimed, by search_corpus.py
    passages = data["passage_vectors"][: args.max_passages]
    owner = data["owner"][data["passage_ids"][: args.max_passages]]
    queries = data["query_vectors"]
    present = set(owner.tolist())
    gold = [set(documents) & present for documents in data["gold"]]  # gold documents with a stored window
    size = len(passages)
    print(f"{size:,} passages (of {len(data['passages']):,}), {len(queries)} queries, {sum(map(bool, gold))} with gold")
    truth = exact_top(passages, queries, K)
    exact_gold = [bool(set(owner[truth[row]].tolist()) & gold[row]) for row in range(len(queries)) if gold[row]]

    rows = []
    for build in args.builds:
        connectivity, expansion_add = (int(part) for part in build.split(":"))
        index = Index(
            ndim=passages.shape[1],
            metric="cos",
            dtype=INDEX_DTYPE,
            connectivity=connectivity,
            expansion_add=expansion_add,
        )
        start = time.perf_counter()
        index.add(np.arange(size, dtype=np.uint64), passages, threads=1)  # as a bank inserts
        build_seconds = time.perf_counter() - start
        row = {
            "connectivity": connectivity,
            "expansion_add": expansion_add,
            "build_seconds_1_thread": build_seconds,
            "index_memory_bytes_per_document": index.memory_usage / size,
            "index_file_bytes_per_document": len(index.save()) / size,
            "searches": {},
        }
        for expansion in args.expansion_search:
            index.expansion_search = expansion
            row["searches"][expansion] = quality(*single_queries(index, queries, exact=False), truth, owner, gold)
        rows.append(row)
        print(f"built {build} in {build_seconds:.1f} s", flush=True)
    timed = queries[: args.exact_queries]
    found, seconds = single_queries(index, timed, exact=True)
    exact = quality(found, seconds, truth[: len(timed)], owner, gold[: len(timed)])
    exact["gold_in_top_3"] = float(np.mean(exact_gold))  # over all queries (the matrix product's top 3)

    crossover = []  # where does the exact scan stop being as fast as the graph (bank defaults)?
    for count in [n for n in args.crossover_sizes if n < size] + [size]:
        small = Index(ndim=passages.shape[1], metric="cos", dtype=INDEX_DTYPE, **DEFAULT_INDEX_SETTINGS.as_dict())
        small.add(np.arange(count, dtype=np.uint64), passages[:count], threads=1)
        graph_found, graph = single_queries(small, queries, exact=False)
        scan = single_queries(small, timed, exact=True)[1]
        small_truth = exact_top(passages[:count], queries, K)
        crossover.append(
            {
                "documents": count,
                "hnsw_ms_median": float(np.median(graph) * 1e3),
                "exact_ms_median": float(np.median(scan) * 1e3),
                "hnsw_recall_at_3_vs_exact": quality(graph_found, graph, small_truth, owner, gold)[
                    "recall_at_3_vs_exact"
                ],
            }
        )

    header = (
        f"{'M':>4} {'ef_add':>6} {'build s':>8} {'B/doc':>6} {'ef_search':>9} {'recall@3':>9} {'gold@3':>7} "
        f"{'ms':>7} {'p99 ms':>7}"
    )
    print(header)
    for row in rows:
        for expansion, found_quality in row["searches"].items():
            print(
                f"{row['connectivity']:>4} {row['expansion_add']:>6} {row['build_seconds_1_thread']:>8.1f} "
                f"{row['index_memory_bytes_per_document']:>6.0f} {expansion:>9} "
                f"{found_quality['recall_at_3_vs_exact']:>9.4f} {found_quality['gold_in_top_3']:>7.4f} "
                f"{found_quality['search_ms_median']:>7.3f} {found_quality['search_ms_p99']:>7.3f}"
            )
    print(
        f"{'exact scan':>36} {exact['recall_at_3_vs_exact']:>9.4f} {exact['gold_in_top_3']:>7.4f} "
        f"{exact['search_ms_median']:>7.3f} {exact['search_ms_p99']:>7.3f}"
    )
    print(f"{'documents':>9} {'HNSW ms':>8} {'recall@3':>8} {'exact ms':>8}  (bank defaults {DEFAULT_INDEX_SETTINGS})")
    for point in crossover:
        print(
            f"{point['documents']:>9} {point['hnsw_ms_median']:>8.3f} {point['hnsw_recall_at_3_vs_exact']:>8.4f} "
            f"{point['exact_ms_median']:>8.3f}"
        )
    results = {
        "corpus": {
            "passages": size,
            "passages_in_corpus": len(data["passages"]),
            "source_documents": data["documents"],
            "window_words": WINDOW,
            "stride_words": STRIDE,
            "queries": len(queries),
            "queries_with_gold": sum(map(bool, gold)),
            "query_sources": {s: data["query_source"].count(s) for s in sorted(set(data["query_source"]))},
        },
        "k": K,
        "vector_bytes_per_document": passages.shape[1] * passages.itemsize,
        "builds": rows,
        "exact_scan": {**exact, "timed_queries": len(timed)},
        "crossover": crossover,
        "bank_defaults": {**DEFAULT_INDEX_SETTINGS.as_dict(), "exact_search_max_documents": EXACT_SEARCH_MAX_DOCUMENTS},
        "usearch": usearch.VERSION if hasattr(usearch, "VERSION") else usearch.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
    }
    write_record(args.output, results)


if __name__ == "__main__":
    main()
