import json
import random

import pytest
import torch
import torch.nn.functional as F

from regrad_hf import ReGradForCausalLM, ReGradValueError
from regrad_hf.adaptation.objective import answer_loss, meta_loss
from regrad_hf.cli import main
from regrad_hf.data import Task
from regrad_hf.evaluation import CASES, evaluate_injection
from regrad_hf.training import ReGradTrainer, ReGradTrainingArguments
from regrad_hf.training.checkpoints import (
    decode_int8,
    encode_int8,
    export_compact_checkpoint,
    factor_second_moment,
    unfactor_second_moment,
)

from ..conftest import make_tiny_base, make_tiny_model, parameter_bytes

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


def test_the_locality_term_is_the_kl_of_each_adapted_model_on_the_next_tasks_text(tiny_model, tmp_path):
    tasks = color_tasks(2, 0, 0)
    batch = ReGradTrainer(tiny_model, arguments(tmp_path)).data_collator(tasks)["tasks"]
    plain = meta_loss(tiny_model, batch).detach()
    weighted = meta_loss(tiny_model, batch, locality_weight=0.5).detach()
    # Independently: each task's documents injected through the public API, the KL measured on the other's text.
    divergences = []
    for index, task in enumerate(tasks):
        text = batch[1 - index]["input_ids"]
        with torch.no_grad():
            unadapted = tiny_model.language_model(input_ids=text).logits.log_softmax(-1)
        with tiny_model.knowledge(task.documents), torch.no_grad():  # knowledge() computes the gradients
            adapted = tiny_model.language_model(input_ids=text).logits.log_softmax(-1)
        divergences.append((unadapted.exp() * (unadapted - adapted)).sum(-1).mean())
    expected = 0.5 * torch.stack(divergences).mean()
    assert expected > 0
    assert torch.allclose(weighted - plain, expected, rtol=1e-3, atol=1e-7)


def test_the_locality_term_trains_and_needs_two_tasks_per_batch(tiny_model, tmp_path):
    batch = ReGradTrainer(tiny_model, arguments(tmp_path)).data_collator(color_tasks(2, 0, 0))["tasks"]
    meta_loss(tiny_model, batch, locality_weight=1.0).backward()
    assert tiny_model.step_sizes.raw.grad is not None and bool(tiny_model.step_sizes.raw.grad.abs().sum() > 0)
    with pytest.raises(ReGradValueError, match="at least 2 tasks"):
        meta_loss(tiny_model, batch[:1], locality_weight=1.0)
    with pytest.raises(ReGradValueError, match="locality_weight"):
        ReGradTrainer(tiny_model, arguments(tmp_path, locality_weight=1.0, per_device_train_batch_size=1))


def test_answer_loss_weights_each_rows_first_answer_token():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 5, 6, 0]])
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none", ignore_index=-100)
    nll = nll.view(2, 4)
    # Row 0 scores positions 1-3 (labels 3, 4, 1), its first at position 1; row 1 scores positions 0-3.
    expected = (3 * nll[0, 1] + nll[0, 2] + nll[0, 3] + 3 * nll[1, 0] + nll[1, 1:].sum()) / (3 + 2 + 3 + 3)
    assert torch.allclose(answer_loss(logits, labels, 3.0), expected)
    plain = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(answer_loss(logits, labels), plain)  # weight 1: transformers' causal-LM mean


