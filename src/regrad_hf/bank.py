"""`GradientBank`: documents, their embeddings (usearch) and their gradients (safetensors shards).

On disk (see DESIGN.md section 4)::

    bank_config.json                    format version, learner identity and fingerprint, embedder, dtype, shapes,
                                        shard list with SHA-256 checksums (verified on a shard's first read)
    documents.jsonl                     one line per document: id, text, metadata, index key, shard, row
    index.usearch                       cosine index of the document embeddings, keyed by the index key
    gradients/shard-NNNNN.safetensors   per LoRA tensor name, the gradients of the shard's documents stacked
                                        on a first axis, so that one row can be read lazily with `get_slice`

The bank knows nothing about generation: it computes gradients through the model it is given
([`GradientSource`]) and hands stacked gradients back through [`GradientBank.gather`].
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from usearch.index import Index, Matches

from .config import ReGradConfig
from .defaults import DEFAULT_EMBEDDER_ID, load_embedder
from .deltas import check_documents
from .errors import BankMismatchError, ReGradKeyError, ReGradValueError
from .files import DIRECTORY_MODE, atomic_save_safetensors, atomic_write_text
from .hub import HubOptions, Location, locate, push_folder, render_bank_card
from .learner import fingerprint_of

FORMAT_VERSION = 1
CONFIG_FILE = "bank_config.json"
DOCUMENTS_FILE = "documents.jsonl"
INDEX_FILE = "index.usearch"
GRADIENTS_DIR = "gradients"
BANK_FILES = (CONFIG_FILE, DOCUMENTS_FILE, INDEX_FILE, GRADIENTS_DIR)
EAGER_FILES = (CONFIG_FILE, DOCUMENTS_FILE, INDEX_FILE)  # downloaded when a bank is loaded from a repo; shards later
# usearch keeps vectors in this scalar type; pinned so an index reads back the same everywhere.
INDEX_DTYPE = "f32"
DEFAULT_MAX_SHARD_BYTES = 1 << 30

_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


class GradientSource(Protocol):
    """What a bank needs from a model to add documents (implemented by [`ReGradForCausalLM`])."""

    config: ReGradConfig

    def learner_identity(self) -> dict[str, str]: ...

    def lora_parameters(self) -> Mapping[str, torch.Tensor]: ...

    def document_gradients(self, documents: Sequence[str]) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class Hit:
    """One retrieved document.

    Args:
        id (`str`): the document id.
        score (`float`): cosine similarity between the query and the document.
        text (`str`): the document text.
        metadata (`dict`): what was stored with the document.
    """

    id: str
    score: float
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Document:
    id: str
    text: str
    metadata: dict[str, Any]
    key: int
    # Where the gradient lives on disk; None while it is only in memory.
    shard: int | None = None
    row: int | None = None


class GradientBank:
    """An indexed store of per-document gradients for one learner.

    Build one with [`GradientBank.build`] or load one with [`GradientBank.from_pretrained`]; the constructor is for
    those two.

    Args:
        learner (`Mapping[str, str]`): the identity of the learner whose gradients the bank holds (its
            `learner_identity()`: base model and revision, LoRA layout and values hashes, gradient format).
        parameter_shapes (`Mapping[str, Sequence[int]]`): shape of each LoRA tensor, by name.
        embedding_dim (`int`): dimension of the embedder's vectors.
        embedder (`str`, *optional*): sentence-transformers model name or path; `None` is the embedded default.
        dtype (`str`, defaults to `"bfloat16"`): dtype of the stored gradients.
        embedder_model (*optional*): an already loaded `SentenceTransformer` for `embedder`.
    """

    def __init__(
        self,
        learner: Mapping[str, str],
        parameter_shapes: Mapping[str, Sequence[int]],
        embedding_dim: int,
        embedder: str | None = None,
        dtype: str = "bfloat16",
        embedder_model=None,
    ):
        if dtype not in _TORCH_DTYPES:
            raise ReGradValueError(f"bank dtype must be one of {sorted(_TORCH_DTYPES)}, got {dtype!r}")
        self.learner = dict(learner)
        self.fingerprint = fingerprint_of(self.learner)
        self.parameter_shapes = {name: tuple(shape) for name, shape in parameter_shapes.items()}
        self.embedding_dim = embedding_dim
        self.embedder_name = embedder or DEFAULT_EMBEDDER_ID
        self.dtype = dtype
        self._embedder = embedder_model
        self._index = Index(ndim=embedding_dim, metric="cos", dtype=INDEX_DTYPE)
        self._documents: dict[str, _Document] = {}
        self._ids_by_key: dict[int, str] = {}
        self._next_key = 0
        self._in_memory: dict[str, dict[str, torch.Tensor]] = {}
        # Shards by index: their files (relative to the bank), rows used, checksums, and once opened, the
        # safetensors reader and a plain handle on the same file (to checksum what the reader maps).
        self._location: Location | None = None  # where the shard files are (downloaded on first use from a repo)
        self._shard_files: list[str] = []
        self._shard_rows: list[int] = []
        self._shard_checksums: list[str] = []
        self._readers: list[Any | None] = []
        self._shard_handles: list[Any | None] = []
        self._verified_shards: set[int] = set()

    # ------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        model: GradientSource,
        documents: Sequence[str],
        ids: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        batch_size: int = 8,
        embedder_model=None,
        show_progress: bool = True,
    ) -> GradientBank:
        """Builds a bank from documents: embeds them and computes their gradients with `model`.

        Args:
            model ([`ReGradForCausalLM`]): the learner; its config gives the embedder and the bank dtype.
            documents (`Sequence[str]`): the texts.
            ids (`Sequence[str]`, *optional*): unique ids; defaults to `"0"`, `"1"`, ...
            metadata (`Sequence[dict]`, *optional*): JSON-serialisable metadata per document.
            batch_size (`int`, defaults to 8): documents per gradient batch (and progress-bar step).
            embedder_model (*optional*): an already loaded `SentenceTransformer` matching `model.config.embedder`.
            show_progress (`bool`, defaults to `True`): show a progress bar.

        Returns:
            [`GradientBank`]
        """
        check_documents(documents)
        embedder_model = embedder_model or load_embedder(model.config.embedder)
        bank = cls(
            learner=model.learner_identity(),
            parameter_shapes={name: p.shape for name, p in model.lora_parameters().items()},
            embedding_dim=embedder_model.get_embedding_dimension(),
            embedder=model.config.embedder,
            dtype=model.config.bank_dtype,
            embedder_model=embedder_model,
        )
        bank.add(model, documents, ids=ids, metadata=metadata, batch_size=batch_size, show_progress=show_progress)
        return bank

    def add(
        self,
        model: GradientSource,
        documents: Sequence[str],
        ids: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        batch_size: int = 8,
        show_progress: bool = True,
    ) -> list[str]:
        """Adds documents. Everything is validated and computed before the bank changes, so a failure adds nothing.

        Returns:
            `list[str]`: the ids of the added documents.
        """
        check_documents(documents)
        ids = self._new_ids(documents, ids)
        metadata = self._check_metadata(documents, metadata)
        if batch_size < 1:
            raise ReGradValueError(f"batch_size must be positive, got {batch_size}")
        self.check_learner(model)

        embeddings = self._embed(list(documents))
        rows: list[dict[str, torch.Tensor]] = []
        with tqdm(total=len(documents), desc="Document gradients", disable=not show_progress) as progress:
            for start in range(0, len(documents), batch_size):
                batch = list(documents[start : start + batch_size])
                stacked = model.document_gradients(batch)
                _check_finite(stacked, ids[start : start + batch_size])
                stored = {name: g.detach().to("cpu", _TORCH_DTYPES[self.dtype]) for name, g in stacked.items()}
                rows.extend({name: tensor[i] for name, tensor in stored.items()} for i in range(len(batch)))
                progress.update(len(batch))

        keys = np.arange(self._next_key, self._next_key + len(documents), dtype=np.uint64)
        self._index.add(keys, embeddings)
        self._next_key += len(documents)
        for key, doc_id, text, meta, row in zip(keys.tolist(), ids, documents, metadata, rows, strict=True):
            self._documents[doc_id] = _Document(id=doc_id, text=text, metadata=dict(meta), key=key)
            self._ids_by_key[key] = doc_id
            self._in_memory[doc_id] = row
        return list(ids)

    def remove(self, ids: str | Sequence[str]) -> None:
        """Removes documents by id. Unknown ids raise [`ReGradKeyError`] before anything is removed."""
        ids = [ids] if isinstance(ids, str) else list(ids)
        self._check_known(ids)
        for doc_id in ids:
            document = self._documents.pop(doc_id)
            self._index.remove(document.key)
            del self._ids_by_key[document.key]
            self._in_memory.pop(doc_id, None)

    def check_learner(self, model: GradientSource) -> None:
        """Raises [`BankMismatchError`] unless `model` is the learner this bank was built with."""
        identity = model.learner_identity()
        if fingerprint_of(identity) != self.fingerprint:
            differences = ", ".join(
                f"{key} (bank {str(self.learner.get(key))[:16]}, model {str(identity.get(key))[:16]})"
                for key in sorted(set(identity) | set(self.learner))
                if identity.get(key) != self.learner.get(key)
            )
            raise BankMismatchError(
                f"this bank was built by learner {self.fingerprint[:12]}, the model is learner "
                f"{fingerprint_of(identity)[:12]}; they differ in {differences}. The bank's gradients do not apply "
                "to this model: rebuild the bank with it, or attach with force=True if you know better."
            )

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self._documents)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._documents

    @property
    def ids(self) -> list[str]:
        """The document ids, in insertion order."""
        return list(self._documents)

    def document(self, doc_id: str) -> Hit:
        """The stored text and metadata of one document (score 1.0)."""
        self._check_known([doc_id])
        document = self._documents[doc_id]
        return Hit(id=doc_id, score=1.0, text=document.text, metadata=dict(document.metadata))

    def search(self, query: str | Sequence[str], k: int = 3) -> list[Hit] | list[list[Hit]]:
        """The `k` documents most similar to the query (cosine similarity of the embeddings).

        Args:
            query (`str` or `Sequence[str]`): one query, or several.
            k (`int`, defaults to 3): how many documents per query; at most the size of the bank.

        Returns:
            `list[Hit]` for one query, `list[list[Hit]]` for several, best first.
        """
        single = isinstance(query, str)
        queries = [query] if single else list(query)
        if not queries or not all(isinstance(q, str) and q.strip() for q in queries):
            raise ReGradValueError("search needs a non-empty query string (or a list of them)")
        if not isinstance(k, int) or k < 1:
            raise ReGradValueError(f"k must be a positive integer, got {k!r}")
        if k > len(self):
            raise ReGradValueError(f"top_k={k} is larger than the bank, which holds {len(self)} documents")
        matches = self._index.search(self._embed(queries), k)
        # usearch answers one query with `Matches` and several with `BatchMatches` (indexable into `Matches`).
        per_query = [matches] if isinstance(matches, Matches) else [matches[row] for row in range(len(queries))]
        results = []
        for found in per_query:
            hits = []
            for key, distance in zip(found.keys.tolist(), found.distances.tolist(), strict=True):
                document = self._documents[self._ids_by_key[key]]
                hits.append(Hit(document.id, 1.0 - float(distance), document.text, dict(document.metadata)))
            results.append(hits)
        return results[0] if single else results

    def gather(self, ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """The stored gradients of the documents, stacked: `{name: tensor of shape (len(ids), *shape)}`.

        Rows on disk are read lazily (memory-mapped `get_slice`), one row per document.
        """
        if isinstance(ids, str):
            ids = [ids]
        ids = list(ids)
        if not ids:
            raise ReGradValueError("gather needs at least one document id")
        self._check_known(ids)
        gathered = {name: torch.stack([self._row(doc_id, name) for doc_id in ids]) for name in self.parameter_shapes}
        # A corrupted shard must not silently poison an answer.
        _check_finite(gathered, ids, where=" (stored in this bank: the bank file is corrupted; rebuild it)")
        return gathered

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(
        self, save_directory: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    ) -> None:
        """Writes the bank to a directory (layout in the module docstring).

        The bank is written to a staging directory first and swapped in whole, so an interrupted save leaves the
        previous contents of `save_directory` intact. Files in `save_directory` that are not part of a bank (a
        README, a model's files) are kept.

        Args:
            save_directory (`str` or `os.PathLike`): where to write.
            max_shard_bytes (`int`, defaults to 1 GiB): the size above which gradients go to a new shard.
        """
        target = Path(save_directory).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
        staging.chmod(DIRECTORY_MODE)
        try:
            placements, shards = self._write(staging, max_shard_bytes)
            _replace_directory(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        # The saved files now hold every gradient: read from them instead of memory.
        self._attach_shards(Location(target), shards, eager=True)
        self._verified_shards = set(range(len(shards)))  # checksummed just now, as written
        for doc_id, (shard, row) in placements.items():
            self._documents[doc_id].shard, self._documents[doc_id].row = shard, row
        self._in_memory.clear()

    def push_to_hub(
        self,
        repo_id: str,
        *,
        subfolder: str | None = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        card_data: Mapping[str, Any] | None = None,
    ):
        """Uploads the bank, with its card as `README.md`, to a Hub repo (created if needed) in one commit.

        Args:
            repo_id (`str`): the repo, e.g. `"user/my-bank"`; a model repo's id with `subfolder="bank"` puts the
                bank next to its learner, where [`ReGradForCausalLM.from_pretrained`] attaches it.
            subfolder (`str`, *optional*): the folder of the repo to write to (default: the root).
            commit_message, commit_description, private, token, revision, create_pr: as in
                `transformers`' `push_to_hub`.
            max_shard_bytes (`int`, defaults to 1 GiB): size above which gradients go to a new shard.
            card_data (`Mapping`, *optional*): more card metadata (`datasets`, `license`, `tags`, ...) and `title`.

        Returns:
            `huggingface_hub.CommitInfo`: the commit (its sha is `.oid`).
        """
        with tempfile.TemporaryDirectory() as folder:
            self._write(Path(folder), max_shard_bytes)
            bank_config = json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))
            card = render_bank_card(bank_config, repo_id=repo_id, subfolder=subfolder, card_data=card_data)
            return push_folder(
                folder,
                repo_id,
                path_in_repo=subfolder or "",
                commit_message=commit_message or f"Upload gradient bank ({len(self)} documents)",
                commit_description=commit_description,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
                delete_patterns=[f"{GRADIENTS_DIR}/*"],  # shards of an earlier, larger bank
                card=card,
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_bank_name_or_path: str | os.PathLike,
        embedder_model=None,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> GradientBank:
        """Loads a bank saved with [`GradientBank.save_pretrained`] or pushed with [`GradientBank.push_to_hub`].

        Gradients stay on disk until gathered. From a Hub repo, only `bank_config.json`, `documents.jsonl` and
        `index.usearch` are downloaded now; each gradient shard is downloaded (into the Hub cache, pinned to the
        commit loaded now) when one of its rows is first gathered, and checked against its SHA-256.

        Args:
            pretrained_bank_name_or_path (`str` or `os.PathLike`): a local directory or a Hub repo id.
            embedder_model (*optional*): an already loaded `SentenceTransformer` for the bank's embedder.
            subfolder (`str`, *optional*): the bank's folder inside the directory or repo, e.g. `"bank"`.
            revision, token, cache_dir, local_files_only, force_download: as in `transformers`' `from_pretrained`.

        Raises:
            [`ReGradValueError`]: when a file is missing or malformed (the message names it).
            [`ReGradHubError`]: when the repo cannot be found, or is not cached while offline.
        """
        options = HubOptions(revision, token, cache_dir, local_files_only, force_download)
        local = Path(pretrained_bank_name_or_path, subfolder or "")
        if local.parent.is_dir():
            _recover_interrupted_save(local.resolve())
        location = locate(
            pretrained_bank_name_or_path,
            [CONFIG_FILE, DOCUMENTS_FILE, INDEX_FILE],
            subfolder=subfolder,
            options=options,
        )
        directory = location.directory.resolve()
        if not location.is_remote:
            location = Location(directory)
        config = _read_json(directory / CONFIG_FILE)
        if config.get("format_version") != FORMAT_VERSION:
            raise ReGradValueError(
                f"{directory / CONFIG_FILE}: format_version {config.get('format_version')!r} is not supported "
                f"(this regrad-hf reads version {FORMAT_VERSION})"
            )
        try:
            bank = cls(
                learner=config["learner"],
                parameter_shapes=config["parameter_shapes"],
                embedding_dim=config["embedding_dim"],
                embedder=config["embedder"],
                dtype=config["dtype"],
                embedder_model=embedder_model,
            )
            shards = [{"file": shard["file"], "sha256": shard["sha256"]} for shard in config["shards"]]
        except (KeyError, TypeError) as error:
            raise ReGradValueError(f"{directory / CONFIG_FILE} is malformed: missing or invalid {error}") from error
        if bank.fingerprint != config.get("fingerprint"):
            raise ReGradValueError(
                f"{directory / CONFIG_FILE}: the fingerprint field does not match the learner field (edited file?)"
            )
        for shard in shards:
            if not location.is_remote and not (directory / shard["file"]).is_file():
                raise ReGradValueError(f"bank file {directory / shard['file']} is missing")

        documents_path = directory / DOCUMENTS_FILE
        if not documents_path.is_file():
            raise ReGradValueError(f"bank file {documents_path} is missing")
        with open(documents_path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    record = json.loads(line)
                    document = _Document(**record)
                except (json.JSONDecodeError, TypeError) as error:
                    raise ReGradValueError(f"{documents_path} line {number} is malformed: {error}") from error
                bank._documents[document.id] = document
                bank._ids_by_key[document.key] = document.id
        if len(bank._documents) != config.get("num_documents"):
            raise ReGradValueError(
                f"{documents_path} holds {len(bank._documents)} documents, "
                f"{CONFIG_FILE} says {config.get('num_documents')}"
            )

        index_path = directory / INDEX_FILE
        if not index_path.is_file():
            raise ReGradValueError(f"bank file {index_path} is missing")
        try:
            bank._index.load(str(index_path))
        except Exception as error:  # usearch raises plain RuntimeError/ValueError on corrupt files
            raise ReGradValueError(f"bank file {index_path} is not a readable usearch index: {error}") from error
        if len(bank._index) != len(bank._documents):
            raise ReGradValueError(
                f"{index_path} holds {len(bank._index)} vectors for {len(bank._documents)} documents"
            )
        bank._next_key = max(bank._ids_by_key, default=-1) + 1
        # A local shard is opened now: an open shard keeps its contents even if another bank later replaces the
        # file. A repo's shards are immutable files of one commit in the cache, opened when first needed.
        bank._attach_shards(location, shards, eager=not location.is_remote)
        return bank

    # ------------------------------------------------------------------ internals

    @property
    def embedder(self):
        """The sentence-transformers model, loaded on first use."""
        if self._embedder is None:
            self._embedder = load_embedder(self.embedder_name)
        return self._embedder

    def _embed(self, texts: list[str]) -> np.ndarray:
        vectors = self.embedder.encode(texts, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape[1] != self.embedding_dim:
            raise ReGradValueError(
                f"the embedder gives {vectors.shape[1]}-dim vectors, the bank index is {self.embedding_dim}-dim"
            )
        return vectors

    def _new_ids(self, documents: Sequence[str], ids: Sequence[str] | None) -> list[str]:
        if ids is None:
            return [str(key) for key in range(self._next_key, self._next_key + len(documents))]
        ids = list(ids)
        if len(ids) != len(documents):
            raise ReGradValueError(f"got {len(ids)} ids for {len(documents)} documents")
        if not all(isinstance(doc_id, str) and doc_id for doc_id in ids):
            raise ReGradValueError("document ids must be non-empty strings")
        seen, duplicates = set(), set()
        for doc_id in ids:
            (duplicates if doc_id in seen else seen).add(doc_id)
        if duplicates:
            raise ReGradValueError(f"duplicate document ids: {sorted(duplicates)[:5]}")
        existing = sorted(seen & set(self._documents))
        if existing:
            raise ReGradValueError(f"the bank already holds documents with ids {existing[:5]}")
        return ids

    @staticmethod
    def _check_metadata(documents: Sequence[str], metadata) -> list[Mapping[str, Any]]:
        if metadata is None:
            return [{} for _ in documents]
        metadata = list(metadata)
        if len(metadata) != len(documents):
            raise ReGradValueError(f"got {len(metadata)} metadata entries for {len(documents)} documents")
        for index, entry in enumerate(metadata):
            try:
                json.dumps(dict(entry))
            except (TypeError, ValueError) as error:
                raise ReGradValueError(f"metadata of document {index} is not JSON-serialisable: {error}") from error
        return metadata

    def _check_known(self, ids: Sequence[str]) -> None:
        unknown = [doc_id for doc_id in ids if doc_id not in self._documents]
        if unknown:
            raise ReGradKeyError(f"unknown document ids: {unknown[:5]}")

    def _attach_shards(self, location: Location, shards: list[dict[str, str]], eager: bool) -> None:
        """Points the bank at its shard files; opens them all now if `eager`, else each on its first use."""
        rows_per_shard = [0] * len(shards)
        for document in self._documents.values():
            if document.shard is not None and 0 <= document.shard < len(shards):
                rows_per_shard[document.shard] = max(rows_per_shard[document.shard], document.row + 1)
        self._location = location
        self._shard_files = [shard["file"] for shard in shards]
        self._shard_rows = rows_per_shard
        self._shard_checksums = [shard["sha256"] for shard in shards]
        self._readers, self._shard_handles = [None] * len(shards), [None] * len(shards)
        self._verified_shards = set()
        for index in range(len(shards) if eager else 0):
            self._open_shard(index)

    def _open_shard(self, index: int) -> None:
        """Opens (memory-maps) one shard, downloading it first if the bank is in a Hub repo, and checks its header
        against the bank. Its checksum is verified separately, before its first row is used (see `_row`)."""
        path = self._location.fetch(self._shard_files[index])
        try:
            reader = safe_open(str(path), framework="pt", device="cpu")
        except Exception as error:  # safetensors raises its own error type for a bad header
            raise ReGradValueError(f"bank file {path} is not a readable safetensors file: {error}") from error
        if set(reader.keys()) != set(self.parameter_shapes):
            raise ReGradValueError(f"bank file {path} holds other tensors than the bank's LoRA tensors")
        expected_dtype, rows = _SAFETENSORS_DTYPES[self.dtype], self._shard_rows[index]
        for name, shape in self.parameter_shapes.items():
            tensor = reader.get_slice(name)
            if tensor.get_dtype() != expected_dtype or tensor.get_shape()[1:] != list(shape):
                raise ReGradValueError(
                    f"bank file {path}: tensor {name} is {tensor.get_dtype()} {tensor.get_shape()}, expected "
                    f"{expected_dtype} [rows, {', '.join(map(str, shape))}]"
                )
            if tensor.get_shape()[0] < rows:
                raise ReGradValueError(f"bank file {path}: {name} has {tensor.get_shape()[0]} rows, needs {rows}")
        self._readers[index] = reader
        self._shard_handles[index] = open(path, "rb")  # noqa: SIM115 - held open for the bank's lifetime, like the mmap

    def _verify_shard(self, index: int) -> None:
        """Checks a shard's SHA-256 against bank_config.json once, before its first row is used: a flipped bit in
        the gradient data would otherwise go unnoticed."""
        handle = self._shard_handles[index]
        handle.seek(0)
        if _sha256(handle) != self._shard_checksums[index]:
            raise ReGradValueError(
                f"bank file {handle.name} does not match its checksum in {CONFIG_FILE}: it is corrupted; rebuild it"
            )
        self._verified_shards.add(index)

    def _row(self, doc_id: str, name: str) -> torch.Tensor:
        if doc_id in self._in_memory:
            return self._in_memory[doc_id][name]
        document = self._documents[doc_id]
        if document.shard not in self._verified_shards:
            if self._readers[document.shard] is None:
                self._open_shard(document.shard)
            self._verify_shard(document.shard)
        return self._readers[document.shard].get_slice(name)[document.row : document.row + 1][0]

    def _write(self, directory: Path, max_shard_bytes: int) -> tuple[dict[str, tuple[int, int]], list[dict[str, str]]]:
        """Writes every bank file into `directory`. Returns where each document's gradient went, and the shards
        (file and SHA-256)."""
        bytes_per_document = sum(
            int(np.prod(shape)) * _TORCH_DTYPES[self.dtype].itemsize for shape in self.parameter_shapes.values()
        )
        per_shard = max(1, max_shard_bytes // max(1, bytes_per_document))
        ids = self.ids
        (directory / GRADIENTS_DIR).mkdir()
        placements: dict[str, tuple[int, int]] = {}
        shards: list[dict[str, str]] = []
        for shard, start in enumerate(range(0, len(ids), per_shard)):
            chunk = ids[start : start + per_shard]
            relative = f"{GRADIENTS_DIR}/shard-{shard:05d}.safetensors"
            tensors = {
                name: torch.stack([self._row(i, name) for i in chunk]).contiguous() for name in self.parameter_shapes
            }
            metadata = {"format": "pt", "fingerprint": self.fingerprint}
            atomic_save_safetensors(tensors, directory / relative, metadata=metadata)
            with open(directory / relative, "rb") as written:
                shards.append({"file": relative, "sha256": _sha256(written)})
            placements.update({doc_id: (shard, row) for row, doc_id in enumerate(chunk)})

        lines = []
        for doc_id in ids:
            document = self._documents[doc_id]
            shard, row = placements[doc_id]
            record = {"id": doc_id, "text": document.text, "metadata": document.metadata, "key": document.key}
            lines.append(json.dumps({**record, "shard": shard, "row": row}, ensure_ascii=False) + "\n")
        (directory / DOCUMENTS_FILE).write_text("".join(lines), encoding="utf-8")
        self._index.save(str(directory / INDEX_FILE))
        config = {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "learner": self.learner,
            "embedder": self.embedder_name,
            "embedding_dim": self.embedding_dim,
            "index_metric": "cos",
            "index_dtype": INDEX_DTYPE,
            "dtype": self.dtype,
            "num_documents": len(ids),
            "parameter_shapes": {name: list(shape) for name, shape in self.parameter_shapes.items()},
            "shards": [
                {**shard, "num_documents": sum(1 for s, _ in placements.values() if s == index)}
                for index, shard in enumerate(shards)
            ],
        }
        atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        return placements, shards

    def __repr__(self) -> str:
        return (
            f"GradientBank(documents={len(self)}, dtype={self.dtype}, embedder={self.embedder_name!r}, "
            f"fingerprint={self.fingerprint[:12]})"
        )


def _sha256(handle) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(1 << 22), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _check_finite(stacked: Mapping[str, torch.Tensor], ids: Sequence[str], where: str = "") -> None:
    """Raises [`ReGradValueError`] naming the documents whose gradients hold NaN or inf values."""
    bad = set()
    for tensor in stacked.values():
        finite = torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
        bad.update(index for index in range(len(ids)) if not finite[index])
    if bad:
        names = [ids[index] for index in sorted(bad)]
        raise ReGradValueError(f"the gradients of documents {names[:5]} contain NaN or inf values{where}")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ReGradValueError(f"bank file {path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReGradValueError(f"bank file {path} is not valid JSON: {error}") from error


def _recover_interrupted_save(target: Path) -> None:
    """Puts the previous bank back if a save was killed between moving it aside and moving the new one in."""
    if target.exists():
        return
    backups = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if backups and (backups[-1] / CONFIG_FILE).is_file():
        backups[-1].rename(target)
        warnings.warn(f"{target}: a save was interrupted; restored the previous bank", UserWarning, stacklevel=3)


def _replace_directory(staging: Path, target: Path) -> None:
    """Puts `staging` in the place of `target`, keeping the files of `target` that are not part of a bank."""
    if not target.exists():
        staging.rename(target)
        return
    for entry in target.iterdir():
        if entry.name not in BANK_FILES and not (staging / entry.name).exists():
            copy = shutil.copytree if entry.is_dir() else shutil.copy2
            copy(entry, staging / entry.name)
    backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(backup)
    try:
        staging.rename(target)
    except BaseException:
        backup.rename(target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
