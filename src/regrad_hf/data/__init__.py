"""Meta-learning data: [`Task`] and its loaders (SQuAD, HotpotQA, TOFU, JSONL from files, the Hub or `datasets`),
the task sets and groups meta-training draws from, and the collator that turns them into tensors.

Modules: `task` ([`Task`], the loaders), `sources` (files, folders, Hub names, `datasets` objects as rows), `records`
(checked JSON and record fields), `schemas` (SQuAD and HotpotQA records), `task_sets` (train/dev/test splits, the
mixed set, hard distractors), `synthetic` and `synthetic_vocabulary` (seeded synthetic-fact tasks, their words),
`grouping` (several questions about one document set), `collator` ([`TaskCollator`] and the question prompt).
"""

from .task import (
    HUB_DATASETS,
    LOADERS,
    SQUAD_SPLITS,
    TOFU_QUESTIONS_PER_AUTHOR,
    HubDataset,
    Task,
    as_tasks,
    dataset_documents,
    documents_from,
    hotpotqa_paragraphs,
    hotpotqa_rows,
    load_hotpotqa,
    load_jsonl,
    load_squad,
    load_tofu,
    task_from_record,
)

__all__ = [
    "HUB_DATASETS",
    "LOADERS",
    "SQUAD_SPLITS",
    "TOFU_QUESTIONS_PER_AUTHOR",
    "HubDataset",
    "Task",
    "as_tasks",
    "dataset_documents",
    "documents_from",
    "hotpotqa_paragraphs",
    "hotpotqa_rows",
    "load_hotpotqa",
    "load_jsonl",
    "load_squad",
    "load_tofu",
    "task_from_record",
]