def test_the_first_token_weight_reweights_the_outer_loss_of_the_adapted_model(tiny_model, tmp_path):
    tasks = color_tasks(2, 0, 0)
    batch = ReGradTrainer(tiny_model, arguments(tmp_path)).data_collator(tasks)["tasks"]
    weighted = meta_loss(tiny_model, batch, first_token_weight=4.0).detach()
    # Independently: each task's documents injected through the public API, its answer tokens scored there.
    expected = []
    for task, encoded in zip(tasks, batch, strict=True):
        with tiny_model.knowledge(task.documents), torch.no_grad():
            logits = tiny_model.language_model(input_ids=encoded["input_ids"]).logits
        targets = encoded["labels"][0, 1:]
        nll = F.cross_entropy(logits[0, :-1], targets.clamp(min=0), reduction="none")[targets != -100]
        expected.append((4 * nll[0] + nll[1:].sum()) / (len(nll) + 3))
    assert torch.allclose(weighted, torch.stack(expected).mean(), rtol=1e-4, atol=1e-6)
    assert torch.allclose(meta_loss(tiny_model, batch, first_token_weight=1.0), meta_loss(tiny_model, batch))
    trainer = ReGradTrainer(tiny_model, arguments(tmp_path, answer_first_token_weight=4.0))
    assert torch.allclose(trainer.compute_loss(tiny_model, {"tasks": batch}).detach(), weighted, rtol=1e-5)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf"), True])
def test_bad_first_token_weights_raise(tiny_model, tmp_path, weight):
    batch = ReGradTrainer(tiny_model, arguments(tmp_path)).data_collator(color_tasks(2, 0, 0))["tasks"]
    with pytest.raises(ReGradValueError, match="first_token_weight"):
        meta_loss(tiny_model, batch, first_token_weight=weight)
    with pytest.raises(ReGradValueError, match="first_token_weight"):
        ReGradTrainer(tiny_model, arguments(tmp_path, answer_first_token_weight=weight))


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


def _scrambled(model):
    """A different learner start: whatever a resumed run ends with must come from the checkpoint."""
    with torch.no_grad():
        for parameter in [*model.lora_parameters().values(), model.step_sizes.raw]:
            parameter.uniform_(-1, 1)
    return model


def test_an_interrupted_run_resumes_to_the_uninterrupted_state(tokenizer, tmp_path):
    tasks = color_tasks(16, 0, 0)
    # random distractors and warmup: the data order, the collator's draws and the schedule must all resume
    options = {"max_steps": 6, "documents_per_task": 2, "warmup_steps": 2}
    uninterrupted = make_tiny_model(tokenizer)
    ReGradTrainer(uninterrupted, arguments(tmp_path / "a", **options), train_dataset=tasks).train()

    args = arguments(tmp_path / "b", save_strategy="steps", save_steps=3, **options)
    ReGradTrainer(make_tiny_model(tokenizer), args, train_dataset=tasks).train()
    checkpoint = tmp_path / "b" / "run" / "checkpoint-3"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "learner.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= files
    assert not {"model.safetensors", "pytorch_model.bin", "training_args.bin"} & files

    resumed = _scrambled(make_tiny_model(tokenizer))
    ReGradTrainer(resumed, args, train_dataset=tasks).train(resume_from_checkpoint=str(checkpoint))
    expected = learner_values(uninterrupted)
    assert {n: parameter_bytes_of(t) for n, t in learner_values(resumed).items()} == {
        n: parameter_bytes_of(t) for n, t in expected.items()
    }


