"""The learned gradient transform `G' = L G R` (issue 29, lever 2): the identity at init, linear, applied wherever a
step is applied (the swap, per-row serving, the meta-objective), saved with the learner, and off by default."""

import json

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from regrad_hf import GradientBank, ReGradConfig, ReGradForCausalLM, ReGradValueError
from regrad_hf.adaptation import deltas
from regrad_hf.adaptation.multi_lora import retrieval_row_tensors
from regrad_hf.adaptation.objective import meta_loss
from regrad_hf.adaptation.restore import applied_delta
from regrad_hf.adaptation.transform import GradientTransform
from regrad_hf.data import Task
from regrad_hf.data.collator import TaskCollator
from regrad_hf.evaluation.methods import untrained_learner_state

from ..conftest import DOCUMENTS, IDS, make_tiny_base, make_tiny_model, parameter_bytes
from ..modeling.test_conventions import exported_tensors

GREEDY = {"max_new_tokens": 5, "do_sample": False}
PROMPTS = ["What is the capital of Zorbia?", "Who discovered halvorite?"]


def trained(model: ReGradForCausalLM, seed: int = 1) -> ReGradForCausalLM:
    """Moves the model's gradient transform away from the identity, as training would (every factor changes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        raw = model.gradient_transform.raw
        raw.add_(0.3 * torch.randn(raw.shape, generator=generator))
    return model


def dense(transform: GradientTransform, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`L` and `R` of one tensor as float64 matrices, built from the documented factors by hand."""
    f = {key: value.detach().double() for key, value in transform.factors(name).items()}
    left = f["left"] if "left" in f else torch.diag(f["left_diagonal"]) + f["left_u"] @ f["left_v"].T
    right = f["right"] if "right" in f else torch.diag(f["right_diagonal"]) + f["right_u"] @ f["right_v"].T
    return left, right


def expected_deltas(model: ReGradForCausalLM, stacked: dict[str, torch.Tensor], gamma: float) -> dict:
    """`-gamma * alpha_t * L_t (sum_i g_i) R_t`, in float64, by hand."""
    alpha = model.step_sizes()
    result = {}
    for name, gradients in stacked.items():
        left, right = dense(model.gradient_transform, name)
        result[name] = -gamma * alpha[name].detach().double() * (left @ gradients.double().sum(0) @ right)
    return result


class LoraSnapshot(LogitsProcessor):
    """Records the LoRA tensors as the first decoding step sees them (the swap path writes its step into them)."""

    def __init__(self, model: ReGradForCausalLM):
        self.model, self.seen = model, None

    def __call__(self, input_ids, scores):
        if self.seen is None:
            self.seen = {name: p.detach().clone() for name, p in self.model.lora_parameters().items()}
        return scores


def test_the_config_field_is_off_by_default_and_checked():
    assert ReGradConfig().gradient_transform_rank is None
    assert ReGradConfig(gradient_transform_rank=0).gradient_transform_rank == 0
    for bad in (-1, 1.5, True, "2", 10**6):
        with pytest.raises(ReGradValueError, match="gradient_transform_rank"):
            ReGradConfig(gradient_transform_rank=bad)


def test_the_parametrisation_is_full_on_the_rank_side_and_diagonal_plus_low_rank_on_the_feature_side(tokenizer):
    model = make_tiny_model(tokenizer, gradient_transform_rank=2)  # LoRA rank 4, hidden 32, intermediate 64
    transform = model.gradient_transform
    a_name = next(n for n in model.lora_parameters() if n.endswith("gate_proj.lora_A.default.weight"))
    b_name = a_name.replace("lora_A", "lora_B")
    assert {k: tuple(v.shape) for k, v in transform.factors(a_name).items()} == {
        "left": (4, 4), "right_diagonal": (32,), "right_u": (32, 2), "right_v": (32, 2)
    }  # fmt: skip
    assert {k: tuple(v.shape) for k, v in transform.factors(b_name).items()} == {
        "left_diagonal": (64,), "left_u": (64, 2), "left_v": (64, 2), "right": (4, 4)
    }  # fmt: skip
    for name in model.lora_parameters():  # the identity, with a random reading factor of each low-rank pair
        left, right = dense(transform, name)
        assert torch.equal(left, torch.eye(len(left), dtype=torch.float64))
        assert torch.equal(right, torch.eye(len(right), dtype=torch.float64))
    factors = transform.factors(b_name)
    assert factors["left_v"].abs().sum() > 0 and factors["left_u"].abs().sum() == 0
    fresh = GradientTransform(shapes_of(model), 2).raw  # seeded: every process builds the same one
    assert torch.equal(transform.raw, fresh)
    assert torch.equal(untrained_learner_state(trained(model), 0)["regrad.gradient_transform"], fresh)


