"""The amortised meta-training recipe: task groups (one inner step, many questions), the cached-gradient phase (theta0
frozen, first order, exact) and per-element step sizes."""

import pytest
import torch

from regrad_hf import ReGradForCausalLM, ReGradValueError
from regrad_hf.adaptation.deltas import adapted_parameters, documents_lm_loss
from regrad_hf.adaptation.learner import StepSizes
from regrad_hf.adaptation.objective import answer_loss, meta_loss, scored_window, task_loss
from regrad_hf.data import Task
from regrad_hf.data.collator import TaskCollator
from regrad_hf.data.grouping import TaskGroup, as_training_items, count_questions, group_by_documents
from regrad_hf.training import ReGradTrainer
from regrad_hf.training.gradient_cache import DocumentGradientCache

from ..conftest import make_tiny_base, make_tiny_model
from .test_training import arguments, color_tasks


def paragraph_tasks() -> list[Task]:
    """Two documents with three and two questions each."""
    first = ("Box 1 is red. Box 2 is blue. Box 3 is green.",)
    second = ("The harbour of Quentville was founded in 1642 by sailors.",)
    return [
        Task(first, "What colour is box 1?", "red", id="a1"),
        Task(second, "When was the harbour founded?", "1642", id="b1"),
        Task(first, "What colour is box 2?", "blue", id="a2"),
        Task(first, "What colour is box 3?", "green", id="a3"),
        Task(second, "Who founded the harbour?", "sailors", id="b2"),
    ]


def test_group_by_documents_keeps_order_and_chunks():
    groups = group_by_documents(paragraph_tasks(), max_questions=2)
    assert [[t.id for t in group.tasks] for group in groups] == [["a1", "a2"], ["a3"], ["b1", "b2"]]
    assert [group.id for group in groups] == ["a1", "a3", "b1"]
    assert count_questions(groups) == 5
    assert groups[0].documents == paragraph_tasks()[0].documents
    with pytest.raises(ReGradValueError):
        group_by_documents(paragraph_tasks(), max_questions=0)


def test_task_group_round_trips_through_a_dict_and_refuses_bad_input():
    group = group_by_documents(paragraph_tasks())[0]
    assert TaskGroup.from_dict(group.to_dict()) == group
    with pytest.raises(ReGradValueError):
        TaskGroup.from_dict({"documents": ["x"], "tasks": "not a list"})
    with pytest.raises(ReGradValueError):
        TaskGroup((), group.tasks)
    with pytest.raises(ReGradValueError):
        TaskGroup(("doc",), ())
    assert as_training_items([group, paragraph_tasks()[0]])[0] is group


def test_a_group_encodes_each_question_as_its_single_task_does(tokenizer):
    collator = TaskCollator(tokenizer, max_document_tokens=64)
    group = group_by_documents(paragraph_tasks())[0]
    encoded = collator.encode(group)
    assert encoded["input_ids"].shape[0] == 3 and encoded["documents"] == group.documents
    for row, task in enumerate(group.tasks):
        alone = collator.encode(task)
        length = alone["input_ids"].shape[1]
        assert torch.equal(encoded["input_ids"][row, :length], alone["input_ids"][0])
        assert torch.equal(encoded["labels"][row, :length], alone["labels"][0])
        assert (encoded["labels"][row, length:] == -100).all()  # the padding is never scored
        assert torch.equal(encoded["document_ids"], alone["document_ids"])