def parameter_bytes_of(tensor):
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_a_compact_checkpoint_resumes_close_to_the_uninterrupted_state(tokenizer, tmp_path):
    tasks = color_tasks(16, 0, 0)
    options = {"max_steps": 6, "warmup_steps": 2}
    uninterrupted = make_tiny_model(tokenizer)
    ReGradTrainer(uninterrupted, arguments(tmp_path / "a", **options), train_dataset=tasks).train()

    compact = tmp_path / "compact"
    args = arguments(
        tmp_path / "b", save_strategy="steps", save_steps=3, compact_checkpoint_dir=str(compact), **options
    )
    ReGradTrainer(make_tiny_model(tokenizer), args, train_dataset=tasks).train()
    assert not (compact / "optimizer.pt").exists() and (compact / "optimizer.safetensors").is_file()
    assert json.loads((compact / "trainer_state.json").read_text())["global_step"] == 6  # the latest checkpoint

    # resume from the compact form of checkpoint-3: the learner is exact, the steps after it close
    checkpoint = tmp_path / "b" / "run" / "checkpoint-3"
    export_compact_checkpoint(checkpoint, compact)
    interrupted = _scrambled(make_tiny_model(tokenizer))
    interrupted.load_learner(compact / "learner.safetensors")  # the learner at step 3
    assert (compact / "learner.safetensors").read_bytes() == (checkpoint / "learner.safetensors").read_bytes()
    args = arguments(tmp_path / "d", save_strategy="no", **options)  # the runs below must not overwrite `compact`
    resumed = _scrambled(make_tiny_model(tokenizer))
    trainer = ReGradTrainer(resumed, args, train_dataset=tasks)
    trainer.train(resume_from_checkpoint=str(compact))
    assert trainer.state.global_step == 6 and trainer.lr_scheduler.get_last_lr() == [0.0, 0.0]  # the schedule went on
    # without the optimizer state (learner and trainer state only) the steps after the restart are those of a
    # fresh AdamW; the compact second moments must keep the run nearer the uninterrupted one
    restarted = _scrambled(make_tiny_model(tokenizer))
    fresh_optimizer = ReGradTrainer(restarted, args, train_dataset=tasks)
    fresh_optimizer._load_optimizer_and_scheduler = lambda checkpoint: None  # a resume refuses a missing state file
    fresh_optimizer.train(resume_from_checkpoint=str(compact))
    end, got, fresh = (
        torch.cat([t.flatten() for t in learner_values(m).values()]) for m in (uninterrupted, resumed, restarted)
    )
    assert (got - end).norm() < 0.5 * (fresh - end).norm()


def test_compact_moment_encodings():
    torch.manual_seed(0)
    moment = torch.randn(300, 50) * torch.logspace(-8, -2, 50)
    encoded = encode_int8(moment)
    assert encoded["codes"].dtype == torch.int8 and encoded["codes"].numel() == moment.numel()
    scales = encoded["scales"][torch.arange(moment.numel()) // 4096].reshape(moment.shape)
    assert ((decode_int8(encoded, moment.shape) - moment).abs() <= scales / 2 + 1e-12).all()
    rank_one = torch.outer(torch.rand(7) + 0.1, torch.rand(5) + 0.1)
    torch.testing.assert_close(unfactor_second_moment(factor_second_moment(rank_one)), rank_one, rtol=2e-2, atol=0)
    assert torch.equal(unfactor_second_moment(factor_second_moment(torch.zeros(3, 4))), torch.zeros(3, 4))
    vector = torch.rand(12)
    assert torch.equal(unfactor_second_moment(factor_second_moment(vector)), vector)  # step sizes: kept whole


def test_evaluate_injection_runs_every_case_and_restores_the_model(tiny_model, tokenizer):
    untrained = make_tiny_model(tokenizer, seed=3).learner_state_dict()
    before = parameter_bytes(tiny_model)
    results = evaluate_injection(tiny_model, color_tasks(2, 0, 0), untrained, cases=CASES, max_new_tokens=3)
    assert set(results) == set(CASES)
    assert parameter_bytes(tiny_model) == before
    assert results["rag"].prompt_tokens > results["regrad"].prompt_tokens  # the documents are in the RAG prompt
    assert all(0.0 <= r.f1 <= 1.0 and r.answer_loss > 0 for r in results.values())


def test_evaluate_injection_scores_words_beyond_the_question(tiny_model, tokenizer, monkeypatch):
    """An answer that restates the question and then gives the gold answer: F1 beyond the question is 1, F1 not."""
    from regrad_hf.evaluation import injection

    tasks = color_tasks(2, 0, 0)

    def restating(model, tokenizer, prompt_ids, max_new_tokens, prompt):
        asked = next(task for task in tasks if task.question in tokenizer.decode(prompt_ids))
        return f"{asked.question} {asked.answer}"

    monkeypatch.setattr(injection, "_generate", restating)
    results = evaluate_injection(tiny_model, tasks, cases=("no_adaptation", "regrad"), max_new_tokens=3)
    for result in results.values():
        assert result.f1_beyond_question == 1.0 and result.contained == 1.0
        assert result.f1 < 0.5


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


def test_train_command_reuses_the_last_steps_evaluation_and_can_skip_the_first(tokenizer, tmp_path, monkeypatch):
    make_tiny_base(tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps(t.to_dict()) for t in color_tasks(4, 0, 0)))
    passes = []
    evaluate = ReGradTrainer.evaluate
    monkeypatch.setattr(ReGradTrainer, "evaluate", lambda self, *a, **k: passes.append(1) or evaluate(self, *a, **k))
    argv = [
        "train", "--base_model", str(tmp_path / "base"), "--train_format", "jsonl", "--train_file", str(tasks),
        "--eval_file", str(tasks), "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--lora_rank", "2",
        "--per_device_train_batch_size", "2", "--eval_generate", "false", "--report_to", "none", "--use_cpu", "true",
        "--eval_strategy", "steps", "--eval_steps", "2", "--eval_before", "false",
    ]  # fmt: skip
    assert main(argv) == 0
    assert len(passes) == 1  # the step-2 evaluation; neither a "before" pass nor a repeat of step 2's
    record = json.loads((tmp_path / "out" / "training_record.json").read_text())
    logged = next(e for e in record["log_history"] if "eval_regrad_answer_loss" in e)
    assert record["metrics_before"] == {}
    assert record["metrics_after"]["eval_regrad_answer_loss"] == logged["eval_regrad_answer_loss"]
    loaded = ReGradForCausalLM.from_pretrained(tmp_path / "out")
    fresh = ReGradTrainer(loaded, arguments(tmp_path / "fresh"), eval_dataset=color_tasks(4, 0, 0)).evaluate()
    assert fresh["eval_regrad_answer_loss"] == pytest.approx(logged["eval_regrad_answer_loss"], rel=1e-5)