def test_at_init_the_transform_reproduces_todays_step_exactly(tokenizer, embedder):
    plain = make_tiny_model(tokenizer)
    with_transform = make_tiny_model(tokenizer, gradient_transform_rank=3)
    assert plain.gradient_transform is None
    gradients = plain.document_gradients(DOCUMENTS)
    step = deltas.combine(gradients, plain.step_sizes(), 0.7)
    transformed = deltas.combine(gradients, with_transform.step_sizes(), 0.7, with_transform.gradient_transform)
    assert all(torch.equal(transformed[n], step[n]) for n in step)
    rows = [[2, 0, 1], [3], None]
    lora = plain.lora_parameters()
    stacked = retrieval_row_tensors(lora, gradients, rows, plain.step_sizes(), 0.7)
    transformed_rows = retrieval_row_tensors(
        with_transform.lora_parameters(),
        gradients,
        rows,
        with_transform.step_sizes(),
        0.7,
        with_transform.gradient_transform,
    )
    assert all(torch.equal(transformed_rows[n], stacked[n]) for n in lora)
    # the meta-objective (second order) and generation through a bank, swap and per-row paths
    batch = [TaskCollator(tokenizer, max_document_tokens=64).encode(Task((DOCUMENTS[0],), PROMPTS[0], "Quentville"))]
    assert torch.equal(meta_loss(with_transform, batch), meta_loss(plain, batch))
    bank = GradientBank.build(plain, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False)
    outputs = []
    for model in (plain, with_transform):
        model.attach_bank(bank)
        one = model.generate(**tokenizer(PROMPTS[0], return_tensors="pt"), **GREEDY, top_k_docs=2)
        rows_out = model.generate(
            **tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left"), **GREEDY, top_k_docs=2
        )
        outputs.append((one, rows_out))
    assert all(torch.equal(a, b) for a, b in zip(*outputs, strict=True))


