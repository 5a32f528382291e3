import json
import random

import pytest
import torch

from regrad_hf import ReGradForCausalLM
from regrad_hf.cli import main
from regrad_hf.data import Task
from regrad_hf.evaluation import CASES, evaluate_injection
from regrad_hf.training import ReGradTrainer, ReGradTrainingArguments

from .conftest import make_tiny_base, make_tiny_model, parameter_bytes

COLORS = ["red", "blue", "green", "black", "white", "pink", "gold", "gray"]


def color_tasks(count: int, offset: int, seed: int) -> list[Task]:
    """Synthetic tasks whose answer cannot be guessed without the document (a random color per box)."""
    rng = random.Random(seed)
    tasks = []
    for index in range(offset, offset + count):
        color = rng.choice(COLORS)
        tasks.append(
            Task((f"The secret color of box {index} is {color}.",), f"What is the secret color of box {index}?", color)
        )
    return tasks


def arguments(tmp_path, **overrides) -> ReGradTrainingArguments:
    values = {
        "output_dir": str(tmp_path / "run"),
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "eval_generate": False,
        "eval_max_tasks": 8,
        "logging_steps": 1000,
        "warmup_steps": 0,  # with warmup the first step has lr 0
        **overrides,
    }
    return ReGradTrainingArguments(**values)


def learner_values(model):
    return {name: tensor.clone() for name, tensor in model.learner_state_dict().items()}


@pytest.mark.parametrize("first_order", [False, True])
def test_one_meta_step_moves_lora_tensors_and_step_sizes(tiny_model, tmp_path, first_order):
    before = learner_values(tiny_model)
    base_before = {n: p.clone() for n, p in tiny_model.language_model.named_parameters() if ".lora_" not in n}
    trainer = ReGradTrainer(
        tiny_model, arguments(tmp_path, first_order=first_order), train_dataset=color_tasks(4, 0, 0)
    )
    trainer.train()
    after = learner_values(tiny_model)
    assert not torch.equal(after["regrad.step_sizes"], before["regrad.step_sizes"])
    assert all(not torch.equal(after[n], before[n]) for n in tiny_model.lora_parameters())
    base_after = dict(tiny_model.language_model.named_parameters())
    assert all(torch.equal(base_after[n], p) for n, p in base_before.items())


def test_second_order_gradient_differs_from_first_order(tiny_model, tmp_path):
    batch = ReGradTrainer(tiny_model, arguments(tmp_path)).data_collator(color_tasks(2, 0, 0))
    gradients = {}
    for first_order in (False, True):
        trainer = ReGradTrainer(tiny_model, arguments(tmp_path, first_order=first_order))
        tiny_model.zero_grad()
        trainer.compute_loss(tiny_model, batch).backward()
        gradients[first_order] = torch.cat([p.grad.flatten() for p in tiny_model.lora_parameters().values()])
    assert not torch.allclose(gradients[False], gradients[True])


def test_short_meta_training_raises_the_injection_signal(tiny_model, tmp_path):
    trainer = ReGradTrainer(
        tiny_model,
        arguments(tmp_path, max_steps=60, per_device_train_batch_size=4, eval_max_tasks=16),
        train_dataset=color_tasks(64, 0, 0),
        eval_dataset=color_tasks(16, 1000, 1),
    )
    before = trainer.evaluate()["eval_injection_signal"]
    trainer.train()
    after = trainer.evaluate()["eval_injection_signal"]
    assert after > before + 0.03, (before, after)


def test_checkpoints_hold_only_the_learner_and_resume(tokenizer, tmp_path):
    tasks = color_tasks(16, 0, 0)
    uninterrupted = make_tiny_model(tokenizer)
    ReGradTrainer(uninterrupted, arguments(tmp_path / "a", max_steps=4), train_dataset=tasks).train()

    first = make_tiny_model(tokenizer)
    args = arguments(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2)
    ReGradTrainer(first, args, train_dataset=tasks).train()
    checkpoint = tmp_path / "b" / "run" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "learner.safetensors"} <= files
    assert not {"model.safetensors", "pytorch_model.bin", "training_args.bin"} & files

    resumed = make_tiny_model(tokenizer)
    with torch.no_grad():  # a different learner start: everything must come from the checkpoint
        for parameter in [*resumed.lora_parameters().values(), resumed.step_sizes.raw]:
            parameter.uniform_(-1, 1)
    ReGradTrainer(resumed, args, train_dataset=tasks).train(resume_from_checkpoint=str(checkpoint))
    assert parameter_bytes(resumed.step_sizes) == parameter_bytes(uninterrupted.step_sizes)
    for name, tensor in uninterrupted.lora_parameters().items():
        torch.testing.assert_close(resumed.lora_parameters()[name], tensor)


def test_evaluate_injection_runs_every_case_and_restores_the_model(tiny_model, tokenizer):
    untrained = make_tiny_model(tokenizer, seed=3).learner_state_dict()
    before = parameter_bytes(tiny_model)
    results = evaluate_injection(tiny_model, color_tasks(2, 0, 0), untrained, cases=CASES, max_new_tokens=3)
    assert set(results) == set(CASES)
    assert parameter_bytes(tiny_model) == before
    assert results["rag"].prompt_tokens > results["regrad"].prompt_tokens  # the documents are in the RAG prompt
    assert all(0.0 <= r.f1 <= 1.0 and r.answer_loss > 0 for r in results.values())


def test_train_command(tokenizer, tmp_path, capsys):
    make_tiny_base(tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps(t.to_dict()) for t in color_tasks(4, 0, 0)))
    argv = [
        "train", "--base_model", str(tmp_path / "base"), "--train_format", "jsonl", "--train_file", str(tasks),
        "--eval_file", str(tasks), "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--lora_rank", "2",
        "--per_device_train_batch_size", "2", "--eval_generate", "false", "--report_to", "none", "--use_cpu", "true",
    ]  # fmt: skip
    assert main(argv) == 0
    loaded = ReGradForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.config.lora_rank == 2
    record = json.loads((tmp_path / "out" / "training_record.json").read_text())
    assert "eval_injection_signal" in record["metrics_after"] and record["command"].startswith("regrad train")
