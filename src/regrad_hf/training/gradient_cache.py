"""Document gradients cached for a training phase in which the LoRA start theta0 is frozen.

With theta0 fixed, a document's gradient is a constant: computed once (no graph, batched per-sample gradients as a
bank computes them), it serves every question of its group and every group that retrieves it as a distractor.
What is trained on top (the step sizes) is then exactly first order and costs a forward and backward of the short
question prompts only. A cache is valid for as long as theta0 does not move: [`DocumentGradientCache.check`]
refuses to serve gradients of LoRA tensors that have changed since they were computed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from ..adaptation.deltas import document_gradients
from ..errors import ReGradValueError


class DocumentGradientCache:
    """Per-document gradients w.r.t. a learner's LoRA tensors, least recently used evicted first.

    Args:
        learner ([`ReGradForCausalLM`]): the learner whose (frozen) LoRA tensors the gradients are taken at.
        max_tokens (`int`): document truncation, the inner step's (`inner_max_document_tokens`).
        max_documents (`int`, defaults to 1024): documents kept; ~6 MB each in float32 for the shipped layout.
    """

    def __init__(self, learner, max_tokens: int, max_documents: int = 1024) -> None:
        if isinstance(max_documents, bool) or not isinstance(max_documents, int) or max_documents < 1:
            raise ReGradValueError(f"max_documents must be a positive integer, got {max_documents!r}")
        self.learner = learner
        self.max_tokens = max_tokens
        self.max_documents = max_documents
        self._gradients: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._theta = self._snapshot()
        self.hits = 0
        self.misses = 0

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.learner.lora_parameters().items()}

    def check(self) -> None:
        """Raises [`ReGradValueError`] when the LoRA tensors moved since the cache was made (stale gradients)."""
        for name, p in self.learner.lora_parameters().items():
            if not torch.equal(p.detach(), self._theta[name]):
                raise ReGradValueError(
                    f"the LoRA tensor {name} changed since its document gradients were cached: a gradient cache "
                    "needs theta0 frozen (cached_gradients trains the step sizes only)"
                )

    def summed(self, documents: Sequence[str]) -> dict[str, torch.Tensor]:
        """The float32 sum, in the given order, of the documents' gradients (computing the missing ones).

        Args:
            documents (`Sequence[str]`): a task's documents (duplicates count as many times as they occur).

        Returns:
            `dict[str, torch.Tensor]`: one summed gradient per LoRA tensor name.
        """
        self.check()
        missing = [d for d in dict.fromkeys(documents) if d not in self._gradients]
        self.hits += len(set(documents)) - len(missing)
        self.misses += len(missing)
        if missing:
            self._compute(missing)
        total: dict[str, torch.Tensor] = {}
        for document in documents:
            self._gradients.move_to_end(document)
            for name, gradient in self._gradients[document].items():
                # float32, and a copy: the cached tensors are never handed out to be aliased
                total[name] = gradient.to(torch.float32, copy=True) if name not in total else total[name] + gradient
        while len(self._gradients) > self.max_documents:
            self._gradients.popitem(last=False)
        return total

    def _compute(self, documents: list[str]) -> None:
        learner = self.learner
        with torch.enable_grad():
            stacked = document_gradients(
                learner.language_model, learner.tokenizer, learner.lora_parameters(), documents, self.max_tokens
            )
        for row, document in enumerate(documents):
            self._gradients[document] = {name: g[row].clone() for name, g in stacked.items()}

    def __len__(self) -> int:
        return len(self._gradients)
