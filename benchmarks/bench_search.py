"""(f) Retrieval at scale: usearch add time, search latency, recall and memory per document for 10^4, 10^5 and 10^6
synthetic embeddings, with the index settings a GradientBank uses. Prints a table and writes
benchmarks/results/search.json.

    python benchmarks/bench_search.py [--sizes 10000 100000 1000000] [--queries 200]

Vectors are random unit vectors of the embedder's dimension (384), so that no dataset is needed; they are the
hard case for an approximate index (no cluster structure). Recall@10 is measured against exact search
(`usearch.index.search(..., exact=True)`) on the same vectors; "source in top 3" asks for the stored vector a
noisy query was made from (cosine ~0.7), the situation of a question about one document. Each size is searched
three ways: the HNSW graph with usearch's default `expansion_search`, with 4x that, and an exact scan of every
vector (what `GradientBank.search` does up to `EXACT_SEARCH_MAX_DOCUMENTS`). Memory is the index's own accounting
(`Index.memory_usage`) and its serialized size.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_record import write_record
from usearch.index import Index, search

from regrad_hf.bank.index import EXACT_SEARCH_MAX_DOCUMENTS, INDEX_DTYPE

ROOT = Path(__file__).resolve().parents[1]
DIMENSION = 384  # all-MiniLM-L6-v2, the default embedder


def unit_vectors(count: int, generator: np.random.Generator) -> np.ndarray:
    vectors = generator.standard_normal((count, DIMENSION), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def search_quality(
    index: Index, vectors: np.ndarray, probes: np.ndarray, noisy: np.ndarray, sources: np.ndarray, k: int, exact: bool
) -> dict[str, float]:
    """Latency of single queries, recall@k against exact search, and how often a noisy query finds its source."""
    latencies, found = [], []
    for probe in probes:  # one query at a time, as generate() asks
        start = time.perf_counter()
        matches = index.search(probe, k, exact=exact)
        latencies.append(time.perf_counter() - start)
        found.append(set(matches.keys.tolist()))
    truth = search(vectors, probes, k, metric="cos", exact=True)
    recall = np.mean([len(found[i] & set(truth.keys[i].tolist())) / k for i in range(len(probes))])
    source_hits = [
        source in index.search(query, 3, exact=exact).keys for source, query in zip(sources, noisy, strict=True)
    ]
    return {
        "search_ms_median": float(np.median(latencies) * 1e3),
        "search_ms_p99": float(np.percentile(latencies, 99) * 1e3),
        f"recall_at_{k}": float(recall),
        "source_document_in_top_3": float(np.mean(source_hits)),
    }


def measure(size: int, queries: int, k: int, seed: int, threads: int) -> dict:
    generator = np.random.default_rng(seed)
    vectors = unit_vectors(size, generator)
    probes = unit_vectors(queries, generator)
    # A query written about one stored document: that document's vector plus noise (cosine ~0.7 to it). Does the
    # index return that document among its top 3, as retrieval for generate() needs?
    sources = generator.choice(size, queries, replace=False)
    noisy = vectors[sources] + unit_vectors(queries, generator)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    index = Index(ndim=DIMENSION, metric="cos", dtype=INDEX_DTYPE)

    start = time.perf_counter()
    index.add(np.arange(size, dtype=np.uint64), vectors, threads=threads)
    add_seconds = time.perf_counter() - start

    modes = {"hnsw": search_quality(index, vectors, probes, noisy, sources, k, exact=False)}
    default_expansion = index.expansion_search
    index.expansion_search = 4 * default_expansion
    modes[f"hnsw_expansion_{index.expansion_search}"] = search_quality(
        index, vectors, probes, noisy, sources, k, exact=False
    )
    index.expansion_search = default_expansion
    modes["exact"] = search_quality(index, vectors, probes, noisy, sources, k, exact=True)

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "index.usearch")
        index.save(path)
        file_bytes = os.path.getsize(path)
    return {
        "documents": size,
        "add_threads": threads,
        "add_seconds": add_seconds,
        "add_documents_per_second": size / add_seconds,
        "gradient_bank_default": "exact" if size <= EXACT_SEARCH_MAX_DOCUMENTS else "hnsw",
        "modes": modes,
        "memory_bytes_per_document": index.memory_usage / size,
        "file_bytes_per_document": file_bytes / size,
        "raw_vector_bytes_per_document": DIMENSION * vectors.itemsize,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="usearch add threads (0: all cores)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "search.json"))
    args = parser.parse_args()

    rows = [measure(size, args.queries, args.k, args.seed, args.threads) for size in args.sizes]
    recall = f"recall@{args.k}"
    print(
        f"{'documents':>10} {'add s':>8} {'search':<16} {'ms':>8} {'p99 ms':>8} {recall:>10} {'source@3':>9} "
        f"{'mem B/doc':>10} {'file B/doc':>10}"
    )
    for row in rows:
        for mode, quality in row["modes"].items():
            label = mode + (" (bank)" if mode == row["gradient_bank_default"] else "")
            print(
                f"{row['documents']:>10} {row['add_seconds']:>8.1f} {label:<16} {quality['search_ms_median']:>8.3f} "
                f"{quality['search_ms_p99']:>8.3f} {quality[f'recall_at_{args.k}']:>10.3f} "
                f"{quality['source_document_in_top_3']:>9.3f} {row['memory_bytes_per_document']:>10.0f} "
                f"{row['file_bytes_per_document']:>10.0f}"
            )
    results = {
        "index": {"metric": "cos", "dtype": INDEX_DTYPE, "ndim": DIMENSION},
        "queries": args.queries,
        "rows": rows,
        "cpu_count": os.cpu_count(),
    }
    write_record(args.output, results)


if __name__ == "__main__":
    main()
