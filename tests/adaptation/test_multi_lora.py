"""Per-row LoRA tensors (`regrad_hf.adaptation.multi_lora`): each row of one forward runs with its own adapted LoRA
tensors."""

import threading

import pytest
import torch

from regrad_hf import ReGradError, ReGradKeyError, ReGradValueError
from regrad_hf.adaptation import deltas
from regrad_hf.adaptation.multi_lora import per_row_lora, retrieval_row_tensors, stacked_row_tensors
from regrad_hf.adaptation.restore import applied_delta

from ..conftest import DOCUMENTS, parameter_bytes


def document_deltas(model, documents):
    gradients = model.document_gradients(documents)
    step_sizes = model.step_sizes()
    return [
        deltas.combine({n: g[i : i + 1] for n, g in gradients.items()}, step_sizes, 1.0) for i in range(len(documents))
    ]


def test_per_row_forward_equals_the_swapped_weights_forward(tiny_model):
    lora = tiny_model.lora_parameters()
    row_deltas = document_deltas(tiny_model, DOCUMENTS[:2])
    rows = [1, None, 0, 1]
    torch.manual_seed(1)
    input_ids = torch.randint(0, 1000, (len(rows), 7))
    before = parameter_bytes(tiny_model)
    with torch.no_grad(), per_row_lora(tiny_model.language_model, stacked_row_tensors(lora, row_deltas, rows)):
        batched = tiny_model(input_ids=input_ids).logits
    assert parameter_bytes(tiny_model) == before
    with torch.no_grad():
        for row, delta_index in enumerate(rows):
            delta = {} if delta_index is None else row_deltas[delta_index]
            with applied_delta(lora, delta):
                alone = tiny_model(input_ids=input_ids[row : row + 1]).logits[0]
            torch.testing.assert_close(batched[row], alone, rtol=1e-5, atol=1e-5)
    # The rows really differ: the same input with another delta gives other logits.
    assert not torch.allclose(batched[0], batched[1], atol=1e-4)


def test_stacked_row_tensors_share_each_delta_and_leave_no_delta_rows_unadapted(tiny_model):
    lora = tiny_model.lora_parameters()
    row_deltas = document_deltas(tiny_model, DOCUMENTS[:2])
    stacked = stacked_row_tensors(lora, row_deltas, [0, None, 0, 1])
    for name, parameter in lora.items():
        assert stacked[name].shape == (4, *parameter.shape) and not stacked[name].requires_grad
        assert torch.equal(stacked[name][1], parameter.detach())
        assert torch.equal(stacked[name][0], stacked[name][2])
        with applied_delta(lora, row_deltas[1]):  # bit for bit what the swap writes
            assert torch.equal(stacked[name][3], parameter.detach())


def test_bad_row_tensors_are_refused(tiny_model):
    lora = tiny_model.lora_parameters()
    name = next(iter(lora))
    with pytest.raises(ReGradValueError, match="name no delta"):
        stacked_row_tensors(lora, [], [0])
    with pytest.raises(ReGradKeyError, match="does not have"):
        stacked_row_tensors(lora, [{"nope": torch.zeros(1)}], [0])
    with pytest.raises(ReGradValueError, match="shapes"):
        stacked_row_tensors(lora, [{name: torch.zeros(1)}], [0])
    stacked = stacked_row_tensors(lora, [], [None, None])
    with pytest.raises(ReGradValueError, match="expected"), per_row_lora(tiny_model.language_model, {name: lora[name]}):
        pass
    base_weight = "model.layers.0.mlp.gate_proj.weight"
    not_lora = {base_weight: lora[name][None]}
    with pytest.raises(ReGradValueError, match="LoRA projection"), per_row_lora(tiny_model.language_model, not_lora):
        pass
    with (
        pytest.raises(ReGradError, match="may only repeat each row"),
        torch.no_grad(),
        per_row_lora(tiny_model.language_model, stacked),
    ):
        tiny_model(input_ids=torch.ones(3, 4, dtype=torch.long))
    assert not any(module._forward_hooks for module in tiny_model.modules())


def test_hooks_follow_rows_repeated_in_place_and_leave_other_threads_alone(tiny_model):
    lora = tiny_model.lora_parameters()
    row_deltas = document_deltas(tiny_model, DOCUMENTS[:2])
    input_ids = torch.randint(0, 1000, (2, 5))
    with torch.no_grad():
        plain = tiny_model(input_ids=input_ids).logits
        with per_row_lora(tiny_model.language_model, stacked_row_tensors(lora, row_deltas, [0, 1])):
            batched = tiny_model(input_ids=input_ids).logits
            repeated = tiny_model(input_ids=input_ids.repeat_interleave(3, dim=0)).logits
            seen = {}
            other = threading.Thread(target=lambda: seen.update(logits=tiny_model(input_ids=input_ids).logits))
            other.start()
            other.join()
    torch.testing.assert_close(repeated, batched.repeat_interleave(3, dim=0))
    torch.testing.assert_close(seen["logits"], plain, rtol=0, atol=0)
    assert not torch.allclose(batched, plain, atol=1e-4)


