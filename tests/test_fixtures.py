"""The real-data slices in tests/fixtures are what `make_fixtures.py` cuts from the shared files (where present)."""

import json
from pathlib import Path

import pytest

from .fixtures import make_fixtures

FIXTURES = Path(__file__).parent / "fixtures"
needs_shared = pytest.mark.skipif(
    not make_fixtures.SHARED.is_dir(), reason="the project's ../shared/data is absent (a clone has none)"
)


@needs_shared
def test_the_squad_slice_is_cut_from_the_shared_file():
    source = json.loads((make_fixtures.SHARED / "squad_dev_articles_00-39.json").read_text(encoding="utf-8"))
    fixture = json.loads((FIXTURES / "squad_40_articles.json").read_text(encoding="utf-8"))
    assert fixture == make_fixtures.squad_slice(source)
    assert len(fixture["data"]) == len(source["data"]) == 40  # article indices (the splits) are kept


@needs_shared
@pytest.mark.parametrize(
    ("fixture", "source"),
    [
        ("hotpotqa_6.jsonl", "hotpotqa_dev_distractor_500.jsonl"),
        ("tofu_3_authors.jsonl", "tofu_qa_authors_000-179.jsonl"),
    ],
)
def test_the_jsonl_slices_are_lines_of_the_shared_files(fixture, source):
    lines = set((make_fixtures.SHARED / source).read_text(encoding="utf-8").splitlines())
    kept = (FIXTURES / fixture).read_text(encoding="utf-8").splitlines()
    assert kept and set(kept) <= lines
