import pytest
import torch
from transformers import (
    FalconConfig,
    FalconForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PhiConfig,
    PhiForCausalLM,
)

from regrad_hf import ReGradConfig, ReGradForCausalLM, ReGradValueError
from regrad_hf.adaptation.deltas import combine
from regrad_hf.adaptation.learner import StepSizes, find_target_modules
from regrad_hf.adaptation.objective import meta_loss
from regrad_hf.data import Task
from regrad_hf.data.collator import TaskCollator

from ..conftest import assert_equal_up_to_rounding, make_tiny_base, make_tiny_model


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
    # Documents are truncated within the base's 128 positions (a larger max_document_tokens is refused).
    config = ReGradConfig(lora_rank=2, max_document_tokens=128)
    model = ReGradForCausalLM.from_base(base, config, tokenizer=tokenizer)
    modules = sorted({name.split(".lora_")[0] for name in model.lora_parameters()})
    assert modules == [f"transformer.h.{i}.mlp.{p}" for i in (2, 3) for p in ("c_fc", "c_proj")]
    gradients = model.document_gradients(["A short document about swans."])
    assert any(g.abs().sum() > 0 for g in gradients.values())


# Tiny random models of the other decoder families (4 layers, hidden 32): their MLP projections and where they sit.
FAMILIES = {
    "phi": (
        lambda vocab: PhiForCausalLM(PhiConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=4, num_attention_heads=4)),
        "model.layers.{}.mlp.", ("fc1", "fc2"),
    ),
    "opt": (
        lambda vocab: OPTForCausalLM(OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=4,
                                               num_attention_heads=4, word_embed_proj_dim=32)),
        "model.decoder.layers.{}.", ("fc1", "fc2"),
    ),
    "gpt-neox": (
        lambda vocab: GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=4, num_attention_heads=4)),
        "gpt_neox.layers.{}.mlp.", ("dense_h_to_4h", "dense_4h_to_h"),
    ),
    "falcon": (
        lambda vocab: FalconForCausalLM(FalconConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=4,
                                                     num_attention_heads=4)),
        "transformer.h.{}.mlp.", ("dense_h_to_4h", "dense_4h_to_h"),
    ),
    "gpt-j": (
        lambda vocab: GPTJForCausalLM(GPTJConfig(vocab_size=vocab, n_embd=32, n_layer=4, n_head=4, rotary_dim=4,
                                                 n_positions=128)),
        "transformer.h.{}.mlp.", ("fc_in", "fc_out"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_targets_are_found_in_other_decoder_families(tokenizer, family):
    make, layer, projections = FAMILIES[family]
    torch.manual_seed(0)
    model = ReGradForCausalLM.from_base(make(len(tokenizer)), ReGradConfig(lora_rank=2, max_document_tokens=64),
                                        tokenizer=tokenizer)  # fmt: skip
    modules = sorted({name.split(".lora_")[0] for name in model.lora_parameters()})
    assert modules == sorted(layer.format(i) + p for i in (2, 3) for p in projections)
    documents = ["A short document about swans.", "Zorbia's capital is Quentville, a harbour town."]
    batched = model.document_gradients(documents)  # one padded batch, per-row gradients from its layers
    assert any(g.abs().sum() > 0 for name, g in batched.items() if ".lora_B." in name)
    for row, document in enumerate(documents):
        alone = model.document_gradients([document])
        for name, gradient in alone.items():
            assert_equal_up_to_rounding(batched[name][row], gradient[0])


def test_only_lora_tensors_are_trainable(tiny_model):
    trainable = {name for name, p in tiny_model.language_model.named_parameters() if p.requires_grad}
    assert trainable == set(tiny_model.lora_parameters())
    assert len(trainable) == 12  # 2 layers x 3 modules x (A, B)


SHAPES = {"a": (4, 6), "b": (6, 4), "c": (2, 3)}


@pytest.mark.parametrize(
    ("mode", "count", "trainable"), [("tie", 3, True), ("row", 12, True), ("same", 1, True), ("fix", 1, False)]
)
def test_step_size_modes(mode, count, trainable):
    steps = StepSizes(SHAPES, mode, "log", 0.3)
    assert steps.raw.shape == (count,)
    assert (steps.raw in list(steps.parameters())) is trainable
    values = steps()
    assert set(values) == {"a", "b", "c"}
    assert all(torch.allclose(v, torch.tensor(0.3)) for v in values.values())
    for name, shape in SHAPES.items():  # each broadcasts against its tensor, per row in `row` mode
        assert values[name].shape == ((shape[0], 1) if mode == "row" else ())


def test_row_step_sizes_scale_each_row_of_the_step_by_its_own_value():
    steps = StepSizes(SHAPES, "row", "linear", 1.0)
    with torch.no_grad():
        steps.raw.copy_(torch.arange(1.0, 13.0))
    gradients = {name: torch.ones(2, *shape) for name, shape in SHAPES.items()}  # two documents
    delta = combine(gradients, steps(), gamma=0.5)
    assert torch.equal(delta["a"][:, 0], -0.5 * 2 * torch.arange(1.0, 5.0))  # rows of "a" are raw[0:4]
    assert torch.equal(delta["b"][:, 3], -0.5 * 2 * torch.arange(5.0, 11.0))
    assert torch.equal(delta["c"], -0.5 * 2 * torch.tensor([[11.0] * 3, [12.0] * 3]))


def test_step_sizes_convert_between_layouts():
    tie = StepSizes(SHAPES, "tie", "log", 1.0)
    with torch.no_grad():
        tie.raw.copy_(torch.tensor([0.5, 2.0, 4.0]).log())
    row = StepSizes(SHAPES, "row", "log", 1.0)
    row.copy_from(tie)  # every row starts from its tensor's step size
    assert torch.allclose(row()["a"], torch.full((4, 1), 0.5)) and torch.allclose(row()["c"], torch.full((2, 1), 4.0))
    with torch.no_grad():
        row.raw[4:10] = torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0, 3.0]).log()
    back = StepSizes(SHAPES, "tie", "linear", 1.0)
    back.copy_from(row)  # a tensor gets the mean of its rows'
    assert torch.allclose(back.raw, torch.tensor([0.5, 2.0, 4.0]))
    with pytest.raises(ReGradValueError, match="other LoRA tensors"):
        row.copy_from(StepSizes({"a": (4, 6)}, "tie", "log", 1.0))


