"""Tokenising meta-learning tasks for [`ReGradTrainer`] and the prompt a question is asked with."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adaptation.deltas import tokenize_documents
from ..errors import ReGradValueError
from ..prompting import PromptTemplate
from .grouping import TaskGroup
from .task import Task, task_from_record


def question_prompt(
    tokenizer, question: str, documents: Sequence[str] | None = None, prompt: PromptTemplate | None = None
) -> str:
    """The prompt a question is asked with: the question alone (blind), or with the documents (ICL), written with
    `prompt` (defaults to [`PromptTemplate`]'s defaults, those of a new [`ReGradConfig`]) through the tokenizer's
    chat template when it has one."""
    return (prompt or PromptTemplate()).build(tokenizer, question, documents)


def answer_suffix(tokenizer) -> str:
    """What ends an answer: the end-of-turn/eos token, so a trained model learns to stop."""
    return tokenizer.eos_token or ""


@dataclass
class TaskCollator:
    """Tokenises tasks for [`ReGradTrainer`]: `{"tasks": [one dict of tensors per task]}`.

    Each task dict holds `document_ids`/`document_mask` (the documents, right-padded, truncated to
    `max_document_tokens`), `documents` (their texts, for a gradient cache) and `input_ids`/`labels` (prompt +
    answer, one row per question; labels are -100 on the prompt and on the right padding). A [`Task`] has one row;
    a [`TaskGroup`] one per question, all trained against the group's one inner step.

    Args:
        tokenizer: the model's tokenizer.
        max_document_tokens (`int`): document truncation length for the inner step.
        max_answer_tokens (`int`): answers longer than this raise (they would dominate the outer loss).
        blind (`bool`): `True` asks the question alone; `False` also puts the documents in the prompt.
        documents_per_task (`int`): when larger than a task's own documents, other tasks' documents are added
            as distractors (sampled from `distractor_pool`), as top-k retrieval would.
        distractor_pool (`Sequence[str]`): documents to sample distractors from.
        seed (`int`): seed of the distractor sampling. A task's distractors depend only on the seed and the task
            (not on what was collated before), so a resumed run sees the same batches as an uninterrupted one.
        prompt ([`PromptTemplate`]): the question prompt; pass the learner's (`PromptTemplate.from_config(config)`,
            as [`ReGradTrainer`] does) so that it is trained the way it is served. Defaults to a new config's.
        icl_share (`float`): with `blind`, the share of tasks (drawn per task with `seed`) whose questions also have
            the task's documents in the prompt, so that one learner is trained both for ReGrad and for ReGrad+ICL.
        teacher_prompts (`bool`): also encode each question with every document of the task in the prompt
            (`teacher_input_ids`/`teacher_labels`, the same answer tokens), for a RAG teacher (see
            [`regrad_hf.adaptation.distillation`]).
    """

    tokenizer: Any
    max_document_tokens: int = 512
    max_answer_tokens: int = 48
    blind: bool = True
    documents_per_task: int = 1
    distractor_pool: Sequence[str] = ()
    seed: int = 0
    prompt: PromptTemplate = field(default_factory=PromptTemplate)
    icl_share: float = 0.0
    teacher_prompts: bool = False

    def __post_init__(self):
        if self.documents_per_task < 1:
            raise ReGradValueError("documents_per_task must be at least 1")
        if isinstance(self.icl_share, bool) or not 0 <= self.icl_share <= 1:
            raise ReGradValueError(f"icl_share must be between 0 and 1, got {self.icl_share!r}")

    def __call__(self, tasks: Sequence[Task | TaskGroup | Mapping]) -> dict[str, list[dict[str, torch.Tensor]]]:
        return {
            "tasks": [
                self.encode(task if isinstance(task, (Task, TaskGroup)) else task_from_record(task)) for task in tasks
            ]
        }

    def encode(self, task: Task | TaskGroup) -> dict[str, torch.Tensor]:
        questions = task.tasks if isinstance(task, TaskGroup) else (task,)
        documents = list(task.documents) + self._distractors(questions[0])
        tokenizer = self.tokenizer
        encoded_documents = tokenize_documents(tokenizer, documents, self.max_document_tokens)
        length = max(len(ids) for ids in encoded_documents)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        document_ids = torch.full((len(encoded_documents), length), pad, dtype=torch.long)
        document_mask = torch.zeros((len(encoded_documents), length), dtype=torch.long)
        for row, ids in enumerate(encoded_documents):
            document_ids[row, : len(ids)] = torch.tensor(ids)
            document_mask[row, : len(ids)] = 1

        in_prompt = None if self.blind and not self._with_documents(questions[0]) else task.documents
        input_ids, labels = self._rows([self._question_row(question, in_prompt) for question in questions], pad)
        encoded = {
            "document_ids": document_ids,
            "document_mask": document_mask,
            "documents": tuple(documents),
            "input_ids": input_ids,
            "labels": labels,
        }
        if self.teacher_prompts:
            teacher = [self._question_row(question, documents) for question in questions]
            encoded["teacher_input_ids"], encoded["teacher_labels"] = self._rows(teacher, pad)
        return encoded

    @staticmethod
    def _rows(rows: Sequence[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_ids` and `labels` of question rows (token ids, prompt length): labels are -100 on the prompt."""
        # Right padding: with causal attention a row's real tokens never see the padding after them.
        input_ids = torch.full((len(rows), max(len(ids) for ids, _ in rows)), pad, dtype=torch.long)
        labels = torch.full_like(input_ids, -100)
        for row, (ids, prompt_length) in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, prompt_length : len(ids)] = input_ids[row, prompt_length : len(ids)]
        return input_ids, labels

    def _question_row(self, task: Task, documents: Sequence[str] | None) -> tuple[list[int], int]:
        """A question's prompt (with `documents`, or the question alone for `None`) + answer token ids and the
        prompt's length."""
        tokenizer = self.tokenizer
        prompt = self.prompt.build(tokenizer, task.question, documents)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(task.answer.strip() + answer_suffix(tokenizer), add_special_tokens=False)["input_ids"]
        if len(answer_ids) > self.max_answer_tokens:
            raise ReGradValueError(
                f"task {task.id!r}: the answer has {len(answer_ids)} tokens, more than max_answer_tokens="
                f"{self.max_answer_tokens}"
            )
        return prompt_ids + answer_ids, len(prompt_ids)

    def _with_documents(self, task: Task) -> bool:
        """Whether a blind collator puts `task`'s documents in the prompt (its [`icl_share`] draw)."""
        # Seeded by the task alone, as the distractors: a resumed run sees the same prompts.
        return (
            self.icl_share > 0
            and random.Random(f"icl\0{self.seed}\0{task.id}\0{task.question}").random() < self.icl_share
        )

    def _distractors(self, task: Task) -> list[str]:
        missing = self.documents_per_task - len(task.documents)
        if missing <= 0:
            return []
        candidates = [d for d in self.distractor_pool if d not in task.documents]
        if len(candidates) < missing:
            raise ReGradValueError(f"need {missing} distractor documents, the pool has {len(candidates)}")
        # A str seed is hashed with SHA-512: the same draw in every process and every session.
        return random.Random(f"{self.seed}\0{task.id}\0{task.question}").sample(candidates, missing)
