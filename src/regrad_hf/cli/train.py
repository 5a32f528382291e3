"""`regrad train`: meta-train a learner with `ReGradTrainer`; every option of `ReGradTrainingArguments` applies.

regrad train --preset smollm2-squad --output_dir runs/smollm2-squad
regrad train --train_format jsonl --train_file tasks.jsonl --output_dir runs/mine --max_steps 200

The options of regrad train's own (`DataArguments`, `LearnerArguments`, `PRESETS`) are defined in
[`regrad_hf.cli.train_options`], so that `regrad train --help` answers without importing transformers.
"""

from __future__ import annotations

import json
import random
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from ..errors import ReGradValueError
from .train_options import PRESETS, DataArguments, LearnerArguments, RecipeArguments, option_values


def _load_tasks(format_: str, source: str, split: str | None):
    from ..data.task import LOADERS, load_squad
    from ..errors import ReGradHubError

    if format_ not in LOADERS:
        raise ReGradValueError(f"unknown task format {format_!r}; choose from {sorted(LOADERS)}")
    try:
        return load_squad(source, split) if format_ == "squad" else LOADERS[format_](source)
    except ReGradHubError as error:
        raise ReGradHubError(f"{error}; pass --data PATH (--train_file/--eval_file) to use local data") from error


def _mixed_task_sets(recipe: RecipeArguments, training_args, model) -> tuple[list, list]:
    """The mixed train and dev tasks, cached in output_dir so that a resumed run sees the same distractors."""
    from ..data.task import load_jsonl
    from ..data.task_sets import mixed_tasks
    from ..defaults import load_embedder
    from ..files import atomic_write_text

    output = Path(training_args.output_dir)
    cached = output / "tasks_train.jsonl", output / "tasks_dev.jsonl"
    if all(path.is_file() for path in cached):
        return load_jsonl(cached[0]), load_jsonl(cached[1])
    dpt = training_args.documents_per_task if recipe.hard_distractors else 1
    embedder = load_embedder(model.config.embedder) if dpt > 1 else None
    files = {"squad": recipe.squad_file, "tofu": recipe.tofu_file, "hotpotqa": recipe.hotpotqa_file}
    sets = []
    for path, split, limit in zip(cached, ("train", "dev"), (None, recipe.eval_tasks_per_source), strict=True):
        tasks = mixed_tasks(split, **files, documents_per_task=dpt, embedder=embedder, seed=training_args.seed,
                            max_tasks_per_source=limit,
                            tofu_facts_per_document=recipe.tofu_facts_per_document)  # fmt: skip
        atomic_write_text(path, "".join(json.dumps(task.to_dict()) + "\n" for task in tasks))
        sets.append(tasks)
    return sets[0], sets[1]


def _final_evaluation(trainer) -> dict[str, float]:
    """The dev metrics of the trained learner. When the trainer evaluated at its last step and kept that learner
    (no `load_best_model_at_end`), those are the metrics of the same tensors, so they are reused instead of a
    second pass over the dev tasks (minutes per pass in a meta-training run)."""
    state, args = trainer.state, trainer.args
    if not args.load_best_model_at_end:
        for entry in reversed(state.log_history):
            if entry.get("step") != state.global_step:
                break
            if any(key.startswith("eval_") for key in entry):
                return {key: value for key, value in entry.items() if key.startswith("eval_") or key == "epoch"}
    return trainer.evaluate()


def _with_preset(argv: list[str]) -> list[str]:
    """Expands `--preset NAME` into its options; options given on the command line win."""
    if "--preset" not in argv:
        return argv
    position = argv.index("--preset")
    name = argv[position + 1] if position + 1 < len(argv) else None
    if name not in PRESETS:
        raise ReGradValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    rest = argv[:position] + argv[position + 2 :]
    given = set(option_values(rest))  # options given in either spelling win over the preset's
    expanded = [item for key, value in PRESETS[name].items() if key not in given for item in (f"--{key}", str(value))]
    return expanded + rest


