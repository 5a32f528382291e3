"""The `sgd` diagnostic ceiling: plain gradient steps on the retrieved documents from the untrained LoRA start."""

import pytest
import torch

from regrad_hf import ReGradValueError
from regrad_hf.evaluation import MethodRunner, SGDCeilingConfig, sgd_ceiling, sgd_state, untrained_learner_state
from regrad_hf.evaluation.sgd_ceiling import documents_loss

from ..conftest import make_tiny_model, parameter_bytes

DOCUMENTS = ["The lighthouse of Varn is painted violet.", "Varn's harbour holds forty boats."]


def test_one_step_is_the_mean_document_gradient_times_the_learning_rate(tokenizer):
    model = make_tiny_model(tokenizer)
    start = untrained_learner_state(model, seed=0)
    with model.swapped_learner(start):
        gradients = model.document_gradients(DOCUMENTS)
    # A small step lowers the loss, so it is taken as it is (no halving).
    stepped = sgd_state(model, start, DOCUMENTS, SGDCeilingConfig(steps=1, learning_rate=1e-2))
    for name, stacked in gradients.items():
        torch.testing.assert_close(stepped[name], start[name] - 1e-2 * stacked.mean(dim=0))
    torch.testing.assert_close(stepped["regrad.step_sizes"], start["regrad.step_sizes"])


def test_later_steps_take_the_gradient_where_the_previous_step_left_the_tensors(tokenizer):
    model = make_tiny_model(tokenizer)
    start = untrained_learner_state(model, seed=0)
    one = sgd_state(model, start, DOCUMENTS, SGDCeilingConfig(steps=1, learning_rate=1e-2))
    two = sgd_state(model, start, DOCUMENTS, SGDCeilingConfig(steps=2, learning_rate=1e-2))
    a_names = [name for name in model.lora_parameters() if "lora_A" in name]
    # peft's start has B = 0, so the first step cannot move A; the second one, taken after B moved, does.
    assert all(torch.equal(one[name], start[name]) for name in a_names)
    assert any(not torch.equal(two[name], start[name]) for name in a_names)


def valley_one_gradient_away(monkeypatch, tokenizer):
    """A tiny model, its untrained start and mean document gradient, with the documents' loss replaced by
    `||theta - (start - gradient)||^2` over the LoRA tensors (the tiny random model's own loss is nearly flat along
    its gradient, so it cannot show an overshoot)."""
    model = make_tiny_model(tokenizer)
    start = untrained_learner_state(model, seed=0)
    with model.swapped_learner(start):
        gradients = {name: stacked.mean(dim=0) for name, stacked in model.document_gradients(DOCUMENTS).items()}
    centre = {name: start[name] - gradient for name, gradient in gradients.items()}

    def loss(model, documents):
        return sum(((p.detach() - centre[n]) ** 2).sum().item() for n, p in model.lora_parameters().items())

    monkeypatch.setattr(sgd_ceiling, "documents_loss", loss)
    return model, start, gradients


def test_a_step_that_overshoots_is_retaken_at_half_the_size_until_the_loss_falls(tokenizer, monkeypatch):
    model, start, gradients = valley_one_gradient_away(monkeypatch, tokenizer)
    # Size 8 overshoots the valley (7 gradients past it), 4 too (3 past), 2 does not (1 past: the start's loss).
    stepped = sgd_state(model, start, DOCUMENTS, SGDCeilingConfig(steps=1, learning_rate=8.0))
    for name, gradient in gradients.items():
        torch.testing.assert_close(stepped[name], start[name] - 2.0 * gradient)


def test_a_descent_that_no_halving_rescues_ends_where_it_stands(tokenizer, monkeypatch):
    model, start, _ = valley_one_gradient_away(monkeypatch, tokenizer)
    stepped = sgd_state(model, start, DOCUMENTS, SGDCeilingConfig(steps=3, learning_rate=8.0, max_halvings=1))
    assert all(torch.equal(stepped[name], start[name]) for name in start)


def test_the_documents_loss_is_the_mean_of_each_documents_mean_token_nll(tokenizer):
    model = make_tiny_model(tokenizer)
    expected = []
    for text in DOCUMENTS:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        expected.append(model.language_model(input_ids=ids, labels=ids).loss.item())
    assert documents_loss(model, DOCUMENTS) == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_the_sgd_method_answers_from_stepped_tensors_and_restores_the_learner_bit_for_bit(tokenizer):
    model = make_tiny_model(tokenizer)
    before = parameter_bytes(model)
    runner = MethodRunner(model, untrained_state=untrained_learner_state(model, seed=0), max_new_tokens=2)
    with runner.state("sgd", ["a", "b"], DOCUMENTS):
        inside = {name: p.detach().clone() for name, p in model.lora_parameters().items()}
    expected = sgd_state(model, untrained_learner_state(model, seed=0), DOCUMENTS, SGDCeilingConfig())
    assert all(torch.equal(inside[name], expected[name]) for name in inside)
    assert parameter_bytes(model) == before
    answer = runner.answer("sgd", "What colour is the lighthouse of Varn?", "violet", ["a", "b"], DOCUMENTS)
    assert isinstance(answer.prediction, str)
    assert parameter_bytes(model) == before


def test_the_sgd_method_needs_the_untrained_start_and_valid_settings(tokenizer):
    runner = MethodRunner(make_tiny_model(tokenizer))
    with pytest.raises(ReGradValueError, match="untrained_state"), runner.state("sgd", ["a"], DOCUMENTS[:1]):
        pass
    with pytest.raises(ReGradValueError, match="steps >= 1"):
        SGDCeilingConfig(steps=0)
    with pytest.raises(ReGradValueError, match="learning_rate > 0"):
        SGDCeilingConfig(learning_rate=float("nan"))
    with pytest.raises(ReGradValueError, match="learning_rate > 0"):
        SGDCeilingConfig(learning_rate=float("inf"))
    with pytest.raises(ReGradValueError, match="max_halvings"):
        SGDCeilingConfig(max_halvings=-1)
