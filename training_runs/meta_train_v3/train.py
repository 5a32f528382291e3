"""The meta_train_v3 run (issue 29): the amortised recipe on ~100k question-answer pairs. Started and resumed by
`run.sh`; see README.md beside this file.

Each item is a `TaskGroup` (one document set, up to 10 questions): one second-order inner step on its 3 documents,
the outer loss over all of its questions. The learner starts from the shipped `smollm2-135m-mixed`.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from regrad_hf import ReGradForCausalLM
from regrad_hf.data.grouping import TaskGroup
from regrad_hf.defaults import shipped_learner_path
from regrad_hf.modeling.learner_files import read_config
from regrad_hf.modeling.learner_state import init_from_learner
from regrad_hf.training import ReGradTrainer, ReGradTrainingArguments
from regrad_hf.training.checkpoints import last_checkpoint

HERE = Path(__file__).resolve().parent


def load_groups(path: Path) -> list[TaskGroup]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [TaskGroup.from_dict(json.loads(line), f"{path} line {n + 1}") for n, line in enumerate(handle)]


def start_learner(folder: Path | None, gradient_transform_rank: int | None) -> ReGradForCausalLM:
    """The shipped learner (the run's start), or an arm's: the tensors of `folder`, with a gradient transform at the
    identity added when `gradient_transform_rank` is given."""
    if folder is None:
        return ReGradForCausalLM.from_pretrained(shipped_learner_path())
    config = read_config(folder / "config.json")
    if gradient_transform_rank is not None:
        config.gradient_transform_rank = gradient_transform_rank
    model = ReGradForCausalLM.from_base(config.base_model_name_or_path, config)
    init_from_learner(model, folder)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_steps", type=int, default=6000)
    parser.add_argument("--cached_gradients", action="store_true", help="theta0 frozen: train the step sizes only")
    parser.add_argument("--distillation_weight", type=float, default=0.0, help="RAG-teacher KL weight (0: off)")
    parser.add_argument("--icl_share", type=float, default=0.0, help="share of groups also asked with their documents")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (AMX/AVX512-BF16 CPUs: ~1.9x per step)")
    parser.add_argument("--groups", type=Path, default=HERE / "groups_train.jsonl.gz", help="the task groups file")
    parser.add_argument("--init_learner", type=Path, help="an arm's start: a learner or compact checkpoint folder")
    parser.add_argument("--gradient_transform_rank", type=int, help="with --init_learner: add a gradient transform")
    parser.add_argument("--groups_per_process", type=int, default=1, help="task groups per step and process")
    parser.add_argument("--output_dir", type=Path, default=HERE / "run")
    parser.add_argument("--resume_dir", type=Path, default=HERE / "resume")
    cli = parser.parse_args()
    groups = load_groups(cli.groups)
    model = start_learner(cli.init_learner, cli.gradient_transform_rank)
    args = ReGradTrainingArguments(
        output_dir=str(cli.output_dir),
        compact_checkpoint_dir=str(cli.resume_dir),
        max_steps=cli.max_steps,
        per_device_train_batch_size=cli.groups_per_process,
        learning_rate=2e-4,
        step_size_learning_rate=1e-2,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=20,
        max_grad_norm=0.5,
        max_answer_tokens=128,
        cached_gradients=cli.cached_gradients,
        # ~6 MB each: an arm beside the main run's two processes on 24 GB (read only with --cached_gradients)
        **({"gradient_cache_documents": 256} if cli.cached_gradients else {}),
        distillation_weight=cli.distillation_weight,
        icl_share=cli.icl_share,
        logging_steps=10,
        save_strategy="steps",
        save_steps=25,
        save_total_limit=2,
        eval_strategy="no",
        seed=0,
        report_to=[],
        use_cpu=True,
        bf16=cli.bf16,
        disable_tqdm=True,
        ddp_timeout=10800,
        # Every LoRA tensor and step size takes part in each meta-step: DDP's search for unused ones is a wasted
        # traversal of the (second-order) graph per step.
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
    )
    trainer = ReGradTrainer(model, args, train_dataset=groups)
    resume = last_checkpoint(cli.output_dir)
    if resume is None and (cli.resume_dir / "trainer_state.json").is_file():
        resume = cli.resume_dir
    trainer.train(resume_from_checkpoint=resume)


if __name__ == "__main__":
    main()
