"""The bank's search index: the embedder (sentence-transformers, loaded on first use) and a usearch cosine index
of the document embeddings, keyed by the catalogue's index keys."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from usearch.index import Index, Matches, MetricKind, ScalarKind

from ..defaults import DEFAULT_EMBEDDER_ID, load_embedder
from ..errors import BankMismatchError, ReGradFileError, ReGradTypeError, ReGradValueError

INDEX_METRIC = "cos"
# usearch keeps vectors in this scalar type; pinned so an index reads back the same everywhere.
INDEX_DTYPE = "f32"
# Up to this size `search` scans every vector (recall 1, results independent of the HNSW graph); above it the graph
# with DEFAULT_INDEX_SETTINGS is faster and finds >= 99 % of the exact top 3 on real embeddings
# (benchmarks/bench_search_recall.py; the scan costs ~0.1 ms here, ~13 ms at 10^5 documents).
EXACT_SEARCH_MAX_DOCUMENTS = 1_000
# Bounds of the HNSW settings a bank accepts: usearch needs connectivity >= 2; above these the graph's memory and
# build time grow with no recall left to gain on 384-d embeddings (benchmarks/bench_search_recall.py).
MAX_CONNECTIVITY = 256
MAX_EXPANSION = 16_384


@contextlib.contextmanager
def interrupts_as_themselves() -> Iterator[None]:
    """Re-raises usearch's report of a Ctrl-C as `KeyboardInterrupt`. usearch checks for signals in long loops and,
    when Python's handler has run, raises `RuntimeError("Operation has been terminated")` in place of the
    `KeyboardInterrupt` the handler raised: callers (and notebooks) must see the interrupt itself."""
    try:
        yield
    except RuntimeError as error:
        if "terminated" not in str(error).lower():
            raise
        raise KeyboardInterrupt(str(error)) from error


@dataclasses.dataclass(frozen=True)
class IndexSettings:
    """The HNSW settings of a bank's usearch index (saved in `bank_config.json` as `"index_settings"`).

    Args:
        connectivity (`int`): graph neighbours per node (usearch's `M`); baked into the index file when it is built.
        expansion_add (`int`): candidates kept while inserting (`efConstruction`); shapes the graph as it is built.
        expansion_search (`int`): candidates kept while searching the graph (`ef`); a search-time setting.
    """

    connectivity: int = 16
    expansion_add: int = 128
    expansion_search: int = 64

    def __post_init__(self) -> None:
        for field, low, high in (
            ("connectivity", 2, MAX_CONNECTIVITY),
            ("expansion_add", 1, MAX_EXPANSION),
            ("expansion_search", 1, MAX_EXPANSION),
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ReGradTypeError(f"index setting {field} must be an integer, got {type(value).__name__}")
            if not low <= value <= high:
                raise ReGradValueError(f"index setting {field} must be from {low} to {high}, got {value}")

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any] | IndexSettings | None) -> IndexSettings:
        """The settings of a mapping with any of the three fields (the others take [`DEFAULT_INDEX_SETTINGS`]'s).

        Raises:
            [`ReGradTypeError`]: `settings` is not a mapping, or a value is not an integer.
            [`ReGradValueError`]: an unknown field, or a value out of range.
        """
        if settings is None:
            return DEFAULT_INDEX_SETTINGS
        if isinstance(settings, IndexSettings):
            return settings
        if not isinstance(settings, Mapping):
            raise ReGradTypeError(
                f"index_settings must be a mapping of {[f.name for f in dataclasses.fields(cls)]}, got "
                f"{type(settings).__name__}"
            )
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(str(key) for key in settings if key not in names)
        if unknown:
            raise ReGradValueError(f"unknown index setting {unknown[0]!r}; the settings are {names}")
        return dataclasses.replace(DEFAULT_INDEX_SETTINGS, **settings)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


# What banks built before the settings were configurable used (usearch's defaults); a config without
# "index_settings" loads with these.
LEGACY_INDEX_SETTINGS = IndexSettings(connectivity=16, expansion_add=128, expansion_search=64)
# New banks: chosen on real embeddings (benchmarks/bench_search_recall.py, benchmarks/README.md section (f)).
DEFAULT_INDEX_SETTINGS = IndexSettings(connectivity=16, expansion_add=128, expansion_search=128)
_IDENTITIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def embedder_identity(model) -> str | None:
    """SHA-256 of an embedder's class, parameter names, shapes and dtypes, and the first and last 256 values of each
    parameter: another model of the same dimension differs in it. Computed once per model; `None` for an embedder
    without torch parameters (nothing to identify it by)."""
    if not hasattr(model, "named_parameters"):
        return None
    try:
        return _IDENTITIES[model]
    except (KeyError, TypeError):
        pass
    digest = hashlib.sha256(type(model).__name__.encode())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            flat = parameter.detach().reshape(-1)
            sample = torch.cat([flat[:256], flat[-256:]]).to(device="cpu", dtype=torch.float32).contiguous()
            digest.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}".encode())
            digest.update(sample.numpy().tobytes())
    identity = digest.hexdigest()
    with contextlib.suppress(TypeError):  # not weak-referenceable: computed again next time
        _IDENTITIES[model] = identity
    return identity


def query_list(query: object) -> tuple[bool, list[str]]:
    """`(single, queries)` of a search's `query`: one string, or a sequence of them (a list, a tuple).

    Raises:
        [`ReGradTypeError`]: `query` is not a string or a sequence of them (`None`, bytes, a mapping, a generator).
        [`ReGradValueError`]: no query, a blank one, or one that is not valid Unicode (lone surrogates), which the
            embedder's tokenizer cannot encode.
    """
    single = isinstance(query, str)
    if not single and (not isinstance(query, Sequence) or isinstance(query, (bytes, bytearray))):
        raise ReGradTypeError(f"search takes a query string or a sequence of them, got {type(query).__name__}")
    queries = [query] if single else list(query)
    if not queries or not all(isinstance(q, str) and q.strip() for q in queries):
        raise ReGradValueError("search needs a non-empty query string (or a list of them)")
    for number, text in enumerate(queries):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ReGradValueError(f"query {number} is not valid Unicode text (lone surrogates)") from None
    return single, queries


class EmbeddingIndex:
    """Embeds texts and finds the nearest stored embeddings.

    Args:
        embedder (`str`, *optional*): sentence-transformers model name or path; `None` is the embedded default.
        dimension (`int`): dimension of the embedder's vectors.
        embedder_model (*optional*): an already loaded `SentenceTransformer` for `embedder`.
        identity (`str`, *optional*): the [`embedder_identity`] the embedder must have (`None`: not checked).
        settings ([`IndexSettings`], *optional*): the HNSW settings; `None` is [`DEFAULT_INDEX_SETTINGS`].
    """

    def __init__(
        self,
        embedder: str | None,
        dimension: int,
        embedder_model=None,
        identity: str | None = None,
        settings: IndexSettings | None = None,
    ):
        self.embedder_name = embedder or DEFAULT_EMBEDDER_ID
        self.dimension = dimension
        self.identity = identity
        self.settings = settings or DEFAULT_INDEX_SETTINGS
        self._embedder = None
        self._index = self._new_index()
        if embedder_model is not None:
            self._use(embedder_model)

    def _new_index(self) -> Index:
        return Index(
            ndim=self.dimension,
            metric=INDEX_METRIC,
            dtype=INDEX_DTYPE,
            connectivity=self.settings.connectivity,
            expansion_add=self.settings.expansion_add,
            expansion_search=self.settings.expansion_search,
        )

    @property
    def connectivity(self) -> int:
        """The connectivity of the usearch graph (that of the index file, once loaded)."""
        return self._index.connectivity

    @property
    def expansion_add(self) -> int:
        return self._index.expansion_add

    @property
    def expansion_search(self) -> int:
        return self._index.expansion_search

    def _use(self, model) -> None:
        """Takes `model` as the embedder after checking it is the one the index was built with."""
        identity = embedder_identity(model)
        if self.identity is not None and identity is not None and identity != self.identity:
            raise BankMismatchError(
                f"this embedder is not the one the bank's index was built with ({self.embedder_name}, identity "
                f"{self.identity[:12]}; this one is {identity[:12]}): its vectors would retrieve the wrong documents. "
                "Pass the bank's embedder, or rebuild the bank with this one."
            )
        dimension = getattr(model, "get_embedding_dimension", lambda: None)()
        if dimension is not None and dimension != self.dimension:
            raise BankMismatchError(
                f"this embedder gives {dimension}-dim vectors, the bank's index is {self.dimension}-dim "
                f"({self.embedder_name}): pass the bank's embedder, or rebuild the bank with this one."
            )
        self._embedder = model
        self.identity = self.identity or identity  # a new bank (or an older one without it) records its embedder's

    def __len__(self) -> int:
        return len(self._index)

    @property
    def embedder(self):
        """The sentence-transformers model, loaded on first use."""
        if self._embedder is None:
            self._use(load_embedder(self.embedder_name))
        return self._embedder

    @property
    def loaded_embedder(self):
        """The embedder if it is loaded, else `None`."""
        return self._embedder

    def embed(self, texts: list[str]) -> np.ndarray:
        """Normalised float32 embeddings, one row per text.

        Raises:
            [`ReGradValueError`]: the embedder (any object with `encode`) gave something else than one finite,
                non-zero vector of the index's dimension per text: such a vector would poison the index (NaN scores
                rank at random, a zero vector scores 1.0 against every query) or fail inside usearch.
        """
        vectors = self.embedder.encode(texts, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
        try:
            vectors = np.asarray(vectors, dtype=np.float32)
        except (TypeError, ValueError, RuntimeError) as error:  # None, strings, ragged lists, a CUDA tensor
            raise ReGradValueError(f"the embedder gave {type(vectors).__name__}, not an array of vectors") from error
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            raise ReGradValueError(
                f"the embedder gave an array of shape {tuple(vectors.shape)} for {len(texts)} texts, expected "
                f"({len(texts)}, {self.dimension})"
            )
        if vectors.shape[1] != self.dimension:
            raise ReGradValueError(
                f"the embedder gives {vectors.shape[1]}-dim vectors, the bank index is {self.dimension}-dim"
            )
        bad = ~np.isfinite(vectors).all(axis=1) | ~(np.abs(vectors).max(axis=1, initial=0.0) > 0)
        if bad.any():
            raise ReGradValueError(
                f"the embedder gave NaN, infinite or all-zero vectors for texts {np.flatnonzero(bad)[:5].tolist()}: "
                "they cannot be compared by cosine similarity"
            )
        return vectors

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        # One thread: usearch's parallel inserts make the graph (and the file's bytes, whose checksum the config
        # records) depend on thread timing; inserted one by one, equal banks have equal index files.
        with interrupts_as_themselves():
            self._index.add(keys, vectors, threads=1)

    def remove(self, key: int) -> None:
        self._index.remove(key)

    def search(self, vectors: np.ndarray, k: int, exact: bool | None = None) -> list[list[tuple[int, float]]]:
        """The `k` nearest keys of each query vector, with their cosine similarity, best first.

        `exact=None` scans every vector for up to `EXACT_SEARCH_MAX_DOCUMENTS` documents, else walks the HNSW graph.
        """
        if exact is not None and not isinstance(exact, bool):
            raise ReGradTypeError(f"exact must be True, False or None (by the bank's size), got {exact!r:.40}")
        exact = len(self) <= EXACT_SEARCH_MAX_DOCUMENTS if exact is None else exact
        with interrupts_as_themselves():
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

    def save(self) -> bytes:
        """The index file's bytes."""
        try:
            return bytes(self._index.save())
        except RuntimeError as error:  # usearch reports allocation failures as RuntimeError
            raise ReGradFileError(f"cannot serialise the bank's index: {error}") from error

    def load(self, data: bytes, path: Path, keys: Sequence[int]) -> None:
        """Loads an index file's bytes and checks its metric, scalar type, dimension and keys against the bank."""
        try:
            header = Index.metadata(data)
        except Exception as error:  # usearch raises plain RuntimeError/ValueError on corrupt files
            raise ReGradValueError(f"bank file {path} is not a readable usearch index: {error}") from error
        if header is None:
            raise ReGradValueError(f"bank file {path} is not a readable usearch index")
        expected = {
            "kind_metric": MetricKind.Cos,
            "kind_scalar": ScalarKind.F32,
            "kind_key": ScalarKind.U64,
            "dimensions": self.dimension,
        }
        for field, value in expected.items():
            if header.get(field) != value:
                raise ReGradValueError(
                    f"bank file {path}: {field} is {header.get(field)}, the bank's config says {value} (an index of "
                    "another bank or format); rebuild the bank"
                )
        try:
            self._index.load(data)
        except Exception as error:
            raise ReGradValueError(f"bank file {path} is not a readable usearch index: {error}") from error
        # The file carries its graph's connectivity (usearch adopts it on load; the expansions are not stored and
        # keep the settings').
        if self._index.connectivity != self.settings.connectivity:
            raise ReGradValueError(
                f"bank file {path}: the index graph has connectivity {self._index.connectivity}, the bank's config "
                f"says {self.settings.connectivity} (an index of another bank, or an edited config); rebuild the bank"
            )
        keys = np.fromiter(keys, dtype=np.uint64, count=len(keys))
        if len(self._index) != len(keys) or (len(keys) and not np.all(self._index.contains(keys))):
            raise ReGradValueError(
                f"{path} holds {len(self._index)} vectors that do not match the {len(keys)} documents of the bank"
            )
