"""The model's boundary: the learner's identity covers the base, and bad values (gamma, config bounds, damaged learner
files) raise typed errors that leave every parameter byte as it was."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from regrad_hf import (
    BankMismatchError,
    GradientBank,
    ReGradConfig,
    ReGradError,
    ReGradForCausalLM,
    ReGradValueError,
)
from regrad_hf.errors import ReGradFileError, ReGradTypeError
from regrad_hf.modeling import causal_lm as modeling_module
from regrad_hf.modeling import learner_files

from ..conftest import DOCUMENTS, make_tiny_base, make_tiny_model, parameter_bytes

GREEDY = {"max_new_tokens": 4, "do_sample": False}
STEP_SIZES = "regrad.step_sizes"


def same_learner_on(base, model: ReGradForCausalLM, tokenizer) -> ReGradForCausalLM:
    """`model`'s learner (LoRA values and step sizes) on another base."""
    other = ReGradForCausalLM.from_base(base, model.config, tokenizer=tokenizer)
    other.load_learner_state(model.learner_state_dict())
    return other


def differing_fields(a: ReGradForCausalLM, b: ReGradForCausalLM) -> set[str]:
    x, y = a.learner_identity(), b.learner_identity()
    return {key for key in x.keys() | y.keys() if x.get(key) != y.get(key)}


# ---------------------------------------------------------------------------------------------------- identity


def test_a_bank_does_not_attach_to_the_same_learner_on_another_base(tiny_model, tiny_bank, tokenizer):
    other = same_learner_on(make_tiny_base(tokenizer, seed=1), tiny_model, tokenizer)
    assert other.config.base_model_name_or_path is None  # no name tells the bases apart: only the weights do
    assert differing_fields(tiny_model, other) == {"base_weights"}
    before = parameter_bytes(other)
    with pytest.raises(BankMismatchError, match=r"differ in base_weights \(bank [0-9a-f]+, model [0-9a-f]+\)\."):
        other.attach_bank(tiny_bank)
    assert other.bank is None and parameter_bytes(other) == before
    other.attach_bank(tiny_bank, force=True)
    assert other.bank is tiny_bank


def test_the_base_config_is_part_of_the_identity(tiny_model, tiny_bank, tokenizer):
    other = same_learner_on(make_tiny_base(tokenizer), tiny_model, tokenizer)
    assert other.fingerprint() == tiny_model.fingerprint()
    other.language_model.config.rms_norm_eps = 1e-3  # same weights, another computation
    assert differing_fields(tiny_model, other) == {"base_config"}
    with pytest.raises(BankMismatchError, match="differ in base_config"):
        other.attach_bank(tiny_bank)


def test_how_the_base_is_loaded_or_run_is_not_part_of_the_identity(tiny_model, tokenizer):
    fingerprint = tiny_model.fingerprint()
    config = tiny_model.language_model.config
    config.use_cache = False  # what Trainer sets
    config._name_or_path = "/somewhere/else"
    config.pad_token_id = config.eos_token_id
    assert tiny_model.fingerprint() == fingerprint


def test_casting_the_base_changes_the_identity(tiny_model, tokenizer):
    fingerprint = tiny_model.fingerprint()
    other = same_learner_on(make_tiny_base(tokenizer).to(torch.bfloat16), tiny_model, tokenizer)
    assert "base_weights" in differing_fields(tiny_model, other)
    assert other.fingerprint() != fingerprint


def test_the_base_hash_is_computed_once_until_a_base_tensor_changes(tiny_model, monkeypatch):
    calls = []
    original = modeling_module.base_identity
    monkeypatch.setattr(modeling_module, "base_identity", lambda model: calls.append(1) or original(model))
    tiny_model._base_identity = None
    first = tiny_model.fingerprint()
    for _ in range(3):
        assert tiny_model.fingerprint() == first
        with tiny_model.knowledge([DOCUMENTS[0]]):  # adaptations write only LoRA tensors: the cache stays valid
            pass
    assert len(calls) == 1
    embedding = tiny_model.language_model.get_input_embeddings().weight
    with torch.no_grad():
        embedding[0, 0] += 1.0  # a sampled position (the first of every tensor)
    assert tiny_model.fingerprint() != first and len(calls) == 2


