"""`GradientBank`: documents, their embeddings (usearch) and their gradients (safetensors shards).

The facade composes the bank's parts: the [`Catalogue`] (ids, texts, metadata, rows), the [`EmbeddingIndex`]
(embedder + usearch), the [`ShardStore`] (gradients in memory and in shards, in a [`GradientFormat`]); directory
I/O is in [`regrad_hf.bank.directory`] and [`regrad_hf.bank.schema`], resumable builds in
[`regrad_hf.bank.building`]. The bank knows nothing about generation: it computes gradients through the model it is
given ([`GradientSource`]) and hands stacked gradients back through [`GradientBank.gather`].
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..adaptation.deltas import check_documents, truncation_report
from ..adaptation.learner import fingerprint_of
from ..data.task import dataset_documents
from ..errors import ReGradValueError
from ..files import output_directory
from ..hub.repos import HubOptions
from . import index as index_module
from . import persistence
from .building import add_documents, build_into, check_learner, check_source
from .catalogue import Catalogue, Hit
from .index import EmbeddingIndex, IndexSettings
from .parts import GradientSource
from .quantization import gradient_format
from .shards import ShardStore, all_finite, check_finite

DEFAULT_MAX_SHARD_BYTES = 1 << 30


class GradientBank:
    """An indexed store of per-document gradients for one learner.

    Build one with [`GradientBank.build`] or load one with [`GradientBank.from_pretrained`]; the constructor is for
    those two.

    One bank may be used by many threads: every read and change of its documents, index and gradients happens under
    its re-entrant `lock` (a save holds it while it writes; an `add` computes its gradients without it), so each call
    sees the bank before or after another thread's change, never half of one.

    Args:
        learner (`Mapping[str, str]`): the identity of the learner whose gradients the bank holds (its
            `learner_identity()`: base model and revision, LoRA layout and values hashes, gradient format).
        parameter_shapes (`Mapping[str, Sequence[int]]`): shape of each LoRA tensor, by name.
        embedding_dim (`int`): dimension of the embedder's vectors.
        embedder (`str`, *optional*): sentence-transformers model name or path; `None` is the embedded default.
        dtype (`str`, defaults to `"bfloat16"`): how gradients are stored: `"float32"`, `"float16"`, `"bfloat16"`,
            or quantised `"int8"`, `"int4"`, `"int3"`, `"int2"` (see [`regrad_hf.bank.quantization`]).
        embedder_model (*optional*): an already loaded `SentenceTransformer` for `embedder`.
        quantization (`Mapping`, *optional*): a quantised format's parameters as read from `bank_config.json`.
        embedder_identity (`str`, *optional*): the identity the embedder must have (see
            [`regrad_hf.bank.index.embedder_identity`]); `None` takes the embedder's own.
        index_settings (`Mapping` or [`IndexSettings`], *optional*): the usearch HNSW settings, any of
            `connectivity`, `expansion_add`, `expansion_search` (see [`regrad_hf.bank.index.IndexSettings`]); the
            others, or all with `None`, are [`regrad_hf.bank.index.DEFAULT_INDEX_SETTINGS`]. Saved with the bank.
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
        embedder_identity: str | None = None,
        index_settings: Mapping[str, int] | IndexSettings | None = None,
    ):
        self.format = gradient_format(dtype, quantization)
        settings = IndexSettings.from_mapping(index_settings)
        self.learner = dict(learner)
        self.fingerprint = fingerprint_of(self.learner)
        self.parameter_shapes = {name: tuple(shape) for name, shape in parameter_shapes.items()}
        self.dtype = dtype
        self.catalogue = Catalogue()
        self.index = EmbeddingIndex(embedder, embedding_dim, embedder_model, embedder_identity, settings)
        self.store = ShardStore(self.parameter_shapes, self.format, self.fingerprint)
        self.lock = threading.RLock()

    @property
    def embedder_name(self) -> str:
        return self.index.embedder_name

    @property
    def embedding_dim(self) -> int:
        return self.index.dimension

    @property
    def embedder(self):
        """The sentence-transformers model, loaded on first use."""
        return self.index.embedder

    @property
    def index_settings(self) -> IndexSettings:
        """The usearch HNSW settings of the bank's index (saved in `bank_config.json`)."""
        return self.index.settings

    # ------------------------------------------------------------------ building

    @classmethod
    @truncation_report()  # one warning per build, however many batches it tokenizes
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
        index_settings: Mapping[str, int] | IndexSettings | None = None,
    ) -> GradientBank:
        """Builds a bank from documents: embeds them and computes their gradients with `model`.

        Args:
            model ([`ReGradForCausalLM`]): the learner; its config gives the embedder and the bank dtype.
            documents (`Sequence[str]` or `datasets.Dataset`): the texts, or a dataset (`Dataset`, `DatasetDict` with
                a `"train"` split, streamed `IterableDataset`) whose `text_column` holds them, whose `id_column` (if
                given) their ids, and whose other columns their metadata.
            ids (`Sequence[str]`, *optional*): unique ids; defaults to `"0"`, `"1"`, ...
            metadata (`Sequence[dict]`, *optional*): JSON-serialisable metadata per document.
            batch_size (`int`, defaults to 16): documents per gradient batch, padded together (and progress-bar step).
            embedder_model (*optional*): an already loaded `SentenceTransformer` matching `model.config.embedder`.
            show_progress (`bool`, defaults to `True`): show a progress bar.
            dtype (`str`, *optional*): how to store the gradients (see [`GradientBank`]); defaults to
                `model.config.bank_dtype`.
            output_dir (`str` or `os.PathLike`, *optional*): build resumably into this directory: every finished
                shard is checkpointed (in the hidden sibling `.<name>.build/`, see [`regrad_hf.bank.checkpoint`]),
                and calling `build` again with the same learner and documents after an interruption skips the
                finished shards and gives the same bank as an uninterrupted build. The finished bank replaces the
                directory's bank files as [`save_pretrained`] does, and is returned loaded from there. Resuming with
                another learner raises [`BankMismatchError`], with other documents or settings [`ReGradValueError`].
            max_shard_bytes (`int`, defaults to 1 GiB): with `output_dir`, the shard (and checkpoint) size, and the
                unit of work of a multi-process build.
            text_column (`str`, defaults to `"text"`), id_column (`str`, *optional*): for a `datasets.Dataset`.
            index_settings (`Mapping`, *optional*): the usearch HNSW settings (see [`GradientBank`]).

        With `output_dir` and an initialised `torch.distributed` process group (`torchrun`, `accelerate launch`),
        every process must call `build` with the same arguments: each computes a share of the shards into the
        build directory, which must be on a filesystem they all see, and process 0 publishes the bank, which every
        process then returns. Without `output_dir`, every process builds the whole bank in memory.

        Returns:
            [`GradientBank`]
        """
        check_source(model)  # the model and the settings are checked before any work
        settings = IndexSettings.from_mapping(index_settings)
        documents, ids, metadata = dataset_documents(documents, ids, metadata, text_column, id_column)
        check_documents(documents)
        embedder_model = embedder_model or index_module.load_embedder(model.config.embedder)
        bank = cls(
            learner=model.learner_identity(),
            parameter_shapes={name: p.shape for name, p in model.lora_parameters().items()},
            embedding_dim=embedder_model.get_embedding_dimension(),
            embedder=model.config.embedder,
            dtype=dtype or model.config.bank_dtype,
            embedder_model=embedder_model,
            index_settings=settings,
        )
        if output_dir is not None:
            return build_into(
                bank, model, documents, ids, metadata, batch_size, show_progress, output_dir, max_shard_bytes
            )
        bank.add(model, documents, ids=ids, metadata=metadata, batch_size=batch_size, show_progress=show_progress)
        return bank

    @truncation_report()
    def add(
        self,
        model: GradientSource,
        documents: Sequence[str],
        ids: Sequence[str] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        batch_size: int = 16,
        show_progress: bool = True,
        text_column: str = "text",
        id_column: str | None = None,
    ) -> list[str]:
        """Adds documents (texts or a dataset, as [`build`] takes them). Everything is validated and computed before
        the bank changes, so a failure adds nothing.

        Returns:
            `list[str]`: the ids of the added documents.
        """
        documents, ids, metadata = dataset_documents(documents, ids, metadata, text_column, id_column)
        return add_documents(self, model, documents, ids, metadata, batch_size, show_progress)

    def remove(self, ids: str | Sequence[str]) -> None:
        """Removes documents by id. Unknown or repeated ids raise [`ReGradKeyError`] or [`ReGradValueError`]
        before anything is removed."""
        ids = self.catalogue.id_list(ids, "remove")
        with self.lock:
            self.catalogue.check_known(ids)
            if len(set(ids)) != len(ids):
                repeated = sorted({doc_id for doc_id in ids if ids.count(doc_id) > 1})
                raise ReGradValueError(f"remove got ids {repeated[:5]} more than once; nothing was removed")
            for doc_id in ids:
                document = self.catalogue.pop(doc_id)
                self.index.remove(document.key)
                self.store.in_memory.pop(doc_id, None)

    def check_learner(self, model: GradientSource) -> None:
        """Raises [`BankMismatchError`] unless `model` is the learner this bank was built with."""
        check_learner(self, model)

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self.catalogue)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self.catalogue

    @property
    def ids(self) -> list[str]:
        """The document ids, in insertion order."""
        with self.lock:  # a copy while no other thread inserts
            return self.catalogue.ids

    def document(self, doc_id: str) -> Hit:
        """The stored text and metadata of one document (score 1.0)."""
        with self.lock:
            self.catalogue.check_known([doc_id])  # type-checked too
            return self.catalogue[doc_id].hit(1.0)

    def search(self, query: str | Sequence[str], k: int = 3, exact: bool | None = None) -> list[Hit] | list[list[Hit]]:
        """The `k` documents most similar to the query (cosine similarity of the embeddings).

        Args:
            query (`str` or `Sequence[str]`): one query, or several.
            k (`int`, defaults to 3): how many documents per query; at most the size of the bank.
            exact (`bool`, *optional*): compare the query with every document (the true top `k`, whatever the
                order the index was built in) instead of walking usearch's approximate HNSW graph. Defaults to
                `True` for banks of up to `EXACT_SEARCH_MAX_DOCUMENTS` (1,000) documents, where the scan is as
                fast as the graph, and `False` above (see `index_settings`).

        Returns:
            `list[Hit]` for one query, `list[list[Hit]]` for several, best first.
        """
        single, queries = index_module.query_list(query)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ReGradValueError(f"k must be a positive integer, got {k!r}")
        self._check_k(k)  # before the embedder runs
        vectors = self.index.embed(queries)
        with self.lock:  # the index and the catalogue of one moment, whatever other threads add or remove
            self._check_k(k)
            found = self.index.search(vectors, k, exact)
            results = [[self.catalogue.by_key(key).hit(score) for key, score in hits] for hits in found]
        return results[0] if single else results

    def _check_k(self, k: int) -> None:
        if k > len(self):
            raise ReGradValueError(f"top_k={k} is larger than the bank, which holds {len(self)} documents")

    def gather(self, ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """The stored gradients of the documents, stacked: `{name: tensor of shape (len(ids), *shape)}`.

        Rows on disk are read from memory-mapped shards with one `index_select` per stored tensor and shard, and
        quantised formats are dequantised in one pass over all the rows. Float formats give the stored dtype;
        quantised formats give float32. The tensors are fresh: writing to them changes nothing in the bank.
        """
        ids = self.catalogue.id_list(ids, "gather")
        if not ids:
            raise ReGradValueError("gather needs at least one document id")
        with self.lock:  # the rows are fresh tensors: decoding needs no lock
            self.catalogue.check_known(ids)
            rows = self.stored_rows(ids)
        gathered, blocks = self.store.decode_all(rows)
        # A corrupted shard must not silently poison an answer (one sum per decoded block; per document if needed).
        if not all_finite(blocks):
            check_finite(gathered, ids, where=" (stored in this bank: the bank file is corrupted; rebuild it)")
        return gathered

    def stored_rows(self, ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """The documents' rows of every stored tensor (LoRA tensor name + format suffix), as stored, stacked."""
        with self.lock:
            placed = [(doc_id, self.catalogue[doc_id].shard, self.catalogue[doc_id].row) for doc_id in ids]
            return self.store.gather(placed)

    @property
    def stored_keys(self) -> list[str]:
        """The names of the tensors in a shard (LoRA tensor names, with the format's suffixes)."""
        return self.store.stored_keys

    @property
    def bytes_per_document(self) -> int:
        """Bytes one document's gradients take in a shard (data only: codes and scales, no file header)."""
        return self.store.bytes_per_document

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
        directory = output_directory(save_directory, "save_directory", create=False)
        with self.lock:  # the files are one state of the bank, and the bank reads from them once they are written
            persistence.save(self, directory, max_shard_bytes)

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
        message = commit_message or f"Upload gradient bank ({len(self)} documents)"
        return persistence.push(self, repo_id, subfolder=subfolder, commit_message=message,
                                commit_description=commit_description, private=private, token=token,
                                revision=revision, create_pr=create_pr, max_shard_bytes=max_shard_bytes,
                                card_data=card_data)  # fmt: skip

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

        Every file is checked before it is trusted (see [`regrad_hf.bank.schema`]): `bank_config.json` and each line
        of `documents.jsonl` against their schema and size limits, the shards' safetensors headers against a size
        limit and the bank's tensor names, dtypes and shapes, the counts of documents, index vectors and shard rows
        against each other. A shard's SHA-256 is verified before its first row is used.

        Raises:
            [`ReGradValueError`]: when a file is missing, malformed or inconsistent (the message names the file and
                the field).
            [`ReGradHubError`]: when the repo cannot be found, or is not cached while offline.
        """
        options = HubOptions(revision, token, cache_dir, local_files_only, force_download)
        return persistence.load(cls, pretrained_bank_name_or_path, subfolder, options, embedder_model)

    def __repr__(self) -> str:
        return (
            f"GradientBank(documents={len(self)}, dtype={self.dtype}, embedder={self.embedder_name!r}, "
            f"fingerprint={self.fingerprint[:12]})"
        )
