import gzip
import json
from pathlib import Path

import pytest
import torch

from regrad_hf import ReGradValueError
from regrad_hf.data import SQUAD_SPLITS, Task, load_hotpotqa, load_jsonl, load_squad, load_tofu, sources
from regrad_hf.data.collator import TaskCollator
from regrad_hf.evaluation import exact_match, f1_score, normalize_answer

FIXTURES = Path(__file__).parents[1] / "fixtures"
SQUAD = FIXTURES / "squad_40_articles.json"
HOTPOTQA = FIXTURES / "hotpotqa_6.jsonl"


def test_squad_splits_share_no_article():
    data = json.loads(SQUAD.read_text())["data"]
    contexts = {
        split: {p["context"] for i in articles for p in data[i]["paragraphs"]}
        for split, articles in SQUAD_SPLITS.items()
    }
    assert not contexts["train"] & contexts["dev"] and not contexts["train"] & contexts["test"]
    assert not contexts["dev"] & contexts["test"]
    dev = load_squad(SQUAD, "dev")
    assert {t.documents[0] for t in dev} <= contexts["dev"]
    assert len(dev) == sum(len(p["qas"]) for i in SQUAD_SPLITS["dev"] for p in data[i]["paragraphs"])
    first = load_squad(SQUAD, [0])[0]
    assert first.answer == "Denver Broncos" and first.answers == ("Denver Broncos",)
    assert first.answer in first.documents[0]


def test_hotpotqa_supporting_paragraphs_and_distractors():
    record = json.loads(HOTPOTQA.read_text().splitlines()[0])
    with pytest.warns(UserWarning, match="none of their supporting paragraphs"):
        gold = load_hotpotqa(HOTPOTQA)[0]
    titles = {title for title, _ in record["supporting_facts"]}
    assert [d.split(":")[0] for d in gold.documents] == [t for t, _ in record["context"] if t in titles]
    with pytest.warns(UserWarning):
        assert len(load_hotpotqa(HOTPOTQA, distractors=True)[0].documents) == 10


def test_tofu_documents_are_built_from_the_authors_answers():
    tasks = load_tofu(FIXTURES / "tofu_3_authors.jsonl", authors=[0])
    assert len(tasks) == 20 and len({t.documents for t in tasks}) == 1
    assert all(t.answer in t.documents[0] for t in tasks)


def test_jsonl_round_trip_and_errors(tmp_path):
    task = Task(("Doc one.", "Doc two."), "Q?", "A", ("A", "a."), "t1")
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(task.to_dict()) + "\n")
    assert load_jsonl(path) == [task]
    path.write_text('{"documents": ["x y"], "question": "q"}\n')
    with pytest.raises(ReGradValueError, match="line 1"):
        load_jsonl(path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"documents": (), "question": "q", "answer": "a"}, "empty"),
        ({"documents": ("",), "question": "q", "answer": "a"}, "empty"),
        ({"documents": ("doc",), "question": " ", "answer": "a"}, "empty question"),
        ({"documents": ("doc",), "question": "q", "answer": ""}, "empty answer"),
    ],
)
def test_bad_tasks_raise(kwargs, match):
    with pytest.raises(ReGradValueError, match=match):
        Task(**kwargs)


def test_collator_masks_the_prompt_and_ends_answers_with_eos(tokenizer):
    task = Task(("The secret color of box 7 is red.",), "What is the secret color of box 7?", "red")
    encoded = TaskCollator(tokenizer)([task])["tasks"][0]
    answer_positions = encoded["labels"][0] != -100
    answer_ids = encoded["input_ids"][0][answer_positions].tolist()
    assert tokenizer.decode(answer_ids) == "red" + tokenizer.eos_token
    prompt = tokenizer.decode(encoded["input_ids"][0][~answer_positions])
    assert "box 7" in prompt and "is red" not in prompt  # blind: the document is not in the prompt
    assert encoded["document_mask"].sum() == len(tokenizer(task.documents[0]).input_ids)

    icl = TaskCollator(tokenizer, blind=False)([task])["tasks"][0]
    assert "is red" in tokenizer.decode(icl["input_ids"][0][icl["labels"][0] == -100])


