"""The bank's search index: the embedder (sentence-transformers, loaded on first use) and a usearch cosine index
of the document embeddings, keyed by the catalogue's index keys."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from usearch.index import Index, Matches

from ..defaults import DEFAULT_EMBEDDER_ID, load_embedder
from ..errors import ReGradValueError

INDEX_METRIC = "cos"
# usearch keeps vectors in this scalar type; pinned so an index reads back the same everywhere.
INDEX_DTYPE = "f32"
# Up to this size `search` scans every vector: recall 1 and results independent of how the HNSW graph was built
# (usearch inserts in parallel threads), for ~30 ms a query at the limit on 2 cores (benchmarks/bench_search.py).
EXACT_SEARCH_MAX_DOCUMENTS = 100_000


class EmbeddingIndex:
    """Embeds texts and finds the nearest stored embeddings.

    Args:
        embedder (`str`, *optional*): sentence-transformers model name or path; `None` is the embedded default.
        dimension (`int`): dimension of the embedder's vectors.
        embedder_model (*optional*): an already loaded `SentenceTransformer` for `embedder`.
    """

    def __init__(self, embedder: str | None, dimension: int, embedder_model=None):
        self.embedder_name = embedder or DEFAULT_EMBEDDER_ID
        self.dimension = dimension
        self._embedder = embedder_model
        self._index = Index(ndim=dimension, metric=INDEX_METRIC, dtype=INDEX_DTYPE)

    def __len__(self) -> int:
        return len(self._index)

    @property
    def embedder(self):
        """The sentence-transformers model, loaded on first use."""
        if self._embedder is None:
            self._embedder = load_embedder(self.embedder_name)
        return self._embedder

    @property
    def loaded_embedder(self):
        """The embedder if it is loaded, else `None`."""
        return self._embedder

    def embed(self, texts: list[str]) -> np.ndarray:
        """Normalised float32 embeddings, one row per text."""
        vectors = self.embedder.encode(texts, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape[1] != self.dimension:
            raise ReGradValueError(
                f"the embedder gives {vectors.shape[1]}-dim vectors, the bank index is {self.dimension}-dim"
            )
        return vectors

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        self._index.add(keys, vectors)

    def remove(self, key: int) -> None:
        self._index.remove(key)

    def search(self, vectors: np.ndarray, k: int, exact: bool | None = None) -> list[list[tuple[int, float]]]:
        """The `k` nearest keys of each query vector, with their cosine similarity, best first.

        `exact=None` scans every vector for up to `EXACT_SEARCH_MAX_DOCUMENTS` documents, else walks the HNSW graph.
        """
        exact = len(self) <= EXACT_SEARCH_MAX_DOCUMENTS if exact is None else exact
        matches = self._index.search(vectors, k, exact=exact)
        # usearch answers one query with `Matches` and several with `BatchMatches` (indexable into `Matches`).
        per_query = [matches] if isinstance(matches, Matches) else [matches[row] for row in range(len(vectors))]
        return [
            [
                (key, 1.0 - float(distance))
                for key, distance in zip(found.keys.tolist(), found.distances.tolist(), strict=True)
            ]
            for found in per_query
        ]

    def save(self, path: Path) -> None:
        self._index.save(str(path))

    def load(self, path: Path, keys: Sequence[int], config_file: str, documents_file: str) -> None:
        """Loads `path` and checks that it holds exactly `keys`, of the configured dimension."""
        if not path.is_file():
            raise ReGradValueError(f"bank file {path} is missing")
        try:
            self._index.load(str(path))
        except Exception as error:  # usearch raises plain RuntimeError/ValueError on corrupt files
            raise ReGradValueError(f"bank file {path} is not a readable usearch index: {error}") from error
        keys = np.fromiter(keys, dtype=np.uint64, count=len(keys))
        if len(self._index) != len(keys) or (len(keys) and not np.all(self._index.contains(keys))):
            raise ReGradValueError(
                f"{path} holds {len(self._index)} vectors that do not match the {len(keys)} documents of "
                f"{documents_file}"
            )
        if self._index.ndim != self.dimension:
            raise ReGradValueError(f"{path} holds {self._index.ndim}-dim vectors, {config_file} says {self.dimension}")
