import pytest
import torch
from torch.func import functional_call

from regrad_hf import ReGradKeyError, ReGradValueError
from regrad_hf.adaptation.deltas import (
    adapted_parameters,
    combine,
    document_gradient,
    document_gradients,
    truncation_report,
)
from regrad_hf.adaptation.per_sample import LinearWeightGradients
from regrad_hf.adaptation.restore import ExactRestore, applied_delta

from ..conftest import DOCUMENTS, parameter_bytes


def nll(model, text):
    ids = model.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_document_gradient_is_the_lm_loss_gradient_wrt_lora_only(tiny_model):
    lora = tiny_model.lora_parameters()
    gradients = tiny_model.document_gradients([DOCUMENTS[0]])

    ids = tiny_model.tokenizer(DOCUMENTS[0], return_tensors="pt").input_ids
    tiny_model(input_ids=ids, labels=ids).loss.backward()
    for name, parameter in lora.items():
        torch.testing.assert_close(gradients[name][0], parameter.grad)
    base = [p for n, p in tiny_model.language_model.named_parameters() if n not in lora]
    assert all(p.grad is None for p in base)


@pytest.mark.parametrize(("batch_size", "max_batch_tokens"), [(16, 4096), (2, 4096), (16, 40)])
def test_batched_gradients_equal_one_document_at_a_time(tiny_model, batch_size, max_batch_tokens):
    # Different lengths, so rows are padded; small batches and a small token budget split the documents.
    documents = [*DOCUMENTS, "Swans.", DOCUMENTS[0] + " " + DOCUMENTS[3]]
    lora = tiny_model.lora_parameters()
    stacked = document_gradients(
        tiny_model.language_model, tiny_model.tokenizer, lora, documents, 64, batch_size, max_batch_tokens
    )
    for index, document in enumerate(documents):
        alone = document_gradient(tiny_model.language_model, tiny_model.tokenizer, lora, document, 64)
        for name in lora:
            torch.testing.assert_close(stacked[name][index], alone[name], rtol=1e-5, atol=1e-7)


def test_parameters_that_are_not_linear_weights_fall_back_to_one_document_at_a_time(tiny_model):
    language_model = tiny_model.language_model
    norm_name, norm = next(
        (n, p) for n, p in language_model.named_parameters() if n.endswith("layers.3.input_layernorm.weight")
    )
    norm.requires_grad_(True)
    parameters = {**tiny_model.lora_parameters(), norm_name: norm}
    stacked = document_gradients(language_model, tiny_model.tokenizer, parameters, DOCUMENTS[:2], 64)
    for index, document in enumerate(DOCUMENTS[:2]):
        alone = document_gradient(language_model, tiny_model.tokenizer, parameters, document, 64)
        for name in parameters:
            assert torch.equal(stacked[name][index], alone[name])
    assert stacked[norm_name].abs().sum() > 0


def test_per_row_linear_gradients_count_every_call_of_a_shared_layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2, bias=False)
    inputs = torch.randn(4, 5, 3)
    capture = LinearWeightGradients({"layer": layer})
    with capture:
        per_row_loss = (layer(layer(inputs) @ torch.ones(2, 3)) ** 2).sum(dim=(1, 2))  # the layer runs twice
    per_row = capture.gradients(per_row_loss.sum())["layer"]
    for row in range(4):
        (expected,) = torch.autograd.grad((layer(layer(inputs[row]) @ torch.ones(2, 3)) ** 2).sum(), [layer.weight])
        torch.testing.assert_close(per_row[row], expected)


def test_long_documents_are_truncated_with_a_warning(tiny_model):
    long_text = " ".join(["swan"] * 200)
    lora = tiny_model.lora_parameters()
    with pytest.warns(UserWarning, match="truncated to max_document_tokens=16"):
        truncated = document_gradient(tiny_model.language_model, tiny_model.tokenizer, lora, long_text, 16)
    prefix_ids = tiny_model.tokenizer(long_text).input_ids[:16]
    prefix = tiny_model.tokenizer.decode(prefix_ids)
    expected = document_gradient(tiny_model.language_model, tiny_model.tokenizer, lora, prefix, 64)
    for name in lora:
        torch.testing.assert_close(truncated[name], expected[name])


@pytest.mark.parametrize("documents", [[], [""], ["   "], "a string, not a list", [3]])
def test_bad_documents_raise(tiny_model, documents):
    with pytest.raises(ReGradValueError):
        tiny_model.document_gradients(documents)


def test_combine_is_minus_gamma_alpha_sum():
    stacked = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    delta = combine(stacked, {"w": torch.tensor(0.5)}, gamma=2.0)
    assert torch.equal(delta["w"], torch.tensor([-4.0, -6.0]))
    with pytest.raises(ReGradKeyError):
        combine(stacked, {}, gamma=1.0)


