"""The `sgd` diagnostic ceiling: plain gradient steps on the retrieved documents from the untrained LoRA start."""

import pytest
import torch

from regrad_hf import ReGradValueError
from regrad_hf.evaluation import MethodRunner, SGDCeilingConfig, sgd_state, untrained_learner_state

from ..conftest import make_tiny_model, parameter_bytes

DOCUMENTS = ["The lighthouse of Varn is painted violet.", "Varn's harbour holds forty boats."]


def test_one_step_is_the_mean_document_gradient_times_the_learning_rate(tokenizer):
    model = make_tiny_model(tokenizer)
    start = untrained_learner_state(model, seed=0)
    with model.swapped_learner(start):
        gradients = model.document_gradients(DOCUMENTS)
    stepped = sgd_state(model, start, DOCUMENTS, SGDCeilingConfig(steps=1, learning_rate=2.0))
    for name, stacked in gradients.items():
        torch.testing.assert_close(stepped[name], start[name] - 2.0 * stacked.mean(dim=0))
    torch.testing.assert_close(stepped["regrad.step_sizes"], start["regrad.step_sizes"])


def test_later_steps_take_the_gradient_where_the_previous_step_left_the_tensors(tokenizer):
    model = make_tiny_model(tokenizer)
    start = untrained_learner_state(model, seed=0)
    one = sgd_state(model, start, DOCUMENTS, SGDCeilingConfig(steps=1, learning_rate=2.0))
    two = sgd_state(model, start, DOCUMENTS, SGDCeilingConfig(steps=2, learning_rate=2.0))
    a_names = [name for name in model.lora_parameters() if "lora_A" in name]
    # peft's start has B = 0, so the first step cannot move A; the second one, taken after B moved, does.
    assert all(torch.equal(one[name], start[name]) for name in a_names)
    assert any(not torch.equal(two[name], start[name]) for name in a_names)


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
