"""Base models that a learner's config names are data, maybe hostile: one that names its own code (`auto_map`) runs
it only on the caller's explicit opt-in, transformers never asks on stdin, and pickled weights are never unpickled;
every refusal is a typed error."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from regrad_hf import ReGradForCausalLM, ReGradTypeError, ReGradValueError

from ..conftest import make_tiny_base, parameter_bytes

CODE = """
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
Path({marker!r}).write_text("ran")
class CustomConfig(LlamaConfig):
    model_type = "custom-llama"
class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
"""


@pytest.fixture
def stdin_says_yes(monkeypatch) -> io.StringIO:
    """What a user answering `y` to transformers' "run the custom code?" prompt types."""
    answer = io.StringIO("y\ny\ny\n")
    monkeypatch.setattr(sys, "stdin", answer)
    return answer


def learner_on_a_base_with_code(tokenizer, tmp_path: Path) -> tuple[Path, Path, ReGradForCausalLM]:
    """A learner saved on a plain base folder, to which an `auto_map` and its code are then added."""
    base = tmp_path / "base"
    make_tiny_base(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    model = ReGradForCausalLM.from_base(str(base))
    model.save_pretrained(tmp_path / "learner")
    marker = tmp_path / "code-ran"
    (base / "custom_llama.py").write_text(CODE.format(marker=str(marker)))
    config = json.loads((base / "config.json").read_text())
    config["model_type"] = "custom-llama"  # unknown to transformers: it would ask whether to run the code
    classes = {"AutoConfig": "CustomConfig", "AutoModelForCausalLM": "CustomForCausalLM"}
    config["auto_map"] = {auto: f"custom_llama.{name}" for auto, name in classes.items()}
    (base / "config.json").write_text(json.dumps(config))
    return tmp_path / "learner", marker, model


def test_a_base_with_its_own_code_runs_nothing_and_asks_nothing_without_the_explicit_opt_in(
    tokenizer, tmp_path, stdin_says_yes
):
    learner, marker, saved = learner_on_a_base_with_code(tokenizer, tmp_path)
    loads = {
        "from_pretrained": lambda: ReGradForCausalLM.from_pretrained(learner, trust_remote_code=True),
        "AutoModelForCausalLM": lambda: AutoModelForCausalLM.from_pretrained(learner, trust_remote_code=True),
        "from_base": lambda: ReGradForCausalLM.from_base(str(tmp_path / "base")),
    }
    for name, load in loads.items():
        with pytest.raises(ReGradValueError, match="auto_map") as raised:
            load()
        assert "trust_base_remote_code=True" in str(raised.value), name
        assert not marker.exists() and stdin_says_yes.tell() == 0, name  # no code ran, nothing was asked
    with pytest.raises(ReGradTypeError, match="trust_base_remote_code must be True or False"):
        ReGradForCausalLM.from_pretrained(learner, trust_base_remote_code="yes")
    assert not marker.exists()

    loaded = ReGradForCausalLM.from_pretrained(learner, trust_base_remote_code=True)  # the explicit opt-in
    assert marker.exists() and type(loaded.language_model).__name__ == "CustomForCausalLM"
    assert parameter_bytes(loaded) == parameter_bytes(saved) and stdin_says_yes.tell() == 0


def test_pickled_base_weights_are_never_unpickled(tokenizer, tmp_path, monkeypatch):
    base = tmp_path / "pickled-base"
    model = make_tiny_base(tokenizer)
    model.config.save_pretrained(base)
    tokenizer.save_pretrained(base)
    torch.save(model.state_dict(), base / "pytorch_model.bin")  # a valid pickle: transformers would load it
    unpickled = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: unpickled.append(args))
    for load in (
        lambda: ReGradForCausalLM.from_base(str(base)),
        lambda: ReGradForCausalLM.from_base(str(base), use_safetensors=False),
    ):
        with pytest.raises(ReGradValueError, match="never unpickles"):
            load()
    assert not unpickled