def test_row_step_sizes_train_and_round_trip_through_save_and_load(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer, step_size_mode="row")
    rows = sum(p.shape[0] for p in model.lora_parameters().values())
    assert model.step_sizes.raw.shape == (rows,)
    collator = TaskCollator(tokenizer, max_document_tokens=32, max_answer_tokens=8)
    tasks = collator([Task(("Ada keeps seven blue herons.",), "How many herons?", "seven")])["tasks"]
    meta_loss(model, tasks).backward()
    gradient = model.step_sizes.raw.grad
    assert gradient is not None and gradient.shape == (rows,) and len(set(gradient.tolist())) > 1  # one per row
    with torch.no_grad():
        model.step_sizes.raw.add_(torch.linspace(-0.5, 0.5, rows))
    model.save_pretrained(tmp_path / "learner")
    loaded = ReGradForCausalLM.from_pretrained(tmp_path / "learner", base_model=make_tiny_base(tokenizer))
    assert loaded.config.step_size_mode == "row"
    assert torch.equal(loaded.step_sizes.raw, model.step_sizes.raw)


def test_linear_parametrization_stores_alpha():
    steps = StepSizes({"a": (2, 2)}, "tie", "linear", 0.25)
    assert steps.raw.item() == 0.25


def test_a_run_starts_from_a_learner_of_another_step_size_layout(tokenizer, tmp_path):
    from regrad_hf.modeling.learner_state import init_from_learner

    source = make_tiny_model(tokenizer, seed=1)
    with torch.no_grad():
        source.step_sizes.raw.copy_(torch.linspace(-1.0, 1.0, source.step_sizes.raw.numel()))
    source.save_pretrained(tmp_path / "tie")
    model = make_tiny_model(tokenizer, step_size_mode="row")
    init_from_learner(model, tmp_path / "tie")
    lora = source.lora_parameters()
    assert all(torch.equal(p, lora[name]) for name, p in model.lora_parameters().items())
    theirs, ours = source.step_sizes(), model.step_sizes()
    assert all(torch.allclose(ours[name], theirs[name].expand_as(ours[name])) for name in ours)