@pytest.mark.slow  # a fresh interpreter imports torch and transformers
def test_another_process_computes_the_same_identity(tiny_model):
    script = (
        "import json; from transformers import AutoTokenizer; from regrad_hf.defaults import embedded_model_path; "
        "from tests.conftest import make_tiny_model; "
        "m = make_tiny_model(AutoTokenizer.from_pretrained(embedded_model_path())); "
        "print(json.dumps(m.learner_identity()))"
    )
    root = Path(__file__).resolve().parents[2]
    env = {"PYTHONPATH": f"{root / 'src'}:{root}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=root, env={**os.environ, **env}, check=True
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == tiny_model.learner_identity()


# ---------------------------------------------------------------------------------------------------- gamma

BAD_GAMMAS = [math.nan, math.inf, -math.inf, "1.0", True, [1.0]]


@pytest.mark.parametrize("where", ["generate", "knowledge", "retrieved", "injected", "config"])
def test_gamma_must_be_a_finite_number(tiny_model, tiny_bank, tokenizer, where):
    tiny_model.attach_bank(tiny_bank)
    inputs = tokenizer("What is the capital of Zorbia?", return_tensors="pt")
    calls = {
        "generate": lambda gamma: tiny_model.generate(**inputs, **GREEDY, gamma=gamma),
        "knowledge": lambda gamma: tiny_model.knowledge([DOCUMENTS[0]], gamma=gamma).__enter__(),
        "retrieved": lambda gamma: tiny_model.retrieved("capital of Zorbia", gamma=gamma).__enter__(),
        "injected": lambda gamma: tiny_model.injected(["zorbia"], gamma=gamma).__enter__(),
        "config": lambda gamma: ReGradConfig(gamma=gamma),
    }
    before = parameter_bytes(tiny_model)
    for gamma in BAD_GAMMAS:
        with pytest.raises(ReGradValueError, match="gamma must be a finite number"):
            calls[where](gamma)
        assert parameter_bytes(tiny_model) == before, gamma
    # an int is a number: accepted, as the float it equals
    assert torch.equal(
        tiny_model.generate(**inputs, **GREEDY, gamma=2), tiny_model.generate(**inputs, **GREEDY, gamma=2.0)
    )


# ---------------------------------------------------------------------------------------------------- config bounds


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lora_rank": 2**26}, "lora_rank must be an integer from 1 to 4096"),
        ({"lora_rank": True}, "lora_rank must be an integer"),
        ({"lora_rank": 4.0}, "lora_rank must be an integer"),
        ({"lora_alpha": math.nan}, "lora_alpha"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"init_step_size": math.inf}, "init_step_size"),
        ({"init_step_size": "0.3"}, "init_step_size"),
        ({"init_step_size": -1.0}, "init_step_size"),
        ({"top_k_docs": 10**6}, "top_k_docs must be an integer from 1 to 1024"),
        ({"max_document_tokens": 1}, "max_document_tokens must be an integer from 2"),
        ({"max_document_tokens": 2**40}, "max_document_tokens"),
        ({"target_layers": [-1]}, "target_layers must be layer indices"),
        ({"target_layers": [1, 1]}, "lists a layer twice"),
        ({"target_layers": ["2"]}, "target_layers must be layer indices"),
        ({"target_layers": 3}, "target_layers must be None"),
        ({"target_modules": [""]}, "target_modules must be non-empty"),
        ({"target_modules": [3]}, "target_modules must be non-empty"),
        ({"embedder": ""}, "embedder must be None or a non-empty string"),
        ({"base_model_revision": 5}, "base_model_revision"),
        # templates are formatted at every prompt: a conversion or format spec would fail (or allocate) there
        ({"user_template": "{question!x}"}, "conversion or format spec"),
        ({"user_template": "{question:>99999999999}"}, "conversion or format spec"),
        ({"document_template": "{document}{index:s}"}, "conversion or format spec"),
        # a prompt no tokenizer can encode, or too large for the saved config.json to load again
        ({"system_prompt": "\udcff"}, "system_prompt is not valid Unicode"),
        ({"user_template": "{question}\udcff"}, "user_template is not valid Unicode"),
        ({"system_prompt": "x" * (4 << 20)}, "system_prompt has 4194304 characters"),
        ({"dtype": "float99"}, "transformers refuses"),
    ],
    ids=lambda value: str(value)[:40] if isinstance(value, dict) else "",
)
def test_config_values_have_bounds(kwargs, match):
    with pytest.raises(ReGradValueError, match=match):
        ReGradConfig(**kwargs)
    ((name, value),) = kwargs.items()
    if name == "dtype":  # a transformers field, checked by transformers when used
        return
    config = ReGradConfig()
    before = config.to_dict()
    with pytest.raises(ReGradValueError, match=match):  # set after construction: checked alike, and not kept
        setattr(config, name, value)
    assert config.to_dict() == before


