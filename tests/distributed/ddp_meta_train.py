"""Run by tests/bank/test_distributed.py under `torchrun --nproc_per_node 2`: a few DDP meta-training steps of a tiny
learner; every process writes its learner tensors to `<output>/rank<N>.safetensors`."""

import argparse
import sys
from pathlib import Path

from safetensors.torch import save_file
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import make_tiny_model  # noqa: E402

from regrad_hf.data import Task  # noqa: E402
from regrad_hf.defaults import embedded_model_path  # noqa: E402
from regrad_hf.training import ReGradTrainer, ReGradTrainingArguments  # noqa: E402

COLORS = ["red", "blue", "green", "black", "white", "pink", "gold", "gray"]


def main(output: Path, steps: int, first_order: bool) -> None:
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    model = make_tiny_model(tokenizer)
    tasks = [
        Task(
            (f"The secret color of box {i} is {COLORS[i % 8]}.",),
            f"What is the secret color of box {i}?",
            COLORS[i % 8],
        )
        for i in range(16)
    ]
    args = ReGradTrainingArguments(
        output_dir=str(output / "run"),
        max_steps=max(steps, 1),
        per_device_train_batch_size=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1000,
        warmup_steps=0,
        first_order=first_order,
        seed=0,
    )
    trainer = ReGradTrainer(model, args, train_dataset=tasks)
    if steps:
        trainer.train()
    output.mkdir(parents=True, exist_ok=True)
    rank = trainer.args.process_index
    state = {name: tensor.detach().contiguous() for name, tensor in model.learner_state_dict().items()}
    save_file(state, str(output / f"rank{rank}.safetensors"))
    print(f"rank {rank} of {trainer.args.world_size}: {type(trainer.model_wrapped).__name__}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("output", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--first-order", action="store_true")
    arguments = parser.parse_args()
    main(arguments.output, arguments.steps, arguments.first_order)
