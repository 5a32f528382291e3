import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from regrad_hf import ReGradConfig, ReGradForCausalLM, ReGradValueError
from regrad_hf.learner import StepSizes, find_target_modules


def test_default_targets_are_mlp_of_upper_half(tiny_base):
    names = find_target_modules(tiny_base)
    assert names == [f"model.layers.{i}.mlp.{p}" for i in (2, 3) for p in ("gate_proj", "up_proj", "down_proj")]


def test_explicit_targets_and_layers(tiny_base):
    names = find_target_modules(tiny_base, ["q_proj", "v_proj"], [0])
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_no_match_names_the_model_modules_and_changes_nothing(tiny_base, tokenizer):
    before = {name: p.clone() for name, p in tiny_base.named_parameters()}
    with pytest.raises(ReGradValueError, match=r"Its linear modules per layer are: .*mlp\.gate_proj"):
        ReGradForCausalLM.from_base(tiny_base, ReGradConfig(target_modules=["no_such_proj"]), tokenizer=tokenizer)
    after = dict(tiny_base.named_parameters())
    assert set(after) == set(before)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_layer_out_of_range(tiny_base):
    with pytest.raises(ReGradValueError, match="out of range"):
        find_target_modules(tiny_base, target_layers=[7])


def test_gpt2_style_model_is_supported(tokenizer):
    # GPT-2 uses Conv1D layers named mlp.c_fc / mlp.c_proj (attn.c_proj must not match).
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=4, n_head=4, n_positions=128))
    model = ReGradForCausalLM.from_base(base, ReGradConfig(lora_rank=2), tokenizer=tokenizer)
    modules = sorted({name.split(".lora_")[0] for name in model.lora_parameters()})
    assert modules == [f"transformer.h.{i}.mlp.{p}" for i in (2, 3) for p in ("c_fc", "c_proj")]
    gradients = model.document_gradients(["A short document about swans."])
    assert any(g.abs().sum() > 0 for g in gradients.values())


def test_only_lora_tensors_are_trainable(tiny_model):
    trainable = {name for name, p in tiny_model.language_model.named_parameters() if p.requires_grad}
    assert trainable == set(tiny_model.lora_parameters())
    assert len(trainable) == 12  # 2 layers x 3 modules x (A, B)


@pytest.mark.parametrize(("mode", "count", "trainable"), [("tie", 3, True), ("same", 1, True), ("fix", 1, False)])
def test_step_size_modes(mode, count, trainable):
    steps = StepSizes(["a", "b", "c"], mode, "log", 0.3)
    assert steps.raw.shape == (count,)
    assert (steps.raw in list(steps.parameters())) is trainable
    values = steps()
    assert set(values) == {"a", "b", "c"}
    assert all(torch.isclose(v, torch.tensor(0.3)) for v in values.values())


def test_linear_parametrization_stores_alpha():
    steps = StepSizes(["a"], "tie", "linear", 0.25)
    assert steps.raw.item() == 0.25