def test_config_fields_set_later_are_kept_when_valid_and_positional_arguments_are_refused():
    config = ReGradConfig()
    config.gamma, config.top_k_docs, config.system_prompt = 2.5, 5, None
    assert (config.gamma, config.top_k_docs, config.system_prompt) == (2.5, 5, None)
    assert ReGradConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    with pytest.raises(ReGradTypeError, match="keyword arguments only"):
        ReGradConfig("x")


def test_a_saved_config_out_of_bounds_is_refused_before_the_base_is_touched(tiny_model, tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    base = make_tiny_base(tokenizer)
    before = parameter_bytes(base)
    for text in [json.dumps({**config, "lora_rank": 2**26}), "{not json", "[1, 2]", "[" * 100_000 + "]" * 100_000]:
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ReGradValueError, match="lora_rank|not a readable ReGrad config"):
            ReGradForCausalLM.from_pretrained(tmp_path, base_model=base, tokenizer=tokenizer)
        assert parameter_bytes(base) == before
        assert not any(".lora_" in name for name, _ in base.named_parameters())  # nothing injected


# ---------------------------------------------------------------------------------------------------- learner files


def _damage_tensor(tensors, edit):
    name = next(n for n in tensors if ".lora_B." in n)
    tensors[name] = edit(tensors[name].clone())
    return tensors


def _with_nan(tensors):
    return _damage_tensor(tensors, lambda t: t.index_fill_(0, torch.tensor([0]), math.nan))


def _with_inf_step_size(tensors):
    tensors[STEP_SIZES] = torch.full_like(tensors[STEP_SIZES], math.inf)
    return tensors


def _with_overflowing_step_size(tensors):
    tensors[STEP_SIZES] = torch.full_like(tensors[STEP_SIZES], 1000.0)  # log-parametrised: exp(1000) = inf
    return tensors


def _with_huge_step_size(tensors):
    tensors[STEP_SIZES] = torch.full_like(tensors[STEP_SIZES], 50.0)  # log-parametrised: exp(50), finite but absurd
    return tensors


def _with_int_tensor(tensors):
    return _damage_tensor(tensors, lambda t: t.to(torch.int32))


def _with_wrong_shape(tensors):
    return _damage_tensor(tensors, lambda t: t[:-1])


def _with_extra_tensor(tensors):
    return {**tensors, "huge": torch.zeros(1000, 1000)}


def _without_step_sizes(tensors):
    return {name: t for name, t in tensors.items() if name != STEP_SIZES}