@pytest.mark.parametrize("first_order", [False, True])
def test_a_group_loss_is_the_token_weighted_mean_of_its_questions_losses(tokenizer, first_order):
    """One inner step for Q questions is exact: the group's loss and gradients (second order included) are the
    answer-token-weighted combination of the questions' own."""
    model = make_tiny_model(tokenizer)
    collator = TaskCollator(tokenizer, max_document_tokens=64)
    group = group_by_documents(paragraph_tasks())[0]
    parameters = [*model.lora_parameters().values(), model.step_sizes.raw]

    def loss_and_gradients(task):
        loss = task_loss(model, collator.encode(task), first_order=first_order)
        return loss, torch.autograd.grad(loss, parameters)

    group_loss, group_gradients = loss_and_gradients(group)
    counts = [int((collator.encode(task)["labels"][:, 1:] != -100).sum()) for task in group.tasks]
    singles = [loss_and_gradients(task) for task in group.tasks]
    expected_loss = sum(n * loss for n, (loss, _) in zip(counts, singles, strict=True)) / sum(counts)
    torch.testing.assert_close(group_loss, expected_loss, rtol=1e-5, atol=1e-6)
    for index, gradient in enumerate(group_gradients):
        expected = sum(n * grads[index] for n, (_, grads) in zip(counts, singles, strict=True)) / sum(counts)
        torch.testing.assert_close(gradient, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_scored_window_holds_every_labelled_token_and_the_one_before():
    labels = torch.full((3, 10), -100)
    labels[0, 6:8] = 1  # row 0 scores positions 6-7, row 1 positions 4-8, row 2 nothing
    labels[1, 4:9] = 1
    assert scored_window(labels) == 7  # positions 3-9: 3 predicts the first labelled token, 4
    assert scored_window(torch.full((2, 5), -100)) == 5
    labels = torch.full((1, 4), -100)
    labels[0, 1:] = 1
    assert scored_window(labels) == 4  # never more than the row


def test_the_outer_loss_from_the_answer_window_equals_the_loss_over_every_position(tokenizer):
    """task_loss computes logits only from the first answer token's predecessor on (an ICL prompt is long); its loss
    and second-order gradients equal the answer loss over the logits of every position."""
    model = make_tiny_model(tokenizer)
    collator = TaskCollator(tokenizer, max_document_tokens=64, icl_share=1.0)  # the documents in every prompt
    task = collator.encode(group_by_documents(paragraph_tasks())[0])
    assert scored_window(task["labels"]) < task["input_ids"].shape[1]
    parameters = [*model.lora_parameters().values(), model.step_sizes.raw]
    loss = task_loss(model, task, first_token_weight=2.0)
    gradients = torch.autograd.grad(loss, parameters)

    lora = model.lora_parameters()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        inner = documents_lm_loss(model.language_model, task["document_ids"], task["document_mask"])
        summed = dict(zip(lora, torch.autograd.grad(inner, list(lora.values()), create_graph=True), strict=True))
        adapted = adapted_parameters(lora, summed, model.step_sizes(), model.config.gamma, model.gradient_transform)
        logits = torch.func.functional_call(
            model.language_model, adapted, args=(), kwargs={"input_ids": task["input_ids"]}
        )
    expected = answer_loss(logits.logits, task["labels"], first_token_weight=2.0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for gradient, reference in zip(gradients, torch.autograd.grad(expected, parameters), strict=True):
        torch.testing.assert_close(gradient, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())


def test_cached_gradients_equal_uncached_training_for_a_frozen_theta0(tokenizer):
    """The cache's summed document gradient gives the first-order loss and step-size gradient, and none to theta0."""
    model = make_tiny_model(tokenizer, step_size_mode="row")
    collator = TaskCollator(tokenizer, max_document_tokens=64, documents_per_task=3,
                            distractor_pool=[t.documents[0] for t in color_tasks(6, 10, 1)])  # fmt: skip
    cache = DocumentGradientCache(model, max_tokens=64)
    for item in [*group_by_documents(paragraph_tasks()), *color_tasks(2, 0, 0)]:
        encoded = collator.encode(item)
        uncached = task_loss(model, encoded, first_order=True)
        (uncached_alpha,) = torch.autograd.grad(uncached, [model.step_sizes.raw])
        cached = task_loss(model, encoded, summed_gradients=cache.summed(encoded["documents"]))
        lora = list(model.lora_parameters().values())
        cached_alpha, *lora_gradients = torch.autograd.grad(cached, [model.step_sizes.raw, *lora], allow_unused=True)
        torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            cached_alpha, uncached_alpha, rtol=1e-4, atol=1e-5 * uncached_alpha.abs().max().item()
        )
        assert all(g is None for g in lora_gradients)
    assert cache.hits > 0 and cache.misses > 0  # documents shared between tasks were computed once


def test_the_cache_refuses_stale_gradients_and_bounds_its_size(tokenizer):
    model = make_tiny_model(tokenizer)
    cache = DocumentGradientCache(model, max_tokens=64, max_documents=2)
    documents = [t.documents[0] for t in color_tasks(3, 0, 0)]
    cache.summed(documents)
    assert len(cache) == 2
    with torch.no_grad():
        next(iter(model.lora_parameters().values())).add_(1e-3)
    with pytest.raises(ReGradValueError, match="changed"):
        cache.summed(documents[:1])
    with pytest.raises(ReGradValueError):
        DocumentGradientCache(model, max_tokens=64, max_documents=0)


def test_meta_loss_checks_one_summed_gradient_per_task(tokenizer):
    model = make_tiny_model(tokenizer)
    batch = TaskCollator(tokenizer, max_document_tokens=64)(color_tasks(2, 0, 0))["tasks"]
    with pytest.raises(ReGradValueError, match="summed gradients"):
        meta_loss(model, batch, summed_gradients=[{}])


def test_trainer_cached_phase_moves_step_sizes_only(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer, step_size_mode="row")
    lora_before = {n: p.detach().clone() for n, p in model.lora_parameters().items()}
    alpha_before = model.step_sizes.raw.detach().clone()
    groups = group_by_documents(paragraph_tasks())
    trainer = ReGradTrainer(model, arguments(tmp_path, cached_gradients=True, max_steps=2), train_dataset=groups)
    trainer.train()
    assert all(torch.equal(p, lora_before[n]) for n, p in model.lora_parameters().items())
    assert not torch.equal(model.step_sizes.raw, alpha_before)
    assert trainer.gradient_cache.misses == 2  # each group's one document, computed once


def test_trainer_trains_task_groups_second_order(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.lora_parameters().items()}
    trainer = ReGradTrainer(
        model, arguments(tmp_path, max_steps=1), train_dataset=group_by_documents(paragraph_tasks())
    )
    trainer.train()
    assert all(not torch.equal(p, before[n]) for n, p in model.lora_parameters().items() if ".lora_A." in n)


def test_cached_phase_refuses_fixed_step_sizes(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer, step_size_mode="fix")
    with pytest.raises(ReGradValueError, match="fix"):
        ReGradTrainer(model, arguments(tmp_path, cached_gradients=True), train_dataset=color_tasks(2, 0, 0))


def test_full_step_sizes_are_per_element_and_convert_between_layouts():
    shapes = {"a": (3, 2), "b": (2, 4)}
    tie = StepSizes(shapes, "tie", "log", 1.0)
    with torch.no_grad():
        tie.raw.copy_(torch.tensor([0.5, 2.0]).log())
    full = StepSizes(shapes, "full", "log", 1.0)
    assert full.raw.numel() == 6 + 8
    full.copy_from(tie)
    values = full()
    assert values["a"].shape == (3, 2) and torch.allclose(values["a"], torch.full((3, 2), 0.5))
    with torch.no_grad():
        full.raw[:6] = torch.tensor([1.0, 3.0, 2.0, 2.0, 4.0, 6.0]).log()
    row = StepSizes(shapes, "row", "log", 1.0)
    row.copy_from(full)
    torch.testing.assert_close(row()["a"].reshape(-1), torch.tensor([2.0, 2.0, 5.0]))
    back = StepSizes(shapes, "tie", "log", 1.0)
    back.copy_from(full)
    torch.testing.assert_close(back()["a"], torch.tensor(3.0))


def test_full_step_sizes_save_and_load(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer, step_size_mode="full")
    with torch.no_grad():
        model.step_sizes.raw.normal_()
    model.save_pretrained(tmp_path / "learner")
    loaded = ReGradForCausalLM.from_pretrained(
        tmp_path / "learner", base_model=make_tiny_base(tokenizer), tokenizer=tokenizer
    )
    assert loaded.config.step_size_mode == "full"
    assert torch.equal(loaded.step_sizes.raw, model.step_sizes.raw)


def test_icl_share_puts_the_documents_in_a_seeded_share_of_prompts(tokenizer):
    tasks = [Task((f"Fact number {n} is {n * 7}.",), f"What is fact {n}?", str(n * 7), id=f"t{n}") for n in range(40)]

    def with_documents(collator):
        return ["Fact number" in tokenizer.decode(collator.encode(task)["input_ids"][0]) for task in tasks]

    assert not any(with_documents(TaskCollator(tokenizer, max_document_tokens=32)))
    assert all(with_documents(TaskCollator(tokenizer, max_document_tokens=32, icl_share=1.0)))
    half = with_documents(TaskCollator(tokenizer, max_document_tokens=32, icl_share=0.5, seed=1))
    assert 8 <= sum(half) <= 32  # a seeded draw per task, about half
    assert half == with_documents(TaskCollator(tokenizer, max_document_tokens=32, icl_share=0.5, seed=1))
    assert half != with_documents(TaskCollator(tokenizer, max_document_tokens=32, icl_share=0.5, seed=2))
    for share in (-0.1, 1.5, True):
        with pytest.raises(ReGradValueError, match="icl_share"):
            TaskCollator(tokenizer, icl_share=share)


def test_trainer_passes_icl_share_to_its_collator(tokenizer, tmp_path):
    trainer = ReGradTrainer(
        make_tiny_model(tokenizer), arguments(tmp_path, icl_share=0.25), train_dataset=paragraph_tasks()
    )
    assert trainer.data_collator.icl_share == 0.25
