"""Meta-learning the learner: `ReGradTrainer`, a `transformers.Trainer` for the bi-level ReGrad objective.

The objective (inner LM step on a task's documents, outer answer loss with the adapted LoRA tensors) is in
[`regrad_hf.adaptation.objective`]; its outer loss, averaged over the tasks of the batch, trains the LoRA tensors
(the starting point `theta`) and the step sizes `alpha`. Everything else (logging, accumulation, schedulers, clipping,
checkpoints, `report_to`, DDP) is `Trainer`'s.

A resume (`train(resume_from_checkpoint=...)`, `True` for the newest complete checkpoint) first checks the folder
([`checkpoints.check_checkpoint`]) and that it was written by a run of the same tasks, seeds and batch layout
([`checkpoints.check_run_identity`]); a damaged file raises a `ReGradError` instead of resuming a wrong state.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..adaptation.objective import check_distillation_weight, check_first_token_weight
from ..data.collator import TaskCollator
from ..data.grouping import as_training_items
from ..data.task import as_tasks
from ..errors import ReGradError, ReGradTypeError, ReGradValueError
from ..evaluation import evaluate_injection
from ..files import flocked, write_error
from ..modeling.causal_lm import LEARNER_FILE, ReGradForCausalLM
from ..prompting import PromptTemplate
from .checkpoints import (
    IDENTITY_CALLBACK,
    TRAINER_STATE_FILE,
    check_checkpoint,
    check_run_identity,
    export_compact_checkpoint,
    is_compact_checkpoint,
    last_checkpoint,
    load_compact_optimizer,
    load_errors,
    run_identity,
)
from .gradient_cache import DocumentGradientCache


@dataclass
class ReGradTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the meta-learning options. Defaults differ from `TrainingArguments` where ReGrad
    needs it: lr 4e-4 for the LoRA tensors, 10% warmup, grad-norm clip 0.5, `remove_unused_columns=False`."""

    first_order: bool = field(default=False, metadata={"help": "Detach the inner gradient (less memory, first order)."})
    blind: bool = field(
        default=True,
        metadata={"help": "Ask the question alone (True) or with the documents in the prompt (ReGrad+ICL)."},
    )
    icl_share: float = field(
        default=0.0,
        metadata={
            "help": "With blind, the share of tasks asked with their documents in the prompt as well (one learner "
            "for ReGrad and ReGrad+ICL)."
        },
    )
    locality_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the KL of the adapted model to the unadapted one on another task's prompt and answer "
            "(0: off; needs 2+ tasks per device batch)."
        },
    )
    answer_first_token_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the answer's first token in the outer loss (1: the plain mean over its tokens)."},
    )
    distillation_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the KL of the adapted model (question only) from a RAG teacher (the base model with "
            "the task's documents in the prompt) at every answer token (0: off)."
        },
    )
    inner_max_document_tokens: int = field(default=512, metadata={"help": "Document truncation in the inner step."})
    max_answer_tokens: int = field(default=48, metadata={"help": "Longer answers raise an error."})
    step_size_learning_rate: float = field(
        default=3e-2, metadata={"help": "Learning rate of the step sizes (their own parameter group, no decay)."}
    )
    gradient_transform_learning_rate: float = field(
        default=1e-3,
        metadata={
            "help": "Learning rate of the gradient transform, when the learner has one (ReGradConfig."
            "gradient_transform_rank; its own parameter group, no decay: decay would pull it to 0, not the identity)."
        },
    )
    documents_per_task: int = field(
        default=1, metadata={"help": "Pad each task with distractor documents from other tasks up to this count."}
    )
    cached_gradients: bool = field(
        default=False,
        metadata={
            "help": "Freeze the LoRA start (theta0) and train the step sizes (and the gradient transform) only, "
            "against document gradients computed once each and cached (first order, exact for a frozen theta0; one "
            "process)."
        },
    )
    gradient_cache_documents: int = field(
        default=1024, metadata={"help": "Documents whose gradients the cache keeps (cached_gradients)."}
    )
    compact_checkpoint_dir: str | None = field(
        default=None,
        metadata={
            "help": "After each checkpoint, also write its compact form (< 8 MB for SmolLM2, see "
            "regrad_hf.training.checkpoints) to this folder; train(resume_from_checkpoint=...) loads either form."
        },
    )
    eval_max_tasks: int = field(default=32, metadata={"help": "Dev tasks used by evaluate()."})
    eval_max_new_tokens: int = field(default=24, metadata={"help": "Greedy answer length for EM/F1 in evaluate()."})
    eval_generate: bool = field(default=True, metadata={"help": "Generate answers for EM/F1 in evaluate()."})
    eval_cases: str = field(
        default="no_adaptation,regrad,raw", metadata={"help": "Comma-separated cases of evaluate() (raw: untrained)."}
    )
    learning_rate: float = field(default=4e-4, metadata={"help": "Learning rate of the LoRA tensors."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Warmup steps, or a fraction of the training steps."})
    max_grad_norm: float = field(default=0.5, metadata={"help": "Gradient-norm clipping."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Tasks are not tensors; keep them whole."})


class CompactCheckpointCallback(TrainerCallback):
    """Exports each new checkpoint to `args.compact_checkpoint_dir` (process 0 only)."""

    def on_save(self, args, state, control, **kwargs):
        if not args.compact_checkpoint_dir:
            return control
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every process has written its RNG state into the checkpoint
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            export_compact_checkpoint(checkpoint, args.compact_checkpoint_dir)
        return control


class RunIdentityCallback(TrainerCallback, ExportableState):
    """Records the run's [`checkpoints.run_identity`] in each checkpoint's `trainer_state.json`."""

    def __init__(self, identity: dict | None = None):
        self.identity = identity

    def state(self) -> dict:
        return {"args": {"identity": self.identity}, "attributes": {}}


assert RunIdentityCallback.__name__ == IDENTITY_CALLBACK  # the key Trainer stores its state under


class WallClockCallback(TrainerCallback):
    """Where `ReGradTrainer.log`'s `wall_seconds` count from: this run's start minus the training time of the runs
    it resumes (the last `wall_seconds` of the restored log history)."""

    start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        previous = [entry["wall_seconds"] for entry in state.log_history if "wall_seconds" in entry]
        self.start = time.monotonic() - (previous[-1] if previous else 0.0)
        return control


class ReGradTrainer(Trainer):
    """`Trainer` for the ReGrad meta-objective (see the module docstring).

    Args:
        model ([`ReGradForCausalLM`]): the learner to train (its LoRA tensors and step sizes).
        args ([`ReGradTrainingArguments`]): training arguments.
        train_dataset / eval_dataset (`Sequence[Task]` or `datasets.Dataset`): meta-training and dev tasks; a
            `Dataset` has `documents` (list of strings), `question` and `answer` columns (see [`data.as_tasks`]).
            Training items may be [`TaskGroup`]s: several questions trained against one inner step.
        data_collator (*optional*): defaults to a [`TaskCollator`] built from `args`.
        kwargs: passed to `Trainer`.
    """

    def __init__(
        self,
        model: ReGradForCausalLM,
        args: ReGradTrainingArguments,
        train_dataset=None,
        eval_dataset=None,
        data_collator=None,
        **kwargs,
    ):
        if not isinstance(model, ReGradForCausalLM):
            raise ReGradTypeError(f"ReGradTrainer trains a ReGradForCausalLM, got {type(model).__name__}")
        if args.locality_weight < 0 or (args.locality_weight > 0 and args.per_device_train_batch_size < 2):
            raise ReGradValueError(
                f"locality_weight {args.locality_weight} needs to be >= 0, and > 0 needs per_device_train_batch_size "
                "of 2 or more (each task's locality text is another task's)"
            )
        check_first_token_weight(args.answer_first_token_weight)
        check_distillation_weight(args.distillation_weight)
        # A datasets.Dataset (documents/question/answer columns) or mappings become Tasks, checked once here.
        train_dataset = None if train_dataset is None else as_training_items(train_dataset)
        eval_dataset = None if eval_dataset is None else as_tasks(eval_dataset)
        if data_collator is None:
            pool = sorted({d for task in (train_dataset or []) for d in task.documents})
            data_collator = TaskCollator(
                model.tokenizer,
                max_document_tokens=args.inner_max_document_tokens,
                max_answer_tokens=args.max_answer_tokens,
                blind=args.blind,
                documents_per_task=args.documents_per_task,
                distractor_pool=pool,
                seed=args.seed,
                prompt=PromptTemplate.from_config(model.config),
                icl_share=args.icl_share,
                teacher_prompts=args.distillation_weight > 0,
            )
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=data_collator,
            **kwargs,
        )
        self.add_callback(CompactCheckpointCallback())
        self.add_callback(RunIdentityCallback(run_identity(args, train_dataset)))
        self._clock = WallClockCallback()
        self.add_callback(self._clock)
        # compute_loss averages over tasks itself; Trainer must still divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        # The untrained start, for the `raw` case of evaluate().
        self.untrained_state = {name: t.detach().clone() for name, t in model.learner_state_dict().items()}
        self.gradient_cache = None
        if args.cached_gradients:
            if model.config.step_size_mode == "fix" and model.gradient_transform is None:
                raise ReGradValueError("cached_gradients trains the step sizes and a gradient transform only, and "
                                       "step_size_mode 'fix' without a gradient transform has neither")  # fmt: skip
            if args.world_size > 1:
                raise ReGradValueError("cached_gradients runs in one process (DDP needs every parameter to get a "
                                       "gradient, and theta0 gets none)")  # fmt: skip
            self.gradient_cache = DocumentGradientCache(
                model, args.inner_max_document_tokens, args.gradient_cache_documents
            )

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The `args.optim` optimizer over up to three groups: the LoRA tensors (lr, weight decay), the step sizes
        (`step_size_learning_rate`, no decay) and the gradient transform (`gradient_transform_learning_rate`, no
        decay)."""
        if self.optimizer is None:
            learner = self.accelerator.unwrap_model(model or self.model)
            groups = []
            if not self.args.cached_gradients:  # theta0 is frozen while its document gradients are cached
                groups.append(
                    {
                        "params": list(learner.lora_parameters().values()),
                        "lr": self.args.learning_rate,
                        "weight_decay": self.args.weight_decay,
                    }
                )
            step_sizes = [p for p in learner.step_sizes.parameters() if p.requires_grad]
            if step_sizes:
                groups.append({"params": step_sizes, "lr": self.args.step_size_learning_rate, "weight_decay": 0.0})
            if learner.gradient_transform is not None:
                groups.append(
                    {
                        "params": [learner.gradient_transform.raw],
                        "lr": self.args.gradient_transform_learning_rate,
                        "weight_decay": 0.0,
                    }
                )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, learner)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean over the batch's tasks of the outer (answer) loss after one inner step on the task's documents.

        It runs as the (possibly DDP-wrapped) model's forward, so that DDP all-reduces the gradients. With
        `cached_gradients`, each task's summed document gradient comes from the cache (theta0 frozen)."""
        summed = None
        if self.gradient_cache is not None:
            summed = [self.gradient_cache.summed(task["documents"]) for task in inputs["tasks"]]
        outputs = model(
            meta_tasks=inputs["tasks"],
            summed_gradients=summed,
            first_order=self.args.first_order,
            locality_weight=self.args.locality_weight,
            first_token_weight=self.args.answer_first_token_weight,
            distillation_weight=self.args.distillation_weight,
        )
        return (outputs.loss, {"loss": outputs.loss}) if return_outputs else outputs.loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Answer loss, EM and F1 on dev tasks for `no_adaptation`, `regrad` and `raw` side by side, plus the
        injection signal `no_adaptation` answer loss minus `regrad` answer loss (positive = the documents help).

        A progress bar over the tasks follows `disable_tqdm` and transformers' and huggingface_hub's switches."""
        tasks = as_tasks(eval_dataset if eval_dataset is not None else self.eval_dataset)[: self.args.eval_max_tasks]
        learner = self.accelerator.unwrap_model(self.model)
        results = evaluate_injection(
            learner,
            tasks,
            untrained_state=self.untrained_state,
            cases=tuple(case.strip() for case in self.args.eval_cases.split(",")),
            max_new_tokens=self.args.eval_max_new_tokens,
            max_document_tokens=self.args.inner_max_document_tokens,
            generate=self.args.eval_generate,
            show_progress=not self.args.disable_tqdm and self.is_local_process_zero(),  # as Trainer's own bars
        )
        metrics = {
            f"{metric_key_prefix}_{case}_{name}": value
            for case, result in results.items()
            for name, value in result.as_dict().items()
            if name != "prompt_tokens"
        }
        if {"no_adaptation", "regrad"} <= set(results):
            metrics[f"{metric_key_prefix}_injection_signal"] = (
                results["no_adaptation"].answer_loss - results["regrad"].answer_loss
            )
        metrics[f"{metric_key_prefix}_step_size_mean"] = learner.step_sizes.values().mean().item()
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds `wall_seconds`: training time so far, summed over the runs a resumed training consists of."""
        if self._clock.start is not None:
            logs = {**logs, "wall_seconds": round(time.monotonic() - self._clock.start, 1)}
        super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint: str | os.PathLike | bool | None = None, **kwargs):
        """`Trainer.train`; a checkpoint to resume from is checked first (see the module docstring).

        Raises:
            [`ReGradValueError`] or [`ReGradFileError`]: the checkpoint is missing, incomplete, damaged, a symlink,
                or from a run with other tasks, seeds or batch layout.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ReGradValueError(f"no complete checkpoint-N folder in {self.args.output_dir} to resume from")
        if resume_from_checkpoint not in (None, False):
            resume_from_checkpoint = os.fspath(resume_from_checkpoint)
            state = check_checkpoint(resume_from_checkpoint)
            identity = next(c for c in self.callback_handler.callbacks if isinstance(c, RunIdentityCallback))
            check_run_identity(state, identity.identity, resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """`Trainer`'s checkpoint, written under the run folder's lock (two runs into one `output_dir` write whole
        checkpoints in turn) and with a rewritten folder's `trainer_state.json` (which `Trainer` writes last) deleted
        first, so that a folder rewritten in part is never taken for a complete checkpoint."""
        # A state resumed from a checkpoint written before one of our stateful callbacks existed (one without the run
        # identity) has no entry for it, and Trainer's save indexes that entry: the callback's own state fills it.
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ExportableState):
                self.state.stateful_callbacks.setdefault(type(callback).__name__, callback.state())
        if not self.args.should_save:  # process 0 holds the lock; the others write their RNG state only
            return super()._save_checkpoint(model, trial)
        run = Path(self._get_output_dir(trial=trial))
        run.mkdir(parents=True, exist_ok=True)
        folder = run / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        with flocked(run, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)):
            try:
                (folder / TRAINER_STATE_FILE).unlink(missing_ok=True)
                super()._save_checkpoint(model, trial)
            except ReGradError:
                raise
            except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
                raise write_error(error, folder) from error

    def _load_rng_state(self, checkpoint: str | None) -> None:
        with load_errors(Path(checkpoint or "."), "RNG state"):
            super()._load_rng_state(checkpoint)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Checkpoints hold the learner (`config.json`, `learner.safetensors`), never the base weights."""
        output_dir = output_dir or self.args.output_dir
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        learner = self.accelerator.unwrap_model(model or self.model)
        learner.load_learner(Path(resume_from_checkpoint) / LEARNER_FILE)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Loads a full checkpoint as `Trainer` does, or a compact one (see [`regrad_hf.training.checkpoints`])."""
        if checkpoint is None:
            return None
        with load_errors(Path(checkpoint), "optimizer or scheduler state"):
            if not is_compact_checkpoint(checkpoint):
                return super()._load_optimizer_and_scheduler(checkpoint)
            load_compact_optimizer(self.optimizer, checkpoint)
            scheduler = torch.load(Path(checkpoint) / "scheduler.pt", map_location="cpu", weights_only=True)
            self.lr_scheduler.load_state_dict(scheduler)
        return None

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(os.fspath(self.state.best_model_checkpoint))