TENSOR_DAMAGE = [
    (_with_nan, "NaN or infinite"),
    (_with_inf_step_size, "NaN or infinite"),
    (_with_overflowing_step_size, "step sizes .* are not finite"),
    (_with_huge_step_size, "a step size of 5.18e\\+21 is beyond 1e\\+06"),
    (_with_int_tensor, "floating point"),
    (_with_wrong_shape, "shape mismatch"),
    (_with_extra_tensor, r"unexpected \['huge'\]"),
    (_without_step_sizes, r"missing \['regrad.step_sizes'\]"),
]
BYTE_DAMAGE = [
    (lambda data: data[: len(data) // 2], "truncated"),
    (lambda data: b"", "empty"),
    (lambda data: b"\xff" * 64 + data[64:], "header"),
    (lambda data: data[:8] + b"{" * (len(data) - 8), "garbage"),
]


@pytest.fixture
def saved_learner(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "learner")
    return tmp_path / "learner"


@pytest.mark.parametrize("damage, match", TENSOR_DAMAGE, ids=[d.__name__ for d, _ in TENSOR_DAMAGE])
def test_a_learner_file_with_bad_tensors_is_refused(saved_learner, tiny_model, tokenizer, damage, match):
    path = saved_learner / "learner.safetensors"
    save_file(damage(load_file(path)), path)
    before = parameter_bytes(tiny_model)
    with pytest.raises(ReGradValueError, match=match):
        tiny_model.load_learner(path)
    assert parameter_bytes(tiny_model) == before
    base = make_tiny_base(tokenizer).train()
    layout = _module_layout(base)
    with pytest.raises(ReGradValueError, match=match):
        ReGradForCausalLM.from_pretrained(saved_learner, base_model=base, tokenizer=tokenizer)
    assert _module_layout(base) == layout  # the caller's base model leaves the failed load as it came in


def _module_layout(model):
    """Everything a failed load must not change in a base model: its modules, weights, flags and mode."""
    modules = [(name, type(module).__name__, module.training) for name, module in model.named_modules()]
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    attributes = sorted(vars(model))
    return modules, flags, parameter_bytes(model), model.generation_config.to_json_string(), attributes


def test_a_bank_of_another_learner_leaves_the_given_base_as_it_was(saved_learner, tokenizer, embedder):
    other = make_tiny_model(tokenizer, seed=1)  # another LoRA start: another learner
    bank = GradientBank.build(other, DOCUMENTS[:2], embedder_model=embedder)
    base = make_tiny_base(tokenizer)
    base.requires_grad_(True)
    layout = _module_layout(base)
    with pytest.raises(BankMismatchError):
        ReGradForCausalLM.from_pretrained(saved_learner, base_model=base, tokenizer=tokenizer, bank=bank)
    assert _module_layout(base) == layout
    loaded = ReGradForCausalLM.from_pretrained(saved_learner, base_model=base, tokenizer=tokenizer)  # still wraps
    assert loaded.language_model is base


@pytest.mark.parametrize("damage, case", BYTE_DAMAGE, ids=[case for _, case in BYTE_DAMAGE])
def test_a_damaged_learner_file_raises_a_typed_error(saved_learner, tiny_model, damage, case):
    path = saved_learner / "learner.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    before = parameter_bytes(tiny_model)
    with pytest.raises(ReGradValueError, match="not a readable learner file|does not fit"):
        tiny_model.load_learner(path)
    assert parameter_bytes(tiny_model) == before


def test_a_bad_learner_state_changes_nothing(tiny_model):
    state = tiny_model.learner_state_dict()
    before = parameter_bytes(tiny_model)
    for bad in (_with_nan(dict(state)), _with_int_tensor(dict(state)), {**state, STEP_SIZES: "0.3"}, [1, 2]):
        with pytest.raises(ReGradValueError):
            tiny_model.load_learner_state(bad)
        assert parameter_bytes(tiny_model) == before


def test_loading_a_learner_inside_an_adaptation_is_refused(tiny_model):
    state = make_tiny_model_state(tiny_model)
    before = parameter_bytes(tiny_model)
    with tiny_model.knowledge([DOCUMENTS[0]]):
        inside = parameter_bytes(tiny_model)
        with pytest.raises(ReGradError, match="inside knowledge"):
            tiny_model.load_learner_state(state)
        with pytest.raises(ReGradError, match="inside knowledge"), tiny_model.swapped_learner(state):
            pass
        assert parameter_bytes(tiny_model) == inside
    assert parameter_bytes(tiny_model) == before


def make_tiny_model_state(model: ReGradForCausalLM) -> dict[str, torch.Tensor]:
    return {name: tensor + 0.5 for name, tensor in model.learner_state_dict().items()}


# ---------------------------------------------------------------------------------------------- learner directories


def load_into(directory, tokenizer) -> ReGradForCausalLM:
    return ReGradForCausalLM.from_pretrained(directory, base_model=make_tiny_base(tokenizer), tokenizer=tokenizer)


def learner_bytes(model: ReGradForCausalLM) -> dict[str, bytes]:
    return {name: tensor.numpy().tobytes() for name, tensor in model.learner_state_dict().items()}


def test_numbers_of_any_real_type_save_as_json_and_runtime_keys_do_not_break_loading(tiny_model, tokenizer, tmp_path):
    """A Fraction or numpy gamma is a number, but not JSON: it is saved as a float. An attention implementation in
    config.json (the wrapper runs none) is ignored instead of making the wrapper refuse to be built."""
    import fractions

    import numpy

    for gamma in (fractions.Fraction(1, 2), numpy.float32(0.5)):
        config = ReGradConfig(**{**tiny_model.config.to_dict(), "gamma": gamma})
        assert type(config.gamma) is float and config.gamma == 0.5
    tiny_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attn_implementation": "sdpa"}))
    assert parameter_bytes(load_into(tmp_path, tokenizer)) == parameter_bytes(tiny_model)


@pytest.mark.parametrize("name", ["config.json", "learner.safetensors", "generation_config.json", "bank"])
def test_a_learner_directory_never_follows_a_symlink(saved_learner, tiny_bank, tokenizer, tmp_path, name):
    """Even to identical bytes outside the directory: the link is refused, naming it."""
    if name == "bank":
        tiny_bank.save_pretrained(saved_learner / "bank")
    outside = tmp_path / "outside"
    outside.mkdir()
    (saved_learner / name).rename(outside / name)
    (saved_learner / name).symlink_to(outside / name)
    with pytest.raises(ReGradFileError, match=f"{name} is a symlink"):
        load_into(saved_learner, tokenizer)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{", "not a readable generation config"),
        ("[1]", "holds a list, not an object"),
        ('{"num_beams": 0}', "num_beams must be a positive integer"),
        ('{"max_new_tokens": "x"}', "max_new_tokens must be a positive integer"),
        ('{"eos_token_id": "x"}', "eos_token_id must be a token id"),
        ('{"temperature": -1, "do_sample": true}', "temperature must be a positive finite number"),
    ],
)
def test_a_damaged_generation_config_is_refused_when_loaded(saved_learner, tokenizer, text, match):
    (saved_learner / "generation_config.json").write_text(text)
    with pytest.raises(ReGradValueError, match=match):
        load_into(saved_learner, tokenizer)


def test_bad_save_directories_are_typed_errors(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("x")
    for directory, error, match in [
        (None, ReGradTypeError, "save_directory must be a directory path"),
        (5, ReGradTypeError, "save_directory must be a directory path"),
        ("", ReGradValueError, "empty path"),
        (tmp_path / "a-file", ReGradFileError, "it is a file, not a directory"),
        (tmp_path / "a-file" / "sub", ReGradFileError, "a folder above it, is a file"),
    ]:
        with pytest.raises(error, match=match):
            tiny_model.save_pretrained(directory)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "tokenizer.json").mkdir()  # a save cannot replace a directory by a file: nothing written
    with pytest.raises(ReGradFileError, match="tokenizer.json is a directory"):
        tiny_model.save_pretrained(tmp_path / "taken")
    assert sorted(os.listdir(tmp_path / "taken")) == ["tokenizer.json"]
    assert sorted(os.listdir(tmp_path)) == ["a-file", "taken"]
    with pytest.raises(ReGradValueError, match="is a file, not a directory"):
        ReGradForCausalLM.from_pretrained(tmp_path / "a-file")


def test_a_save_that_fails_midway_keeps_the_previous_learner(saved_learner, tiny_model, tokenizer, monkeypatch):
    """The last file of a save fails to write: the directory still holds the previous learner, every byte."""
    before = {p.name: p.read_bytes() for p in saved_learner.iterdir()}
    with torch.no_grad():
        next(iter(tiny_model.lora_parameters().values())).add_(1.0)
    real = modeling_module.atomic_write_text

    def failing(path, text):
        if Path(path).name == "config.json":
            raise OSError(28, "No space left on device")
        real(path, text)

    monkeypatch.setattr(modeling_module, "atomic_write_text", failing)
    with pytest.raises(ReGradFileError, match="disk is full"):
        tiny_model.save_pretrained(saved_learner)
    assert {p.name: p.read_bytes() for p in saved_learner.iterdir()} == before


def test_a_save_killed_while_moving_its_files_in_reads_as_the_new_learner(tokenizer, tmp_path, monkeypatch):
    """A kill (or an interrupt) between the renames of a save leaves a journal and the files still to move in:
    readers see the new learner whole, never the new tensors with the old config, and the next save finishes it."""
    old, new = make_tiny_model(tokenizer, seed=1, lora_rank=4), make_tiny_model(tokenizer, seed=2, lora_rank=2)
    old.save_pretrained(tmp_path)
    moves = []
    move_files = learner_files._move_files

    def killed_after_one_move(staging, directory, names):
        moves.extend(names)
        move_files(staging, directory, names[:-1])  # every file but the last, config.json, moves in
        raise KeyboardInterrupt  # stands for the kill

    monkeypatch.setattr(learner_files, "_move_files", killed_after_one_move)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / learner_files.JOURNAL_FILE).exists() and moves[-1] == "config.json"
    assert learner_bytes(load_into(tmp_path, tokenizer)) == learner_bytes(new)
    old.save_pretrained(tmp_path)  # finishes the interrupted save, then saves
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert learner_bytes(load_into(tmp_path, tokenizer)) == learner_bytes(old)


