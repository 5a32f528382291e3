"""Distillation from a RAG teacher: the teacher's log-probabilities (shared prefix run once), the KL term, the
collator's teacher rows and the objective and trainer wiring."""

import pytest
import torch
from torch.func import functional_call

from regrad_hf import ReGradValueError
from regrad_hf.adaptation.deltas import adapted_parameters, documents_lm_loss
from regrad_hf.adaptation.distillation import (
    base_parameters,
    distillation_loss,
    scored_positions,
    shared_prefix_length,
    teacher_log_probs,
)
from regrad_hf.adaptation.objective import answer_loss, meta_loss, task_loss
from regrad_hf.data.collator import TaskCollator
from regrad_hf.data.grouping import group_by_documents
from regrad_hf.training import ReGradTrainer

from ..conftest import assert_equal_up_to_rounding, make_tiny_model
from .test_amortised_recipe import paragraph_tasks
from .test_training import arguments


def nonzero_b(model) -> None:
    """A learner whose LoRA B tensors are not zero, so that the base model and the learner differ."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.lora_parameters().items():
            if ".lora_B." in name:
                parameter.normal_(0, 0.05)


def teacher_encoding(tokenizer):
    """A group of three questions encoded with their teacher rows (documents in the prompt)."""
    collator = TaskCollator(tokenizer, max_document_tokens=64, teacher_prompts=True)
    return collator.encode(group_by_documents(paragraph_tasks())[0])


def test_collator_teacher_rows_hold_the_documents_and_the_same_answer_tokens(tokenizer):
    encoded = teacher_encoding(tokenizer)
    assert encoded["teacher_input_ids"].shape[0] == encoded["input_ids"].shape[0] == 3
    for row in range(3):
        student = encoded["input_ids"][row][encoded["labels"][row] != -100]
        teacher = encoded["teacher_input_ids"][row][encoded["teacher_labels"][row] != -100]
        assert torch.equal(student, teacher)
        assert "Box 1 is red" in tokenizer.decode(encoded["teacher_input_ids"][row])
        assert "Box 1 is red" not in tokenizer.decode(encoded["input_ids"][row])
    assert "teacher_input_ids" not in TaskCollator(tokenizer, max_document_tokens=64).encode(paragraph_tasks()[0])


def test_shared_prefix_stops_before_the_first_scored_logit():
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 0], [1, 2, 3, 9, 9, 9]])
    labels = torch.tensor([[-100, -100, -100, -100, 5, -100], [-100, -100, -100, -100, -100, 9]])
    assert shared_prefix_length(input_ids, labels) == 3
    # One row: the prefix stops one token before its first answer token (that position's logit is scored).
    assert shared_prefix_length(input_ids[:1], labels[:1]) == 3
    assert shared_prefix_length(input_ids[1:], labels[1:]) == 4


def test_teacher_log_probs_with_a_shared_prefix_equal_a_plain_forward(tokenizer):
    model = make_tiny_model(tokenizer)
    nonzero_b(model)
    encoded = teacher_encoding(tokenizer)
    input_ids, labels = encoded["teacher_input_ids"], encoded["teacher_labels"]
    assert shared_prefix_length(input_ids, labels) > 10  # the documents are shared
    parameters = base_parameters(model.lora_parameters())
    actual = teacher_log_probs(model.language_model, parameters, input_ids, labels)
    with torch.no_grad(), model.disable_adapter():
        logits = model.language_model(input_ids=input_ids).logits
    rows, positions = scored_positions(labels)
    expected = logits[rows, positions].float().log_softmax(-1)
    assert actual.shape == (int((labels != -100).sum()), logits.shape[-1])
    assert_equal_up_to_rounding(actual, expected)


def test_base_parameters_give_the_base_model_without_touching_the_learner(tokenizer):
    model = make_tiny_model(tokenizer)
    nonzero_b(model)
    before = {name: p.clone() for name, p in model.lora_parameters().items()}
    input_ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        through_base = functional_call(
            model.language_model, base_parameters(model.lora_parameters()), args=(), kwargs={"input_ids": input_ids}
        ).logits
        learner = model.language_model(input_ids=input_ids).logits
        with model.disable_adapter():
            base = model.language_model(input_ids=input_ids).logits
    assert torch.equal(through_base, base)
    assert not torch.allclose(learner, base)
    assert all(torch.equal(p, before[name]) for name, p in model.lora_parameters().items())


def test_distillation_loss_is_the_kl_at_the_answer_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, -100, -100, 2, -100]])
    teacher = torch.randn(3, 7).log_softmax(-1)
    # By hand: position t predicts token t + 1, so rows/positions (0, 1), (0, 2), (1, 2).
    student = torch.stack([logits[0, 1], logits[0, 2], logits[1, 2]]).log_softmax(-1)
    expected = (teacher.exp() * (teacher - student)).sum(-1).mean()
    assert_equal_up_to_rounding(distillation_loss(logits, labels, teacher), expected)
    own = torch.stack([logits[0, 1], logits[0, 2], logits[1, 2]]).log_softmax(-1)
    assert distillation_loss(logits, labels, own).abs() < 1e-6


def test_task_loss_adds_the_weighted_kl_to_the_teacher(tokenizer):
    model = make_tiny_model(tokenizer)
    nonzero_b(model)
    encoded = teacher_encoding(tokenizer)
    plain = task_loss(model, encoded, first_order=True)
    distilled = task_loss(model, encoded, first_order=True, distillation_weight=0.5)
    # The KL by hand: the adapted student from a first-order step, the teacher from a plain base forward.
    lora = model.lora_parameters()
    inner = documents_lm_loss(model.language_model, encoded["document_ids"], encoded["document_mask"])
    gradients = dict(zip(lora, torch.autograd.grad(inner, list(lora.values())), strict=True))
    adapted = adapted_parameters(lora, gradients, model.step_sizes(), model.config.gamma)
    with torch.no_grad():
        student = functional_call(model.language_model, adapted, args=(), kwargs={"input_ids": encoded["input_ids"]})
        with model.disable_adapter():
            base = model.language_model(input_ids=encoded["teacher_input_ids"]).logits
    rows, positions = scored_positions(encoded["teacher_labels"])
    kl = distillation_loss(student.logits, encoded["labels"], base[rows, positions].float().log_softmax(-1))
    assert kl > 0
    assert_equal_up_to_rounding(plain, answer_loss(student.logits, encoded["labels"]))
    assert_equal_up_to_rounding(distilled, plain + 0.5 * kl)


def test_distillation_refuses_bad_weights_and_missing_teacher_rows(tokenizer):
    model = make_tiny_model(tokenizer)
    plain = TaskCollator(tokenizer, max_document_tokens=64).encode(group_by_documents(paragraph_tasks())[0])
    with pytest.raises(ReGradValueError, match="teacher_prompts"):
        task_loss(model, plain, distillation_weight=1.0)
    for weight in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ReGradValueError, match="distillation_weight"):
            meta_loss(model, [plain], distillation_weight=weight)


def test_trainer_with_distillation_trains_second_order(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer)
    before = {name: p.detach().clone() for name, p in model.learner_state_dict().items()}
    groups = group_by_documents(paragraph_tasks(), max_questions=2)
    trainer = ReGradTrainer(model, arguments(tmp_path, distillation_weight=1.0), train_dataset=groups)
    assert trainer.data_collator.teacher_prompts
    loss = trainer.train().training_loss
    assert loss == loss and loss > 0
    moved = [name for name, p in model.learner_state_dict().items() if not torch.equal(p, before[name])]
    assert any(".lora_" in name for name in moved) and any("step_size" in name for name in moved)
    with pytest.raises(ReGradValueError, match="distillation_weight"):
        ReGradTrainer(model, arguments(tmp_path, distillation_weight=-0.5), train_dataset=groups)