def test_collator_adds_distractors_and_rejects_long_answers(tokenizer):
    task = Task(("Gold document here.",), "Q?", "A")
    collator = TaskCollator(
        tokenizer, documents_per_task=3, distractor_pool=["One doc.", "Two doc.", "Gold document here."]
    )
    encoded = collator([task])["tasks"][0]
    assert encoded["document_ids"].shape[0] == 3
    rows = zip(encoded["document_ids"], encoded["document_mask"], strict=True)
    texts = {tokenizer.decode(ids[mask.bool()]) for ids, mask in rows}
    assert texts == {"Gold document here.", "One doc.", "Two doc."}
    with pytest.raises(ReGradValueError, match="max_answer_tokens=4"):
        TaskCollator(tokenizer, max_answer_tokens=4)(
            [Task(("a real document",), "q", "a very long answer indeed " * 3)]
        )


def test_padded_documents_loss_is_the_sum_of_single_losses(tiny_model, tokenizer):
    from regrad_hf.adaptation.deltas import documents_lm_loss

    documents = ("A short one.", "A much longer document about the secret colors of many boxes.")
    encoded = TaskCollator(tokenizer)([Task(documents, "q", "a")])["tasks"][0]
    together = documents_lm_loss(tiny_model.language_model, encoded["document_ids"], encoded["document_mask"])
    singles = []
    for text in documents:
        ids = tokenizer(text, return_tensors="pt").input_ids
        singles.append(tiny_model(input_ids=ids, labels=ids).loss)
    torch.testing.assert_close(together, torch.stack(singles).sum())


@pytest.mark.parametrize(
    ("prediction", "answers", "em", "f1"),
    [
        ("The Denver Broncos!", ["Denver Broncos"], 1.0, 1.0),
        ("Denver", ["Denver Broncos"], 0.0, 2 / 3),
        ("broncos of denver", ["Denver Broncos", "Carolina"], 0.0, 0.8),
        ("Carolina Panthers", ["Denver Broncos"], 0.0, 0.0),
        ("", ["Denver"], 0.0, 0.0),
        ("the", ["a"], 1.0, 0.0),  # both normalise to nothing: v1.1 script gives EM 1, F1 0
    ],
)
def test_em_and_f1_match_hand_computed_values(prediction, answers, em, f1):
    assert exact_match(prediction, answers) == em
    assert f1_score(prediction, answers) == pytest.approx(f1)


def test_normalisation():
    assert normalize_answer("  The  Eiffel-Tower, an icon. ") == "eiffeltower icon"


def test_a_gzip_compressed_squad_file_loads_as_the_plain_one(tmp_path):
    question = {"id": "q1", "question": "What colour is box 1?", "answers": [{"text": "red", "answer_start": 9}]}
    paragraph = {"context": "Box 1 is red.", "qas": [question]}
    record = {"version": "1.1", "data": [{"title": "T", "paragraphs": [paragraph]}]}
    plain = tmp_path / "squad.json"
    plain.write_text(json.dumps(record), encoding="utf-8")
    compressed = tmp_path / "squad.json.gz"
    compressed.write_bytes(gzip.compress(plain.read_bytes()))
    assert load_squad(compressed) == load_squad(plain)
    damaged = tmp_path / "damaged.json.gz"
    damaged.write_bytes(compressed.read_bytes()[:20])
    with pytest.raises(ReGradValueError, match="damaged gzip"):
        load_squad(damaged)
    sources.MAX_DECOMPRESSED_BYTES, cap = 10, sources.MAX_DECOMPRESSED_BYTES
    try:
        with pytest.raises(ReGradValueError, match="decompresses to more than"):
            load_squad(compressed)
    finally:
        sources.MAX_DECOMPRESSED_BYTES = cap