@pytest.mark.slow
def test_shipped_learner_serves_a_heterogeneous_batch_as_each_row_alone(embedder):
    from pathlib import Path

    from regrad_hf import GradientBank, ReGradForCausalLM
    from regrad_hf.data import load_squad
    from regrad_hf.defaults import shipped_learner_path

    squad = Path(__file__).parents[1] / "fixtures" / "squad_40_articles.json"
    tasks = {task.documents[0]: task for task in load_squad(squad, range(33, 37))}  # not trained on
    tasks = list(tasks.values())[:4]
    model = ReGradForCausalLM.from_pretrained(shipped_learner_path())
    model.attach_bank(GradientBank.build(model, [t.documents[0] for t in tasks], embedder_model=embedder))
    tokenizer, settings = model.tokenizer, {"max_new_tokens": 12, "do_sample": False}
    tokenizer.padding_side = "left"
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": t.question}], tokenize=False, add_generation_prompt=True
        )
        for t in tasks
    ]
    queries = [t.question for t in tasks[:3]] + [None]
    before = parameter_bytes(model)
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    output = model.generate(**batch, **settings, query=queries, top_k_docs=2)
    assert parameter_bytes(model) == before
    for row, (prompt, query) in enumerate(zip(prompts, queries, strict=True)):
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        alone = model.generate(**inputs, **settings, query=query, top_k_docs=2, use_bank=query is not None)
        new = alone[0, inputs.input_ids.shape[1] :]
        assert torch.equal(output[row, batch.input_ids.shape[1] :][: len(new)], new)


def test_row_tensors_from_the_gathered_union_are_bit_for_bit_what_the_swap_writes(tiny_model):
    lora = tiny_model.lora_parameters()
    gathered = tiny_model.document_gradients(DOCUMENTS)  # the union of the rows' documents, gathered once
    step_sizes = tiny_model.step_sizes()
    name = next(iter(lora))
    # a per-element step size for one tensor: the step broadcasts, it is never read as a Python number
    step_sizes[name] = step_sizes[name] * torch.linspace(0.5, 1.5, lora[name].shape[-1])
    # retrievals of different lengths, a repeated one, a row without retrieval, documents shared between rows
    retrievals = [[2, 0, 1], None, [3], [0, 2, 1], [2, 0, 1], [1, 3]]
    stacked = retrieval_row_tensors(lora, gathered, retrievals, step_sizes, 0.7)
    for row, retrieval in enumerate(retrievals):
        for tensor_name, parameter in lora.items():
            assert stacked[tensor_name].shape == (len(retrievals), *parameter.shape)
            assert not stacked[tensor_name].requires_grad
        if retrieval is None:
            assert all(torch.equal(stacked[n][row], p.detach()) for n, p in lora.items())
            continue
        delta = deltas.combine({n: g[retrieval] for n, g in gathered.items()}, step_sizes, 0.7)
        with applied_delta(lora, delta):
            assert all(torch.equal(stacked[n][row], p.detach()) for n, p in lora.items()), row
    # every row its own retrieval, in order (no reindexing): the same values
    distinct = [[2, 0, 1], [3], [0, 2, 1]]
    alone = retrieval_row_tensors(lora, gathered, distinct, step_sizes, 0.7)
    assert all(torch.equal(alone[n], stacked[n][[0, 2, 3]]) for n in lora)


def test_bad_retrievals_are_refused(tiny_model):
    lora, step_sizes = tiny_model.lora_parameters(), tiny_model.step_sizes()
    gathered = tiny_model.document_gradients(DOCUMENTS[:2])
    with pytest.raises(ReGradValueError, match="one entry per row"):
        retrieval_row_tensors(lora, gathered, [], step_sizes, 1.0)
    with pytest.raises(ReGradValueError, match="one or more of the 2 gathered documents"):
        retrieval_row_tensors(lora, gathered, [[0, 2]], step_sizes, 1.0)
    with pytest.raises(ReGradValueError, match="one or more"):
        retrieval_row_tensors(lora, gathered, [[]], step_sizes, 1.0)
    with pytest.raises(ReGradKeyError, match="does not have"):
        retrieval_row_tensors(lora, {"nope": torch.zeros(2, 1)}, [[0]], {"nope": torch.tensor(1.0)}, 1.0)
    with pytest.raises(ReGradKeyError, match="no step size"):
        retrieval_row_tensors(lora, gathered, [[0]], {}, 1.0)
