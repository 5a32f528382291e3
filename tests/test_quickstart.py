"""The README's quick start is examples/quickstart.py (run in tests/test_integration.py), and a bank smaller than
`top_k_docs` is served with all of its documents (the quick start builds a 2-document bank; the default depth is 3)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from regrad_hf import GradientBank, ReGradValueError

from .conftest import DOCUMENTS, IDS, make_tiny_model, parameter_bytes

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start_code() -> str:
    """The first python block after the README's "Quick start" heading."""
    text = README.read_text(encoding="utf-8")
    heading = re.search(r"^#+ .*quick start.*$", text, re.IGNORECASE | re.MULTILINE)
    assert heading, "README.md has no Quick start section"
    block = re.search(r"^```python\n(.*?)^```", text[heading.end() :], re.DOTALL | re.MULTILINE)
    assert block, "the Quick start section has no python block"
    return block.group(1)


def test_a_bank_smaller_than_top_k_docs_serves_all_its_documents(tokenizer, embedder):
    model = make_tiny_model(tokenizer, top_k_docs=3)
    bank = GradientBank.build(model, DOCUMENTS[:2], ids=IDS[:2], embedder_model=embedder, show_progress=False)
    model.attach_bank(bank)
    with model.retrieved("Where is Quentville?") as hits:
        assert sorted(hit.id for hit in hits) == sorted(IDS[:2])
    inputs = tokenizer("Where is Quentville?", return_tensors="pt")
    before = parameter_bytes(model)
    output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    # What generate served is the step of both documents: the same tokens as inside `injected` of both.
    with model.injected(IDS[:2]):
        expected = model.language_model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert torch.equal(output, expected) and parameter_bytes(model) == before
    with pytest.raises(ReGradValueError, match="top_k=3 is larger than the bank"):  # an explicit k is not clamped
        model.generate(**inputs, max_new_tokens=2, top_k_docs=3)


def test_the_quickstart_script_is_the_readme_code():
    script = (README.parent / "examples" / "quickstart.py").read_text(encoding="utf-8")
    docstring = ast.get_docstring(ast.parse(script), clean=False)
    assert docstring is not None  # the script opens with what it shows
    code = script.split('"""', 2)[2].lstrip("\n")
    assert code == quick_start_code()
