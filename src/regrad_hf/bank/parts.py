"""What a bank is made of, as the modules that build, write and read banks see it: [`BankParts`] (the parts and the
identity of a [`GradientBank`]) and [`GradientSource`] (what a bank needs of a model).

The facade [`GradientBank`] composes these parts and calls [`regrad_hf.bank.building`] and
[`regrad_hf.bank.persistence`], which work on a `BankParts`: so they need not import the facade that imports them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from .catalogue import Catalogue
from .index import EmbeddingIndex, IndexSettings
from .quantization import GradientFormat
from .shards import ShardStore

if TYPE_CHECKING:
    from ..config import ReGradConfig


class GradientSource(Protocol):
    """What a bank needs from a model to add documents (implemented by [`ReGradForCausalLM`])."""

    config: ReGradConfig

    def learner_identity(self) -> dict[str, str]: ...

    def lora_parameters(self) -> Mapping[str, torch.Tensor]: ...

    def document_gradients(self, documents: Sequence[str]) -> dict[str, torch.Tensor]: ...


class BankParts(Protocol):
    """A bank's parts and identity (implemented by [`GradientBank`]); see the facade for what each holds."""

    learner: dict[str, str]
    fingerprint: str
    parameter_shapes: dict[str, tuple[int, ...]]
    dtype: str
    format: GradientFormat
    catalogue: Catalogue
    index: EmbeddingIndex
    store: ShardStore
    lock: AbstractContextManager

    @property
    def embedder_name(self) -> str: ...

    @property
    def embedding_dim(self) -> int: ...

    @property
    def index_settings(self) -> IndexSettings: ...

    @property
    def ids(self) -> list[str]: ...

    def stored_rows(self, ids: Sequence[str]) -> dict[str, torch.Tensor]: ...

    def check_learner(self, model: GradientSource) -> None: ...

    @classmethod
    def from_pretrained(cls, pretrained_bank_name_or_path: str | os.PathLike, **kwargs: Any) -> BankParts: ...


# A function given a bank (or a bank class) hands back that same type.
Bank = TypeVar("Bank", bound=BankParts)