def test_the_transform_is_linear_and_is_l_g_r(tokenizer):
    model = trained(make_tiny_model(tokenizer, gradient_transform_rank=2))
    transform = model.gradient_transform
    gradients = model.document_gradients(DOCUMENTS)
    summed = deltas.combine(gradients, model.step_sizes(), 0.7, transform)
    one_by_one = [
        deltas.combine({n: g[i : i + 1] for n, g in gradients.items()}, model.step_sizes(), 0.7, transform)
        for i in range(len(DOCUMENTS))
    ]
    by_hand = expected_deltas(model, gradients, 0.7)
    for name in gradients:
        torch.testing.assert_close(summed[name], sum(step[name] for step in one_by_one), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(summed[name].double(), by_hand[name], rtol=1e-5, atol=1e-7)
        assert not torch.equal(summed[name], deltas.combine(gradients, model.step_sizes(), 0.7)[name])
        left, right = dense(transform, name)
        g = gradients[name][0]
        torch.testing.assert_close(transform.apply(name, g).double(), left @ g.double() @ right, rtol=1e-5, atol=1e-7)


def test_per_row_serving_applies_the_transformed_step_bit_for_bit_as_the_swap(tokenizer):
    model = trained(make_tiny_model(tokenizer, gradient_transform_rank=2))
    lora, gathered = model.lora_parameters(), model.document_gradients(DOCUMENTS)
    retrievals = [[2, 0, 1], None, [3], [1, 3], [2, 0, 1]]
    stacked = retrieval_row_tensors(lora, gathered, retrievals, model.step_sizes(), 0.7, model.gradient_transform)
    for row, retrieval in enumerate(retrievals):
        if retrieval is None:
            continue
        delta = deltas.combine(
            {n: g[retrieval] for n, g in gathered.items()}, model.step_sizes(), 0.7, model.gradient_transform
        )
        with applied_delta(lora, delta):
            assert all(torch.equal(stacked[n][row], p.detach()) for n, p in lora.items()), row


def test_a_bank_built_before_the_transform_moved_still_fits_and_generate_applies_the_transformed_step(
    tokenizer, embedder
):
    model = make_tiny_model(tokenizer, gradient_transform_rank=2)
    bank = GradientBank.build(model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False)
    trained(model)  # the transform is not part of the learner identity a bank is checked against
    model.attach_bank(bank)
    theta = {n: p.detach().clone() for n, p in model.lora_parameters().items()}
    snapshot = LoraSnapshot(model)
    inputs = tokenizer(PROMPTS[0], return_tensors="pt")
    with model.retrieved(PROMPTS[0], top_k=2) as hits:
        ids = [hit.id for hit in hits]
    model.generate(**inputs, **GREEDY, top_k_docs=2, logits_processor=LogitsProcessorList([snapshot]))
    expected = expected_deltas(model, bank.gather(ids), model.config.gamma)
    for name, value in theta.items():
        torch.testing.assert_close(snapshot.seen[name].double() - value.double(), expected[name], rtol=1e-4, atol=1e-6)
    assert all(torch.equal(p, theta[n]) for n, p in model.lora_parameters().items())  # restored


def test_a_trained_transform_round_trips_through_save_and_load(tokenizer, embedder, tmp_path):
    model = trained(make_tiny_model(tokenizer, gradient_transform_rank=2))
    bank = GradientBank.build(model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False)
    model.attach_bank(bank)
    model.save_pretrained(tmp_path / "learner")
    assert json.loads((tmp_path / "learner" / "config.json").read_text())["gradient_transform_rank"] == 2
    loaded = ReGradForCausalLM.from_pretrained(
        tmp_path / "learner", base_model=make_tiny_base(tokenizer), tokenizer=tokenizer, bank=bank
    )
    assert parameter_bytes(loaded) == parameter_bytes(model)
    assert not torch.equal(loaded.gradient_transform.raw, GradientTransform(dict(shapes_of(model)), 2).raw)
    for prompt in PROMPTS:  # through the bank: the trained transform's step
        inputs = tokenizer(prompt, return_tensors="pt")
        assert torch.equal(loaded.generate(**inputs, **GREEDY), model.generate(**inputs, **GREEDY))
    gathered = bank.gather(IDS[:3])
    steps = [deltas.combine(gathered, m.step_sizes(), 1.0, m.gradient_transform) for m in (model, loaded)]
    assert all(torch.equal(steps[0][n], steps[1][n]) for n in steps[0])


def test_a_learner_saved_without_the_field_loads_unchanged(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("gradient_transform_rank", None)  # as written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = ReGradForCausalLM.from_pretrained(tmp_path, base_model=make_tiny_base(tokenizer), tokenizer=tokenizer)
    assert loaded.config.gradient_transform_rank is None and loaded.gradient_transform is None
    assert parameter_bytes(loaded) == parameter_bytes(model)
    assert set(loaded.learner_state_dict()) == {*model.lora_parameters(), "regrad.step_sizes"}
    inputs = tokenizer(PROMPTS[0], return_tensors="pt")
    with loaded.knowledge(DOCUMENTS[:2]):
        answer = loaded.generate(**inputs, **GREEDY)
    with model.knowledge(DOCUMENTS[:2]):
        assert torch.equal(model.generate(**inputs, **GREEDY), answer)


def test_the_shipped_learner_has_no_transform():
    from regrad_hf.defaults import shipped_learner_path

    assert ReGradConfig.from_json_file(shipped_learner_path() / "config.json").gradient_transform_rank is None


def test_a_learner_file_and_a_config_that_disagree_on_the_transform_are_refused(tokenizer, tmp_path):
    make_tiny_model(tokenizer).save_pretrained(tmp_path / "plain")
    make_tiny_model(tokenizer, gradient_transform_rank=1).save_pretrained(tmp_path / "transformed")
    with pytest.raises(ReGradValueError, match=r"missing \['regrad.gradient_transform'\]"):
        make_tiny_model(tokenizer, gradient_transform_rank=1).load_learner(tmp_path / "plain" / "learner.safetensors")
    with pytest.raises(ReGradValueError, match=r"unexpected \['regrad.gradient_transform'\]"):
        make_tiny_model(tokenizer).load_learner(tmp_path / "transformed" / "learner.safetensors")
    with pytest.raises(ReGradValueError, match="shape mismatch"):
        make_tiny_model(tokenizer, gradient_transform_rank=2).load_learner(
            tmp_path / "transformed" / "learner.safetensors"
        )


def shapes_of(model: ReGradForCausalLM) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.lora_parameters().items()}


def test_an_exported_adapter_bakes_in_the_transformed_step(tokenizer, embedder, tmp_path):
    model = trained(make_tiny_model(tokenizer, gradient_transform_rank=2))
    model.attach_bank(GradientBank.build(model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False))
    directory = model.export_adapter(tmp_path / "adapter", ids=IDS[:2])
    theta = {name: p.detach().clone() for name, p in model.lora_parameters().items()}
    expected = expected_deltas(model, model.bank.gather(IDS[:2]), model.config.gamma)
    with model.injected(IDS[:2]):
        inside = {name: p.detach().clone() for name, p in model.lora_parameters().items()}
    exported = exported_tensors(directory)
    assert all(torch.equal(exported[name], inside[name]) for name in inside)  # bit for bit the swap's step
    for name, value in theta.items():
        torch.testing.assert_close(exported[name].double() - value.double(), expected[name], rtol=1e-4, atol=1e-6)


def test_rows_that_retrieve_different_documents_generate_with_the_transformed_step(tokenizer, embedder):
    model = make_tiny_model(tokenizer, gradient_transform_rank=2)
    model.attach_bank(GradientBank.build(model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False))
    prompts = [*PROMPTS, "Tell me about the Velomar bicycle frame"]  # three different retrievals: per-row tensors

    def alone() -> list[torch.Tensor]:
        return [model.generate(**tokenizer(p, return_tensors="pt"), **GREEDY, top_k_docs=2)[0, -5:] for p in prompts]

    at_identity = alone()
    trained(model)
    expected = alone()
    assert all(not torch.equal(a, b) for a, b in zip(at_identity, expected, strict=True))  # the transform matters
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    together = model.generate(**batch, **GREEDY, top_k_docs=2)
    assert all(torch.equal(together[row, -5:], expected[row]) for row in range(len(prompts)))
