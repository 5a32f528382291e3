"""The real-passage corpus of benchmarks/bench_search_recall.py: SQuAD, HotpotQA and TOFU texts from
`../shared/data` cut into overlapping word windows, their questions as queries, and each question's gold windows;
embedded once with the bank's default embedder and cached in `benchmarks/.cache/` (git-ignored).

Chunking: every source document is split on whitespace into windows of `WINDOW` words starting every `STRIDE`
words, plus one window ending at the document's last word when the stride does not reach it (a document of at
most `WINDOW` words is one window). Source documents: each SQuAD paragraph; each distinct HotpotQA paragraph
(title and sentences; the 500 questions repeat some of their 10 paragraphs, kept once); for each TOFU author, the
answers of its 20 questions joined in order (TOFU has no source documents). Gold windows of a question: all windows
of its SQuAD paragraph, of its HotpotQA supporting-fact paragraphs, or of its TOFU author's document.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CACHE = ROOT / "benchmarks" / ".cache"
WINDOW = 24
STRIDE = 6
QUERIES = {"squad": 1500, "hotpotqa": 500, "tofu": 1000}
EMBED_CHUNK = 1024


def _windows(words: list[str]) -> list[str]:
    if len(words) <= WINDOW:
        return [" ".join(words)]
    starts = list(range(0, len(words) - WINDOW + 1, STRIDE))
    if starts[-1] + WINDOW < len(words):
        starts.append(len(words) - WINDOW)
    return [" ".join(words[start : start + WINDOW]) for start in starts]


def source_documents(data: Path = DATA) -> tuple[list[str], list[tuple[str, str, list[int]]]]:
    """Source documents and questions `(source, question, gold document indices)`."""
    documents: list[str] = []
    questions: list[tuple[str, str, list[int]]] = []
    squad = json.loads((data / "squad_dev_articles_00-39.json").read_text())
    for article in squad["data"]:
        for paragraph in article["paragraphs"]:
            documents.append(paragraph["context"])
            questions += [("squad", qa["question"], [len(documents) - 1]) for qa in paragraph["qas"]]
    seen: dict[tuple[str, str], int] = {}
    for line in (data / "hotpotqa_dev_distractor_500.jsonl").read_text().splitlines():
        row = json.loads(line)
        for title, sentences in row["context"]:
            key = (title, "".join(sentences))
            if key not in seen:
                seen[key] = len(documents)
                documents.append(f"{title}. {''.join(sentences)}")
        gold_titles = {title for title, _ in row["supporting_facts"]}
        gold = sorted({seen[(t, "".join(s))] for t, s in row["context"] if t in gold_titles})
        questions.append(("hotpotqa", row["question"], gold))
    answers: dict[int, list[str]] = defaultdict(list)
    tofu = [json.loads(line) for line in (data / "tofu_qa_authors_000-179.jsonl").read_text().splitlines()]
    for row in tofu:
        answers[row["author_idx"]].append(row["answer"])
    author_document = {}
    for author, texts in sorted(answers.items()):
        author_document[author] = len(documents)
        documents.append(" ".join(texts))
    questions += [("tofu", row["question"], [author_document[row["author_idx"]]]) for row in tofu]
    return documents, questions


def corpus(seed: int = 0) -> dict:
    """Windows, their source document, sampled queries and their gold documents (no embeddings)."""
    documents, questions = source_documents()
    passages, owner = [], []
    for number, text in enumerate(documents):
        windows = _windows(text.split())
        passages += windows
        owner += [number] * len(windows)
    generator = np.random.default_rng(seed)
    sampled = []
    for source, count in QUERIES.items():
        pool = [q for q in questions if q[0] == source]
        sampled += [pool[i] for i in sorted(generator.choice(len(pool), min(count, len(pool)), replace=False))]
    return {
        "documents": len(documents),
        "passages": passages,
        "owner": np.asarray(owner, dtype=np.int64),
        "queries": [q[1] for q in sampled],
        "query_source": [q[0] for q in sampled],
        "gold": [q[2] for q in sampled],
    }


def embedded(seed: int = 0, limit: int | None = None, budget_seconds: float | None = None) -> dict:
    """[`corpus`] with `passage_vectors` and `query_vectors` (normalised float32, the bank's embedder), cached.

    The queries are embedded first, then the passages in a seeded random order, chunk by chunk, each chunk cached as
    soon as it is done: an interrupted run resumes, and a partial cache holds a uniform sample of the passages.

    Args:
        limit (`int`, *optional*): embed no more passages than this (all of them by default).
        budget_seconds (`float`, *optional*): stop embedding (after the current chunk) once this much time passed.

    Returns:
        `dict`: the corpus restricted to the passages embedded so far (`passage_ids`: their indices in it).
    """
    from regrad_hf.bank.index import EmbeddingIndex
    from regrad_hf.defaults import DEFAULT_EMBEDDER_ID

    data = corpus(seed)
    fingerprint = hashlib.sha256(
        json.dumps([DEFAULT_EMBEDDER_ID, data["passages"], data["queries"]]).encode()
    ).hexdigest()[:16]
    directory = CACHE / f"search_recall-{fingerprint}"
    directory.mkdir(parents=True, exist_ok=True)
    texts = data["passages"] + data["queries"]
    vectors = np.zeros((len(texts), 384), dtype=np.float32)
    done = np.zeros(len(texts), dtype=bool)
    for chunk in sorted(directory.glob("chunk-*.npz")):
        with np.load(chunk) as stored:
            vectors[stored["indices"]] = stored["vectors"]
            done[stored["indices"]] = True
    order = np.concatenate(
        [np.arange(len(data["passages"]), len(texts)), np.random.default_rng(seed).permutation(len(data["passages"]))]
    )
    wanted = order[: len(data["queries"]) + (len(data["passages"]) if limit is None else limit)]
    todo = wanted[~done[wanted]]
    index = EmbeddingIndex(None, 384)  # the bank's own embedding path (normalised, float32)
    start_time = time.perf_counter()
    for start in range(0, len(todo), EMBED_CHUNK):
        if budget_seconds is not None and time.perf_counter() - start_time > budget_seconds:
            break
        indices = todo[start : start + EMBED_CHUNK]
        vectors[indices] = index.embed([texts[i] for i in indices])
        done[indices] = True
        temporary = directory / f".chunk-{int(done.sum()):07d}.npz"
        np.savez(temporary, indices=indices, vectors=vectors[indices])
        temporary.rename(directory / f"chunk-{int(done.sum()):07d}.npz")
        print(
            f"embedded {int(done[wanted].sum()):,}/{len(wanted):,} texts ({time.perf_counter() - start_time:.0f} s)",
            flush=True,
        )
    passage_ids = np.flatnonzero(done[: len(data["passages"])])
    if not done[len(data["passages"]) :].all():
        raise RuntimeError("the queries are not embedded yet: run benchmarks/search_corpus.py")
    data["passage_ids"] = passage_ids
    data["passage_vectors"] = vectors[passage_ids]
    data["query_vectors"] = vectors[len(data["passages"]) :]
    return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="embed (and cache) the corpus of bench_search_recall.py")
    parser.add_argument("--limit", type=int, default=None, help="passages to embed at most (default: all)")
    parser.add_argument("--budget_seconds", type=float, default=None, help="stop after this long (resumable)")
    args = parser.parse_args()
    result = embedded(limit=args.limit, budget_seconds=args.budget_seconds)
    print(
        f"{len(result['passage_ids']):,} of {len(result['passages']):,} passages embedded (from "
        f"{result['documents']:,} documents), {len(result['queries'])} queries"
    )
