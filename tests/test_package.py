"""The package as a user meets it: `import regrad_hf` imports no torch (each public name is imported on first use),
every public name still comes from `regrad_hf`, and transformers' Auto classes build ReGrad models after a bare
`import regrad_hf`, whatever is imported first (the rule of `regrad_hf.auto_registration`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import regrad_hf
from regrad_hf import ReGradConfig, ReGradForCausalLM

from .conftest import make_tiny_base

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "transformers", "datasets", "huggingface_hub")


def python(script: str) -> str:
    """Runs `script` in a fresh interpreter on this checkout's sources; returns its stdout."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_regrad_hf_and_its_command_import_no_torch():
    """What `regrad --help` imports before parsing: `regrad_hf` (lazy) and `regrad_hf.cli` (standard library)."""
    script = f"import sys, regrad_hf, regrad_hf.cli; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    assert python(script) == "[]"


def test_every_public_name_and_sub_package_is_there():
    namespace: dict = {}
    exec("from regrad_hf import *", namespace)
    assert set(regrad_hf.__all__) <= set(namespace) and set(regrad_hf.__all__) <= set(dir(regrad_hf))
    assert all(namespace[name] is getattr(regrad_hf, name) for name in regrad_hf.__all__)
    assert regrad_hf.ReGradTrainer is regrad_hf.training.ReGradTrainer
    assert regrad_hf.bank.GradientBank is regrad_hf.GradientBank and callable(regrad_hf.data.load_squad)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        regrad_hf.nothing_here  # noqa: B018


def test_the_serving_errors_live_in_errors_and_serving():
    from regrad_hf import errors, serving

    for name in ("GeneratorClosedError", "GenerationTimeoutError"):
        error = getattr(errors, name)
        assert getattr(serving, name) is error and getattr(regrad_hf, name) is error
        assert issubclass(error, errors.ReGradError)
    assert issubclass(errors.GenerationTimeoutError, TimeoutError)
    assert issubclass(errors.GeneratorClosedError, RuntimeError)


@pytest.mark.parametrize(
    "first",
    [
        "import regrad_hf",  # transformers imported after it
        "import transformers; import regrad_hf",  # before it
        "import regrad_hf; import peft",  # by another library
        "from regrad_hf.prompting import PromptTemplate",  # by a module the config needs, while it is imported
        "from regrad_hf.config import ReGradConfig",  # by the config itself
    ],
)
def test_the_auto_classes_know_regrad_after_any_import_order(first):
    script = f"""{first}
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
registered = "regrad" in CONFIG_MAPPING  # what AutoConfig.from_pretrained looks config.json's model_type up in
from transformers import AutoConfig
config = AutoConfig.for_model("regrad", lora_rank=4)
print(registered, type(config).__name__, MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__)
"""
    assert python(script) == "True ReGradConfig ReGradForCausalLM"


def test_auto_model_and_pipeline_load_a_learner_after_a_bare_import(tokenizer, tmp_path):
    """A saved learner on a local base: `AutoModelForCausalLM.from_pretrained` and `pipeline(model=...)` in a fresh
    interpreter whose only regrad import is `import regrad_hf`, before transformers."""
    base = make_tiny_base(tokenizer)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model = ReGradForCausalLM.from_base(str(tmp_path / "base"), ReGradConfig(lora_rank=4, max_document_tokens=64))
    model.save_pretrained(tmp_path / "learner")
    script = f"""import regrad_hf
from transformers import AutoModelForCausalLM, pipeline
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "learner")!r})
generator = pipeline("text-generation", model={str(tmp_path / "learner")!r})
print(type(model).__name__, type(generator.model).__name__, model.fingerprint() == {model.fingerprint()!r})
"""
    assert python(script) == "ReGradForCausalLM ReGradForCausalLM True"