def test_applied_delta_restores_bit_for_bit_after_exit_and_exception(tiny_model):
    lora = tiny_model.lora_parameters()
    before = parameter_bytes(tiny_model)
    # a delta whose round trip (x + d) - d is not exact in float32
    delta = {name: torch.full_like(p, 1e-3) / 3 for name, p in lora.items()}
    with applied_delta(lora, delta):
        assert parameter_bytes(tiny_model) != before
    assert parameter_bytes(tiny_model) == before
    with pytest.raises(RuntimeError, match="boom"), applied_delta(lora, delta):
        raise RuntimeError("boom")
    assert parameter_bytes(tiny_model) == before


def test_exact_restore_reuses_its_buffers_nests_and_survives_a_cast(tiny_model):
    lora = tiny_model.lora_parameters()
    restore = ExactRestore(lora)
    delta = {name: torch.full_like(p, 1e-3) / 3 for name, p in lora.items()}
    before = parameter_bytes(tiny_model)
    with restore.applied(delta):
        with restore.applied(delta):  # nested: a second set of buffers
            pass
        assert parameter_bytes(tiny_model) != before
    assert parameter_bytes(tiny_model) == before
    assert len(restore._spare_backups) == 2
    pointers = [{name: tensor.data_ptr() for name, tensor in spare.items()} for spare in restore._spare_backups]
    with restore.applied(delta):
        pass
    assert [{name: tensor.data_ptr() for name, tensor in spare.items()} for spare in restore._spare_backups] == pointers

    with restore.applied({}):  # an empty delta changes nothing
        assert parameter_bytes(tiny_model) == before

    tiny_model.to(torch.float64)  # the saved buffers no longer fit: reallocated, still exact
    delta = {name: torch.full_like(p, 1e-3) / 3 for name, p in lora.items()}
    before = parameter_bytes(tiny_model)
    with pytest.raises(RuntimeError, match="boom"), restore.applied(delta):
        raise RuntimeError("boom")
    assert parameter_bytes(tiny_model) == before


def test_bad_delta_changes_nothing(tiny_model):
    lora = tiny_model.lora_parameters()
    before = parameter_bytes(tiny_model)
    name = next(iter(lora))
    with pytest.raises(ReGradValueError, match="shape"), applied_delta(lora, {name: torch.zeros(1)}):
        pass
    with pytest.raises(ReGradKeyError), applied_delta(lora, {"not.a.tensor": torch.zeros(1)}):
        pass
    assert parameter_bytes(tiny_model) == before


def test_positive_step_lowers_the_document_loss(tiny_model):
    document = DOCUMENTS[1]
    before = nll(tiny_model, document)
    with tiny_model.knowledge([document], gamma=1.0):
        after = nll(tiny_model, document)
    assert after < before
    assert nll(tiny_model, document) == before


def test_functional_adaptation_matches_in_place_application(tiny_model):
    lora = tiny_model.lora_parameters()
    stacked = tiny_model.document_gradients(DOCUMENTS[:2])
    summed = {name: g.sum(0) for name, g in stacked.items()}
    adapted = adapted_parameters(lora, summed, tiny_model.step_sizes(), gamma=1.0)
    ids = tiny_model.tokenizer(DOCUMENTS[2], return_tensors="pt").input_ids
    functional_logits = functional_call(tiny_model.language_model, adapted, (ids,)).logits
    with tiny_model.knowledge(DOCUMENTS[:2], gamma=1.0), torch.no_grad():
        in_place_logits = tiny_model(input_ids=ids).logits
    torch.testing.assert_close(functional_logits, in_place_logits)


def test_functional_adaptation_is_differentiable_wrt_step_sizes(tiny_model):
    lora = tiny_model.lora_parameters()
    summed = {name: g.sum(0) for name, g in tiny_model.document_gradients([DOCUMENTS[0]]).items()}
    adapted = adapted_parameters(lora, summed, tiny_model.step_sizes())
    ids = tiny_model.tokenizer(DOCUMENTS[0], return_tensors="pt").input_ids
    loss = functional_call(tiny_model.language_model, adapted, (ids,), {"labels": ids}).loss
    loss.backward()
    assert tiny_model.step_sizes.raw.grad is not None
    assert tiny_model.step_sizes.raw.grad.abs().sum() > 0


def test_a_truncation_report_an_interrupt_cut_short_does_not_swallow_later_warnings(tiny_model):
    def cut_block():  # a Ctrl-C right after the block was entered: its exit never runs
        block = truncation_report()
        block.__enter__()
        return block  # kept alive, as a saved traceback keeps an interrupted frame's locals

    kept = cut_block()
    with pytest.warns(UserWarning, match="truncated to max_document_tokens=16"):
        document_gradient(tiny_model.language_model, tiny_model.tokenizer, tiny_model.lora_parameters(),
                          " ".join(["swan"] * 200), 16)  # fmt: skip
    assert kept is not None
