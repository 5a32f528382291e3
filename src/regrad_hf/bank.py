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
import logging
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

from . import bank_checkpoint as checkpoint
from .bank_schema import (
    MAX_DOCUMENT_RECORD_BYTES,
    MAX_ID_CHARS,
    MAX_TEXT_CHARS,
    check_metadata_size,
    check_safetensors_header,
    read_json_file,
    validate_config,
    validate_document,
)
from .config import ReGradConfig
from .data import dataset_documents
from .defaults import DEFAULT_EMBEDDER_ID, load_embedder
from .deltas import check_documents
from .distributed import broadcast_flags, everyone, process_rank
from .errors import BankMismatchError, ReGradKeyError, ReGradValueError
from .files import DIRECTORY_MODE, atomic_save_safetensors, atomic_write_text
from .hub import HubOptions, Location, locate, push_folder, render_bank_card
from .learner import fingerprint_of
from .quantization import GradientFormat, gradient_format

# 2: quantised formats (int8/int4/int3/int2: `<name>.codes` and `<name>.scales` per LoRA tensor) and their parameters
# in bank_config.json ("quantization"). Version 1 banks (float formats only) read unchanged.
logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
CONFIG_FILE = "bank_config.json"
DOCUMENTS_FILE = "documents.jsonl"
INDEX_FILE = "index.usearch"
GRADIENTS_DIR = "gradients"
BANK_FILES = (CONFIG_FILE, DOCUMENTS_FILE, INDEX_FILE, GRADIENTS_DIR)
EAGER_FILES = (CONFIG_FILE, DOCUMENTS_FILE, INDEX_FILE)  # downloaded when a bank is loaded from a repo; shards later
# usearch keeps vectors in this scalar type; pinned so an index reads back the same everywhere.
INDEX_DTYPE = "f32"
DEFAULT_MAX_SHARD_BYTES = 1 << 30
# Up to this size `search` scans every vector: recall 1 and results independent of how the HNSW graph was built
# (usearch inserts in parallel threads), for ~30 ms a query at the limit on 2 cores (benchmarks/bench_search.py).
EXACT_SEARCH_MAX_DOCUMENTS = 100_000


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
        dtype (`str`, defaults to `"bfloat16"`): how gradients are stored: `"float32"`, `"float16"`, `"bfloat16"`,
            or quantised `"int8"`, `"int4"`, `"int3"`, `"int2"` (see [`regrad_hf.quantization`]).
        embedder_model (*optional*): an already loaded `SentenceTransformer` for `embedder`.
        quantization (`Mapping`, *optional*): a quantised format's parameters as read from `bank_config.json`.
    """

    def __init__(
        self,
        learner: Mapping[str, str],
        parameter_shapes: Mapping[str, Sequence[int]],
        embedding_dim: int,
        embedder: str | None = None,
        dtype: str = "bfloat16",
        embedder_model=None,
        quantization: Mapping[str, Any] | None = None,
    ):
        self.format: GradientFormat = gradient_format(dtype, quantization)
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
        # stored tensors (by shard key: name + format suffix) of documents not yet saved
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
        batch_size: int = 16,
        embedder_model=None,
        show_progress: bool = True,
        dtype: str | None = None,
        output_dir: str | os.PathLike | None = None,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        text_column: str = "text",
        id_column: str | None = None,
    ) -> GradientBank:
        """Builds a bank from documents: embeds them and computes their gradients with `model`.

        Args:
            model ([`ReGradForCausalLM`]): the learner; its config gives the embedder and the bank dtype.
            documents (`Sequence[str]` or `datasets.Dataset`): the texts, or a dataset whose `text_column` holds
                them (and whose `id_column`, if given, their ids).
            ids (`Sequence[str]`, *optional*): unique ids; defaults to `"0"`, `"1"`, ...
            metadata (`Sequence[dict]`, *optional*): JSON-serialisable metadata per document.
            batch_size (`int`, defaults to 16): documents per gradient batch, padded together (and progress-bar step).
            embedder_model (*optional*): an already loaded `SentenceTransformer` matching `model.config.embedder`.
            show_progress (`bool`, defaults to `True`): show a progress bar.
            dtype (`str`, *optional*): how to store the gradients (see [`GradientBank`]); defaults to
                `model.config.bank_dtype`.
            output_dir (`str` or `os.PathLike`, *optional*): build resumably into this directory: every finished
                shard is checkpointed (in the hidden sibling `.<name>.build/`, see [`regrad_hf.bank_checkpoint`]),
                and calling `build` again with the same learner and documents after an interruption skips the
                finished shards and gives the same bank as an uninterrupted build. The finished bank replaces the
                directory's bank files as [`save_pretrained`] does, and is returned loaded from there. Resuming with
                another learner raises [`BankMismatchError`], with other documents or settings [`ReGradValueError`].
            max_shard_bytes (`int`, defaults to 1 GiB): with `output_dir`, the shard (and checkpoint) size, and the
                unit of work of a multi-process build.
            text_column (`str`, defaults to `"text"`), id_column (`str`, *optional*): for a `datasets.Dataset`.

        With `output_dir` and an initialised `torch.distributed` process group (`torchrun`, `accelerate launch`),
        every process must call `build` with the same arguments: each computes a share of the shards into the
        build directory, which must be on a filesystem they all see, and process 0 publishes the bank, which every
        process then returns. Without `output_dir`, every process builds the whole bank in memory.

        Returns:
            [`GradientBank`]
        """
        documents, ids = dataset_documents(documents, ids, text_column, id_column)
        check_documents(documents)
        embedder_model = embedder_model or load_embedder(model.config.embedder)
        bank = cls(
            learner=model.learner_identity(),
            parameter_shapes={name: p.shape for name, p in model.lora_parameters().items()},
            embedding_dim=embedder_model.get_embedding_dimension(),
            embedder=model.config.embedder,
            dtype=dtype or model.config.bank_dtype,
            embedder_model=embedder_model,
        )
        if output_dir is not None:
            return bank._build_into(
                model, documents, ids, metadata, batch_size, show_progress, Path(output_dir), max_shard_bytes
            )
        bank.add(model, documents, ids=ids, metadata=metadata, batch_size=batch_size, show_progress=show_progress)
        return bank

    def add(
        self,
        model: GradientSource,
        documents: Sequence[str],
        ids: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        batch_size: int = 16,
        show_progress: bool = True,
    ) -> list[str]:
        """Adds documents. Everything is validated and computed before the bank changes, so a failure adds nothing.

        Returns:
            `list[str]`: the ids of the added documents.
        """
        ids, metadata = self._check_new(model, documents, ids, metadata, batch_size)
        embeddings = self._embed(list(documents))
        with tqdm(total=len(documents), desc="Document gradients", disable=not show_progress) as progress:
            stored = self._compute(model, documents, ids, batch_size, progress)
        rows = [{key: tensor[i] for key, tensor in stored.items()} for i in range(len(documents))]

        keys = np.arange(self._next_key, self._next_key + len(documents), dtype=np.uint64)
        self._index.add(keys, embeddings)
        self._next_key += len(documents)
        for key, doc_id, text, meta, row in zip(keys.tolist(), ids, documents, metadata, rows, strict=True):
            self._documents[doc_id] = _Document(id=doc_id, text=text, metadata=dict(meta), key=key)
            self._ids_by_key[key] = doc_id
            self._in_memory[doc_id] = row
        return list(ids)

    def _check_new(
        self,
        model: GradientSource,
        documents: Sequence[str],
        ids: Sequence[str] | None,
        metadata: Sequence[Mapping[str, Any]] | None,
        batch_size: int,
    ) -> tuple[list[str], list[Mapping[str, Any]]]:
        """Validates documents to add (and the model); returns their ids and metadata."""
        check_documents(documents)
        too_long = [index for index, text in enumerate(documents) if len(text) > MAX_TEXT_CHARS]
        if too_long:
            raise ReGradValueError(
                f"documents {too_long[:5]} are longer than {MAX_TEXT_CHARS} characters, the limit a bank stores; "
                "split them first"
            )
        ids = self._new_ids(documents, ids)
        metadata = self._check_metadata(documents, metadata)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ReGradValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.check_learner(model)
        return ids, metadata

    def _compute(
        self, model: GradientSource, documents: Sequence[str], ids: Sequence[str], batch_size: int, progress
    ) -> dict[str, torch.Tensor]:
        """The documents' gradients in the bank's format, stacked, by shard key; non-finite gradients refused."""
        parts: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(documents), batch_size):
            batch = list(documents[start : start + batch_size])
            stacked = model.document_gradients(batch)
            _check_finite(stacked, ids[start : start + batch_size])
            parts.append(self._encode(stacked))
            progress.update(len(batch))
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def _build_into(
        self,
        model: GradientSource,
        documents: Sequence[str],
        ids: Sequence[str] | None,
        metadata: Sequence[Mapping[str, Any]] | None,
        batch_size: int,
        show_progress: bool,
        output_dir: Path,
        max_shard_bytes: int,
    ) -> GradientBank:
        """[`build`] with `output_dir`: shard by shard, checkpointed, resuming a previous interrupted build; with
        several processes, each computes a share of the unfinished shards and process 0 publishes the bank."""
        rank, world = process_rank()
        ids, metadata = everyone(lambda: self._check_new(model, documents, ids, metadata, batch_size), "checking")
        output = output_dir.resolve()
        per_shard = max(1, max_shard_bytes // max(1, self.bytes_per_document))
        expected = checkpoint.new_state(
            self.fingerprint,
            learner=self.learner,
            dtype=self.dtype,
            quantization=self.format.describe(),
            embedder=self.embedder_name,
            documents_digest=checkpoint.documents_digest(ids, documents, metadata),
            num_documents=len(ids),
            documents_per_shard=per_shard,
        )
        work = checkpoint.work_directory(output)

        def check() -> bool:  # read-only, so every process raises the same error itself
            found = checkpoint.find_state(output)
            if found is not None:
                checkpoint.check_same_build(found[1], expected, found[0])
            return found is not None and found[0] == output  # killed after publishing, before tidying up

        if everyone(check, "checking the build directory"):
            everyone(lambda: rank == 0 and checkpoint.remove_build_files(output), "tidying up")
            return GradientBank.from_pretrained(output, embedder_model=self._embedder)

        num_shards = checkpoint.shard_count(expected)
        todo = everyone(lambda: self._prepare_work(work, expected) if rank == 0 else [], "preparing the build")
        todo = broadcast_flags(todo, num_shards)
        mine = [shard for shard in range(num_shards) if todo[shard]][rank::world]
        mine_documents = sum(checkpoint.shard_size(expected, shard) for shard in mine)
        logger.info(
            "%s%d of %d shards (%d documents) to compute",
            f"process {rank} of {world}: " if world > 1 else "",
            len(mine),
            num_shards,
            mine_documents,
        )
        label = "Document gradients" + (f" (process {rank} of {world})" if world > 1 else "")
        with tqdm(
            total=mine_documents,
            desc=label,
            disable=not show_progress or rank != 0,
        ) as progress:
            everyone(
                lambda: self._build_shards(model, documents, ids, batch_size, work, expected, mine, progress),
                "computing",
            )
        everyone(lambda: rank == 0 and self._publish(work, output, expected, ids, documents, metadata), "publishing")
        return GradientBank.from_pretrained(output, embedder_model=self._embedder)

    @staticmethod
    def _prepare_work(work: Path, state: dict[str, Any]) -> list[bool]:
        """Process 0: creates or tidies the work directory; returns, by shard, whether it is still to compute."""
        if not (work / checkpoint.BUILD_STATE_FILE).is_file():
            shutil.rmtree(work, ignore_errors=True)
            for folder in (GRADIENTS_DIR, checkpoint.EMBEDDINGS_DIR, checkpoint.RECORDS_DIR):
                (work / folder).mkdir(parents=True, mode=DIRECTORY_MODE)
            atomic_write_text(work / checkpoint.BUILD_STATE_FILE, json.dumps(state, indent=2) + "\n")
        checkpoint.remove_stray_files(work)
        finished = checkpoint.finished_shards(work, state)
        return [shard not in finished for shard in range(checkpoint.shard_count(state))]

    def _build_shards(
        self,
        model: GradientSource,
        documents: Sequence[str],
        ids: Sequence[str],
        batch_size: int,
        work: Path,
        state: Mapping[str, Any],
        shards: Sequence[int],
        progress,
    ) -> None:
        """Computes and writes `shards` (numbers) into the work directory, each finished by its record."""
        per_shard = state["documents_per_shard"]
        for shard in shards:
            chunk = slice(shard * per_shard, (shard + 1) * per_shard)
            tensors = self._compute(model, documents[chunk], ids[chunk], batch_size, progress)
            embeddings = torch.from_numpy(self._embed(list(documents[chunk])))
            record = self._write_shard(work, shard, tensors)
            relative = f"{checkpoint.EMBEDDINGS_DIR}/shard-{shard:05d}.safetensors"
            atomic_save_safetensors({"embeddings": embeddings}, work / relative)
            record.update(embeddings=relative, embeddings_sha256=checkpoint.file_sha256(work / relative))
            checkpoint.write_record(work, shard, record)

    def _publish(
        self,
        work: Path,
        output: Path,
        state: Mapping[str, Any],
        ids: Sequence[str],
        documents: Sequence[str],
        metadata: Sequence[Mapping[str, Any]],
    ) -> None:
        """Process 0, every shard finished: writes the catalogue and index and swaps the work directory in."""
        num_shards = checkpoint.shard_count(state)
        # Checksums were verified (or computed) as the shards were resumed or written; here only their presence.
        records = checkpoint.finished_shards(work, state, verify=False)
        missing = [shard for shard in range(num_shards) if shard not in records]
        if missing:
            raise ReGradValueError(
                f"shards {missing[:5]} of the build in {work} are not there although their processes finished: with "
                "several machines, the output directory must be on a filesystem that every process sees"
            )
        per_shard = state["documents_per_shard"]
        placements = {doc_id: (index // per_shard, index % per_shard) for index, doc_id in enumerate(ids)}
        for key, (doc_id, text, meta) in enumerate(zip(ids, documents, metadata, strict=True)):
            self._documents[doc_id] = _Document(doc_id, text, dict(meta), key, *placements[doc_id])
            self._ids_by_key[key] = doc_id
        for shard in range(num_shards):
            with safe_open(str(work / records[shard]["embeddings"]), framework="np") as stored:
                vectors = stored.get_tensor("embeddings")
            start = shard * per_shard
            self._index.add(np.arange(start, start + len(vectors), dtype=np.uint64), vectors)
        self._next_key = len(ids)
        shards = [{"file": records[shard]["file"], "sha256": records[shard]["sha256"]} for shard in range(num_shards)]
        self._write_catalog(work, placements, shards)
        self._documents.clear()
        self._ids_by_key.clear()
        _replace_directory(work, output)
        checkpoint.remove_build_files(output)
        for backup in output.parent.glob(f".{output.name}.old-*"):  # left by a kill inside an earlier swap
            shutil.rmtree(backup, ignore_errors=True)

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

    def search(self, query: str | Sequence[str], k: int = 3, exact: bool | None = None) -> list[Hit] | list[list[Hit]]:
        """The `k` documents most similar to the query (cosine similarity of the embeddings).

        Args:
            query (`str` or `Sequence[str]`): one query, or several.
            k (`int`, defaults to 3): how many documents per query; at most the size of the bank.
            exact (`bool`, *optional*): compare the query with every document (the true top `k`, whatever the
                order the index was built in) instead of walking usearch's approximate HNSW graph. Defaults to
                `True` for banks of up to `EXACT_SEARCH_MAX_DOCUMENTS` (100,000) documents, where the scan takes
                milliseconds, and `False` above.

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
        exact = len(self) <= EXACT_SEARCH_MAX_DOCUMENTS if exact is None else exact
        matches = self._index.search(self._embed(queries), k, exact=exact)
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

        Rows on disk are read lazily (memory-mapped `get_slice`), one row per document. Float formats give the
        stored dtype; quantised formats are dequantised to float32.
        """
        if isinstance(ids, str):
            ids = [ids]
        ids = list(ids)
        if not ids:
            raise ReGradValueError("gather needs at least one document id")
        self._check_known(ids)
        gathered = {
            name: self.format.decode(
                {
                    suffix: torch.stack([self._row(doc_id, name + suffix) for doc_id in ids])
                    for suffix in self.format.suffixes
                },
                shape,
            )
            for name, shape in self.parameter_shapes.items()
        }
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
        rows = [sum(1 for s, _ in placements.values() if s == index) for index in range(len(shards))]
        self._attach_shards(Location(target), shards, rows, eager=True)
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

        Every file is checked before it is trusted (see [`regrad_hf.bank_schema`]): `bank_config.json` and each line
        of `documents.jsonl` against their schema and size limits, the shards' safetensors headers against a size
        limit and the bank's tensor names, dtypes and shapes, the counts of documents, index vectors and shard rows
        against each other. A shard's SHA-256 is verified before its first row is used.

        Raises:
            [`ReGradValueError`]: when a file is missing, malformed or inconsistent (the message names the file and
                the field).
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
        config_path = directory / CONFIG_FILE
        config = validate_config(read_json_file(config_path), config_path)
        bank = cls(
            learner=config["learner"],
            parameter_shapes=config["parameter_shapes"],
            embedder=config["embedder"],
            embedding_dim=config["embedding_dim"],
            dtype=config["dtype"],
            embedder_model=embedder_model,
            quantization=config.get("quantization"),
        )
        if bank.fingerprint != config["fingerprint"]:
            raise ReGradValueError(
                f"{config_path}: the fingerprint field does not match the learner field (edited file?)"
            )
        shards = [{"file": shard["file"], "sha256": shard["sha256"]} for shard in config["shards"]]
        shard_sizes = [shard["num_documents"] for shard in config["shards"]]
        for shard in shards:
            if not location.is_remote and not (directory / shard["file"]).is_file():
                raise ReGradValueError(f"bank file {directory / shard['file']} is missing")

        bank._read_documents(directory / DOCUMENTS_FILE, shard_sizes)
        if len(bank._documents) != config["num_documents"]:
            raise ReGradValueError(
                f"{directory / DOCUMENTS_FILE} holds {len(bank._documents)} documents, "
                f"{CONFIG_FILE} says {config['num_documents']}"
            )

        index_path = directory / INDEX_FILE
        if not index_path.is_file():
            raise ReGradValueError(f"bank file {index_path} is missing")
        try:
            bank._index.load(str(index_path))
        except Exception as error:  # usearch raises plain RuntimeError/ValueError on corrupt files
            raise ReGradValueError(f"bank file {index_path} is not a readable usearch index: {error}") from error
        keys = np.fromiter(bank._ids_by_key, dtype=np.uint64, count=len(bank._ids_by_key))
        if len(bank._index) != len(bank._documents) or (len(keys) and not np.all(bank._index.contains(keys))):
            raise ReGradValueError(
                f"{index_path} holds {len(bank._index)} vectors that do not match the {len(bank._documents)} "
                f"documents of {DOCUMENTS_FILE}"
            )
        if bank._index.ndim != bank.embedding_dim:
            raise ReGradValueError(
                f"{index_path} holds {bank._index.ndim}-dim vectors, {CONFIG_FILE} says {bank.embedding_dim}"
            )
        bank._next_key = max(bank._ids_by_key, default=-1) + 1
        # A local shard is opened now: an open shard keeps its contents even if another bank later replaces the
        # file. A repo's shards are immutable files of one commit in the cache, opened when first needed.
        bank._attach_shards(location, shards, shard_sizes, eager=not location.is_remote)
        return bank

    def _read_documents(self, path: Path, shard_sizes: list[int]) -> None:
        """Reads `documents.jsonl`, one checked record per line; ids, index keys and shard rows must be unique."""
        if not path.is_file():
            raise ReGradValueError(f"bank file {path} is missing")
        places = set()
        with open(path, encoding="utf-8") as handle:
            number = 0
            while line := handle.readline(MAX_DOCUMENT_RECORD_BYTES + 1):
                number += 1
                if len(line) > MAX_DOCUMENT_RECORD_BYTES:
                    raise ReGradValueError(
                        f"{path} line {number} is longer than the limit of {MAX_DOCUMENT_RECORD_BYTES} characters"
                    )
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ReGradValueError(f"{path} line {number} is malformed: {error}") from error
                document = _Document(**validate_document(record, path, number, shard_sizes))
                if document.id in self._documents or document.key in self._ids_by_key:
                    duplicate = "id" if document.id in self._documents else "key"
                    raise ReGradValueError(f"{path} line {number}: field {duplicate!r} repeats an earlier document")
                if (document.shard, document.row) in places:
                    raise ReGradValueError(f"{path} line {number}: shard {document.shard} row {document.row} is taken")
                places.add((document.shard, document.row))
                self._documents[document.id] = document
                self._ids_by_key[document.key] = document.id

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
        if any(len(doc_id) > MAX_ID_CHARS for doc_id in ids):
            raise ReGradValueError(f"document ids must be at most {MAX_ID_CHARS} characters long")
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
            if not isinstance(entry, Mapping):
                raise ReGradValueError(f"metadata of document {index} must be a mapping, got {type(entry).__name__}")
            try:
                json.dumps(dict(entry))
            except (TypeError, ValueError) as error:
                raise ReGradValueError(f"metadata of document {index} is not JSON-serialisable: {error}") from error
            check_metadata_size(entry, f"metadata of document {index}")
        return metadata

    def _check_known(self, ids: Sequence[str]) -> None:
        unknown = [doc_id for doc_id in ids if doc_id not in self._documents]
        if unknown:
            raise ReGradKeyError(f"unknown document ids: {unknown[:5]}")

    def _attach_shards(
        self, location: Location, shards: list[dict[str, str]], shard_sizes: list[int], eager: bool
    ) -> None:
        """Points the bank at its shard files (with their row counts from bank_config.json); opens them all now if
        `eager`, else each on its first use."""
        self._location = location
        self._shard_files = [shard["file"] for shard in shards]
        self._shard_rows = list(shard_sizes)
        self._shard_checksums = [shard["sha256"] for shard in shards]
        self._readers, self._shard_handles = [None] * len(shards), [None] * len(shards)
        self._verified_shards = set()
        for index in range(len(shards) if eager else 0):
            self._open_shard(index)

    def _open_shard(self, index: int) -> None:
        """Opens (memory-maps) one shard, downloading it first if the bank is in a Hub repo, and checks its header
        against the bank: header size, tensor names, dtypes, row shapes and row counts. An open shard keeps its
        contents even if another bank later replaces the file on disk, so a bank never reads rows written for a
        different layout. Its checksum is verified separately, before its first row is used (see `_row`)."""
        path = self._location.fetch(self._shard_files[index])
        check_safetensors_header(path)
        try:
            reader = safe_open(str(path), framework="pt", device="cpu")
        except Exception as error:  # safetensors raises its own error type for a bad header
            raise ReGradValueError(f"bank file {path} is not a readable safetensors file: {error}") from error
        expected = {
            name + suffix: spec
            for name, shape in self.parameter_shapes.items()
            for suffix, spec in self.format.specs(shape).items()
        }
        if set(reader.keys()) != set(expected):
            raise ReGradValueError(
                f"bank file {path} holds other tensors than the bank's LoRA tensors in format {self.dtype}"
            )
        rows = self._shard_rows[index]
        for key, (dtype, row_shape) in expected.items():
            tensor = reader.get_slice(key)
            if tensor.get_dtype() != dtype or tensor.get_shape()[1:] != list(row_shape):
                raise ReGradValueError(
                    f"bank file {path}: tensor {key} is {tensor.get_dtype()} {tensor.get_shape()}, expected "
                    f"{dtype} [rows, {', '.join(map(str, row_shape))}]"
                )
            if tensor.get_shape()[0] != rows:
                raise ReGradValueError(
                    f"bank file {path}: {key} has {tensor.get_shape()[0]} rows, {CONFIG_FILE} says {rows}"
                )
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

    def _row(self, doc_id: str, key: str) -> torch.Tensor:
        """One document's row of a stored tensor (`key` = LoRA tensor name + format suffix), as stored."""
        if doc_id in self._in_memory:
            return self._in_memory[doc_id][key]
        document = self._documents[doc_id]
        if document.shard not in self._verified_shards:
            if self._readers[document.shard] is None:
                self._open_shard(document.shard)
            self._verify_shard(document.shard)
        return self._readers[document.shard].get_slice(key)[document.row : document.row + 1][0]

    def _encode(self, stacked: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stacked float gradients -> the stored tensors of the bank's format, by shard key."""
        return {
            name + suffix: tensor
            for name, gradients in stacked.items()
            for suffix, tensor in self.format.encode(gradients).items()
        }

    @property
    def stored_keys(self) -> list[str]:
        """The names of the tensors in a shard (LoRA tensor names, with the format's suffixes)."""
        return [name + suffix for name in self.parameter_shapes for suffix in self.format.suffixes]

    @property
    def bytes_per_document(self) -> int:
        """Bytes one document's gradients take in a shard (data only: codes and scales, no file header)."""
        return self.format.bytes_per_document(self.parameter_shapes)

    def _write(self, directory: Path, max_shard_bytes: int) -> tuple[dict[str, tuple[int, int]], list[dict[str, str]]]:
        """Writes every bank file into `directory`. Returns where each document's gradient went, and the shards
        (file and SHA-256)."""
        per_shard = max(1, max_shard_bytes // max(1, self.bytes_per_document))
        ids = self.ids
        (directory / GRADIENTS_DIR).mkdir()
        placements: dict[str, tuple[int, int]] = {}
        shards: list[dict[str, str]] = []
        for shard, start in enumerate(range(0, len(ids), per_shard)):
            chunk = ids[start : start + per_shard]
            tensors = {key: torch.stack([self._row(i, key) for i in chunk]) for key in self.stored_keys}
            shards.append(self._write_shard(directory, shard, tensors))
            placements.update({doc_id: (shard, row) for row, doc_id in enumerate(chunk)})
        self._write_catalog(directory, placements, shards)
        return placements, shards

    def _write_shard(self, directory: Path, shard: int, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
        """Writes one shard (atomically); returns its file name and SHA-256."""
        relative = f"{GRADIENTS_DIR}/shard-{shard:05d}.safetensors"
        # one metadata key: safetensors writes several in a per-process random order, and shards should be
        # byte-for-byte reproducible (a resumed build equals an uninterrupted one)
        metadata = {"fingerprint": self.fingerprint}
        atomic_save_safetensors(tensors, directory / relative, metadata=metadata)
        with open(directory / relative, "rb") as written:
            return {"file": relative, "sha256": _sha256(written)}

    def _write_catalog(
        self, directory: Path, placements: Mapping[str, tuple[int, int]], shards: list[dict[str, str]]
    ) -> None:
        """Writes documents.jsonl, index.usearch and bank_config.json (last: a directory with it is complete)."""
        lines = []
        for doc_id in self.ids:
            document = self._documents[doc_id]
            shard, row = placements[doc_id]
            record = {"id": doc_id, "text": document.text, "metadata": document.metadata, "key": document.key}
            lines.append(json.dumps({**record, "shard": shard, "row": row}, ensure_ascii=False) + "\n")
        atomic_write_text(directory / DOCUMENTS_FILE, "".join(lines))
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
            "quantization": self.format.describe(),
            "num_documents": len(placements),
            "parameter_shapes": {name: list(shape) for name, shape in self.parameter_shapes.items()},
            "shards": [
                {**shard, "num_documents": sum(1 for s, _ in placements.values() if s == index)}
                for index, shard in enumerate(shards)
            ],
        }
        atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")

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
        if entry.name not in BANK_FILES + checkpoint.BUILD_FILES and not (staging / entry.name).exists():
            copy = shutil.copytree if entry.is_dir() else shutil.copy2
            partial = staging / f".{entry.name}.copying"  # renamed when complete: a kill never leaves half a copy
            copy(entry, partial)
            partial.rename(staging / entry.name)
    backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(backup)
    try:
        staging.rename(target)
    except BaseException:
        backup.rename(target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
