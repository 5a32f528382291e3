"""The options of `regrad train` and its recorded recipes, with the standard library alone: `regrad train --help`
answers without importing transformers (the verb itself is [`regrad_hf.cli.train`])."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..names import missing_location
from .options import HUB_DATA, Parser


@dataclass
class DataArguments:
    train_format: str = field(default="squad", metadata={"help": "squad, hotpotqa, tofu or jsonl"})
    train_file: str = field(
        default=HUB_DATA["squad"],
        metadata={"aliases": ["--data"], "help": "training tasks: a local file, dataset folder or Hub dataset name"},
    )
    train_split: str | None = field(default=None, metadata={"help": "SQuAD article split: train, dev or test"})
    eval_format: str | None = field(default=None, metadata={"help": "defaults to train_format"})
    eval_file: str | None = field(
        default=None, metadata={"help": "dev tasks (evaluated after training); 'same' reads them from train_file"}
    )
    eval_split: str | None = field(default=None, metadata={"help": "SQuAD article split of the dev tasks"})


@dataclass
class LearnerArguments:
    base_model: str | None = field(default=None, metadata={"help": "Hub id or path; default: embedded SmolLM2"})
    resume_learner: str | None = field(default=None, metadata={"help": "start from a saved learner instead"})
    lora_rank: int = 16
    lora_alpha: float = 32.0
    init_step_size: float = 0.3
    step_size_mode: str = "tie"
    step_size_parametrization: str = "log"
    gradient_transform_rank: int | None = field(
        default=None, metadata={"help": "learn a transform L G R of the summed gradient, rank k on feature sides"}
    )
    max_document_tokens: int = 512
    gamma: float = field(default=1.0, metadata={"help": "test-time step multiplier (also used in training)"})
    # The learner's prompt template (regrad_hf.prompting; None: ReGradConfig's default), saved in its config.json.
    system_prompt: str | None = field(
        default=None, metadata={"help": "system turn of the learner's prompt, or 'none' (default: the concise one)"}
    )
    user_template: str | None = field(default=None, metadata={"help": "user turn with {question} and {context}"})
    document_template: str | None = field(default=None, metadata={"help": "each document: {document}, {index}"})
    answer_stop: str | None = field(default=None, metadata={"help": "where answers end: line or turn"})
    answer_repetition_penalty: float | None = field(
        default=None, metadata={"help": "repetition penalty on the answer's word tokens when it is served (1 is off)"}
    )


@dataclass
class RecipeArguments:
    task_set: str | None = field(
        default=None,
        metadata={"help": "mixed: SQuAD + TOFU + HotpotQA train/dev splits (regrad_hf.data.task_sets), not train_file"},
    )
    squad_file: str | None = field(default=None, metadata={"help": "SQuAD JSON of the mixed set (articles 0-39)"})
    tofu_file: str | None = field(default=None, metadata={"help": "TOFU JSONL of the mixed set (authors 0-179)"})
    hotpotqa_file: str | None = field(default=None, metadata={"help": "HotpotQA JSONL of the mixed set"})
    hard_distractors: bool = field(
        default=True, metadata={"help": "pad tasks to documents_per_task with the nearest non-gold documents"}
    )
    # regrad_hf.data.task_sets.TOFU_FACTS_PER_DOCUMENT (this module imports only the standard library; a test keeps
    # the two equal)
    tofu_facts_per_document: int = field(default=5, metadata={"help": "whole TOFU facts per document"})
    eval_tasks_per_source: int = field(default=16, metadata={"help": "dev tasks per source of the mixed set"})
    eval_before: bool = field(
        default=True, metadata={"help": "evaluate the starting learner on the dev tasks first (metrics_before)"}
    )
    resume: str | None = field(
        default=None, metadata={"help": "continue a run: 'last' (newest checkpoint in output_dir) or a checkpoint"}
    )
    init_learner: str | None = field(
        default=None,
        metadata={
            "help": "start from this learner folder's LoRA tensors and step sizes (same layout; 'shipped' = the "
            "shipped learner) under the config given here (prompt, gamma, ...), unlike resume_learner"
        },
    )


# The recipe of the learner shipped in regrad_hf/learners/smollm2-135m-squad (see its TRAINING.md): SQuAD v1.1
# validation articles 0-29 for training and 30-34 for dev (the Hub's rajpurkar/squad, or its JSON through --data).
PRESETS: dict[str, dict] = {
    "smollm2-squad": {
        "train_format": "squad",
        "train_file": HUB_DATA["squad"],
        "train_split": "train",
        "eval_file": "same",
        "eval_split": "dev",
        "max_steps": 300,
        "per_device_train_batch_size": 4,
        "learning_rate": 4e-4,
        "step_size_learning_rate": 3e-2,
        "init_step_size": 0.3,
        "logging_steps": 10,
        "save_steps": 50,
        "save_total_limit": 2,
        "eval_max_tasks": 40,
        "seed": 0,
        "report_to": "none",
    }
}


# The path options of `regrad train` (snake_case names) -> (what they name, the word that is not a path).
_PATH_OPTIONS = {
    "train_file": ("file or directory", None),
    "data": ("file or directory", None),
    "eval_file": ("file or directory", "same"),
    "squad_file": ("file", None),
    "tofu_file": ("file", None),
    "hotpotqa_file": ("file", None),
    "base_model": ("base model directory", None),
    "resume_learner": ("learner directory", None),
    "init_learner": ("learner directory", "shipped"),
    "resume": ("checkpoint directory", "last"),
}


def option_values(argv: list[str]) -> dict[str, str]:
    """`--name value` and `--name=value` pairs of a command line, by snake_case name (the last one given wins)."""
    values = {}
    for position, item in enumerate(argv):
        if not item.startswith("--"):
            continue
        name, equals, value = item[2:].partition("=")
        if not equals:
            value = argv[position + 1] if position + 1 < len(argv) else ""
        values[name.replace("-", "_")] = value
    return values


def train_path_mistake(argv: list[str]) -> str | None:
    """The first path option of `regrad train` that cannot be right (see
    [`regrad_hf.cli.options.path_mistake`]), as an error message; checked before transformers is imported."""
    for name, value in option_values(argv).items():
        kind, word = _PATH_OPTIONS.get(name, (None, None))
        if kind is not None and value and value != word and (problem := missing_location(value, kind)):
            return problem
    return None


def train_help() -> str:
    """`regrad train --help` without importing transformers: regrad's own options; `--help-all` lists the rest."""
    parser = Parser(
        prog="regrad train",
        description="Meta-train a learner with ReGradTrainer (a transformers.Trainer).",
        epilog="Every option of ReGradTrainingArguments is accepted too: transformers.TrainingArguments "
        "(--output-dir, --max-steps, --learning-rate, --per-device-train-batch-size, --seed, --report-to, ...) "
        "and the meta-learning ones (--first-order, --blind, --step-size-learning-rate, --documents-per-task, ...). "
        "Every option is also accepted in --snake_case. `regrad train --help-all` lists them all (it imports "
        "transformers, a few seconds).",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a recorded recipe (options given also win)")
    for group_class in (DataArguments, LearnerArguments, RecipeArguments):
        group = parser.add_argument_group(group_class.__name__)
        for item in dataclasses.fields(group_class):
            names = [f"--{item.name.replace('_', '-')}", *item.metadata.get("aliases", [])]
            default = item.default
            metavar = type(default).__name__.upper() if default is not None else "STR"
            suffix = f" (default: {default})" if default is not None else ""
            group.add_argument(*names, metavar=metavar, help=f"{item.metadata.get('help', '')}{suffix}".strip())
    return parser.format_help()