def test_bf16_autocast_trains_on_cpu_close_to_float32_and_keeps_the_learner_in_float32(tiny_model, tmp_path):
    # bf16 autocast is the v3 run's throughput lever on CPUs with AMX/AVX512-BF16 (~1.9x per step there): the
    # second-order meta-gradient must stay close to float32's, and the learner's tensors must stay float32.
    batch = ReGradTrainer(tiny_model, arguments(tmp_path)).data_collator(color_tasks(2, 0, 0))
    gradients, losses = {}, {}
    for bf16 in (False, True):
        tiny_model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = meta_loss(tiny_model, batch["tasks"])
        loss.backward()
        losses[bf16] = loss.item()
        gradients[bf16] = torch.cat([p.grad.flatten() for p in tiny_model.lora_parameters().values()])
    assert losses[True] == pytest.approx(losses[False], rel=0.05)
    assert F.cosine_similarity(gradients[True], gradients[False], dim=0) > 0.95
    assert not torch.equal(gradients[True], gradients[False])  # autocast did run in bf16

    dtypes = set()  # what the trainer's forward computes in, seen from one MLP projection
    projection = tiny_model.language_model.get_decoder().layers[-1].mlp.down_proj
    handle = projection.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    trainer = ReGradTrainer(tiny_model, arguments(tmp_path, bf16=True), train_dataset=color_tasks(4, 0, 0))
    before = learner_values(tiny_model)
    try:
        trainer.train()
    finally:
        handle.remove()
    after = learner_values(tiny_model)
    assert dtypes == {torch.bfloat16}
    assert all(tensor.dtype == torch.float32 for tensor in after.values())
    assert all(not torch.equal(after[n], before[n]) for n in tiny_model.lora_parameters())


def test_evaluate_shows_progress_unless_disable_tqdm(tiny_model, tmp_path, capsys):
    tasks = color_tasks(3, 0, 0)
    ReGradTrainer(tiny_model, arguments(tmp_path, disable_tqdm=False), eval_dataset=tasks).evaluate()
    shown = capsys.readouterr().err
    assert "Evaluating" in shown and "3/3" in shown
    ReGradTrainer(tiny_model, arguments(tmp_path), eval_dataset=tasks).evaluate()  # disable_tqdm=True
    assert "Evaluating" not in capsys.readouterr().err