def main(argv: Sequence[str] | None = None) -> int:
    import torch
    from transformers import HfArgumentParser

    from ..config import PROMPT_FIELDS, ReGradConfig
    from ..defaults import EMBEDDED_MODEL_ID
    from ..files import atomic_write_text
    from ..modeling.causal_lm import ReGradForCausalLM
    from ..prompting import template_fields
    from ..training.trainer import ReGradTrainer, ReGradTrainingArguments

    argv = list(sys.argv[1:] if argv is None else argv)

    class Parser(HfArgumentParser):
        def error(self, message: str):  # one line, as every `regrad` mistake
            self.exit(2, f"error: regrad train: {message} (see regrad train --help-all)\n")

    parser = Parser((ReGradTrainingArguments, DataArguments, LearnerArguments, RecipeArguments), prog="regrad train")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a recorded recipe (options given also win)")
    if "--help-all" in argv:
        parser.print_help()
        return 0
    training_args, data_args, learner_args, recipe_args, _ = parser.parse_args_into_dataclasses(_with_preset(argv))
    resume = training_args.resume_from_checkpoint
    if recipe_args.resume == "last":
        from ..training.checkpoints import last_checkpoint

        resume = last_checkpoint(training_args.output_dir)  # the newest complete one (a killed save is skipped)
        if resume is None:
            raise ReGradValueError(f"--resume last: no complete checkpoint-N folder in {training_args.output_dir}")
    elif recipe_args.resume:
        resume = recipe_args.resume
    if recipe_args.task_set not in (None, "mixed"):
        raise ReGradValueError(f"unknown task set {recipe_args.task_set!r}; the one task set is 'mixed'")

    # The data first: a mistake there (a missing file, no network for a Hub dataset) shows before the model loads.
    train_tasks, eval_tasks = None, None
    if recipe_args.task_set is None:
        train_tasks = _load_tasks(data_args.train_format, data_args.train_file, data_args.train_split)
        random.Random(training_args.seed).shuffle(train_tasks)
    if data_args.eval_file and recipe_args.task_set is None:
        eval_file = data_args.train_file if data_args.eval_file == "same" else data_args.eval_file
        eval_tasks = _load_tasks(data_args.eval_format or data_args.train_format, eval_file, data_args.eval_split)
        random.Random(training_args.seed).shuffle(eval_tasks)

    torch.manual_seed(training_args.seed)
    prompt_fields = template_fields({name: getattr(learner_args, name) for name in PROMPT_FIELDS})
    if learner_args.resume_learner and prompt_fields:
        raise ReGradValueError(
            f"--resume_learner keeps the learner's own prompt template; drop --{', --'.join(prompt_fields)} "
            "(or start a new learner from its tensors with --init_learner)"
        )
    if learner_args.resume_learner:
        model = ReGradForCausalLM.from_pretrained(learner_args.resume_learner)
    else:
        config = ReGradConfig(
            lora_rank=learner_args.lora_rank,
            lora_alpha=learner_args.lora_alpha,
            init_step_size=learner_args.init_step_size,
            step_size_mode=learner_args.step_size_mode,
            step_size_parametrization=learner_args.step_size_parametrization,
            gradient_transform_rank=learner_args.gradient_transform_rank,
            max_document_tokens=learner_args.max_document_tokens,
            gamma=learner_args.gamma,
            **prompt_fields,
        )
        model = ReGradForCausalLM.from_base(learner_args.base_model or EMBEDDED_MODEL_ID, config)
        if recipe_args.init_learner:
            from ..defaults import shipped_learner_path
            from ..modeling.learner_state import init_from_learner

            folder = shipped_learner_path() if recipe_args.init_learner == "shipped" else Path(recipe_args.init_learner)
            init_from_learner(model, folder)
    if recipe_args.task_set == "mixed":
        with training_args.main_process_first(desc="mixed task sets"):  # process 0 builds them, the others read
            train_tasks, eval_tasks = _mixed_task_sets(recipe_args, training_args, model)

    trainer = ReGradTrainer(model, training_args, train_dataset=train_tasks, eval_dataset=eval_tasks)
    evaluate_before = eval_tasks and recipe_args.eval_before and not resume
    before = trainer.evaluate(metric_key_prefix="before") if evaluate_before else {}
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    after = _final_evaluation(trainer) if eval_tasks else {}
    if not trainer.is_world_process_zero():  # under torchrun / accelerate launch, process 0 writes the record
        return 0
    output = Path(training_args.output_dir)
    record = {
        "command": "regrad train " + shlex.join(argv),
        "data": asdict(data_args),
        "learner": asdict(learner_args),
        "recipe": asdict(recipe_args),
        "resumed_from": resume,
        "seed": training_args.seed,
        "max_steps": training_args.max_steps,
        "train_tasks": len(train_tasks),
        "metrics_before": before,
        "metrics_after": after,
        "log_history": trainer.state.log_history,
    }
    atomic_write_text(output / "training_record.json", json.dumps(record, indent=2, default=str) + "\n")
    print(json.dumps({"before": before, "after": after}, indent=2))
    return 0