def test_threads_saving_different_learners_into_one_directory_never_mix_them(tokenizer, tmp_path):
    """Two writers of one directory wait for each other: the directory always holds one whole learner."""
    learners = [make_tiny_model(tokenizer, seed=1, lora_rank=4), make_tiny_model(tokenizer, seed=2, lora_rank=2)]
    expected = [learner_bytes(model) for model in learners]
    errors = []

    def save(model):
        try:
            for _ in range(15):
                model.save_pretrained(tmp_path)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=save, args=(model,)) for model in learners]
    for thread in threads:
        thread.start()
    loaded = []
    while any(thread.is_alive() for thread in threads):
        if (tmp_path / "config.json").exists():
            loaded.append(learner_bytes(load_into(tmp_path, tokenizer)))
    for thread in threads:
        thread.join()
    loaded.append(learner_bytes(load_into(tmp_path, tokenizer)))
    assert not errors and all(state in expected for state in loaded)


def test_a_reader_whose_file_a_save_moves_in_between_finding_and_opening_it_reads_again(
    tokenizer, tmp_path, monkeypatch
):
    """A save moving its files in (journal written, config.json not moved yet): a reader finds learner.safetensors
    in the staging folder, the writer moves it before the reader opens it. Nothing the reader compares changed
    (config.json and the journal are the same), yet the read must be retried, not reported as a missing file."""
    old, new = make_tiny_model(tokenizer, seed=1), make_tiny_model(tokenizer, seed=2)
    old.save_pretrained(tmp_path)
    new.save_pretrained(tmp_path / "new")
    staging = tmp_path / f"{learner_files.STAGING_PREFIX}test"
    (tmp_path / "new").rename(staging)
    (tmp_path / learner_files.JOURNAL_FILE).write_text(json.dumps({"staging": staging.name}) + "\n")
    read_tensors, moved = learner_files.read_tensors, []

    def writer_moves_the_file_first(path):
        if not moved:  # the writer's os.replace lands between the reader's check and its open
            os.replace(staging / learner_files.LEARNER_FILE, tmp_path / learner_files.LEARNER_FILE)
            moved.append(path)
        return read_tensors(path)

    monkeypatch.setattr(learner_files, "read_tensors", writer_moves_the_file_first)
    config, tensors, _, _ = learner_files.read_learner(tmp_path)
    assert moved[0] == staging / learner_files.LEARNER_FILE
    assert config.lora_rank == new.config.lora_rank
    expected = new.learner_state_dict()
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[n], expected[n]) for n in expected)
