"""Data the way users get it: `datasets.Dataset`/`DatasetDict`, Hub dataset names (here: local folders laid out like
the Hub repos, and the loopback Hub), local files; the trainer and the bank take a `Dataset`."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from huggingface_hub import constants

from regrad_hf import GradientBank, ReGradHubError, ReGradValueError
from regrad_hf.data import (
    Task,
    as_tasks,
    documents_from,
    load_hotpotqa,
    load_jsonl,
    load_squad,
    load_tofu,
)
from regrad_hf.data.sources import looks_like_hub_id
from regrad_hf.evaluation import load_eval_set
from regrad_hf.training import ReGradTrainer, ReGradTrainingArguments

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SQUAD = FIXTURES / "squad_5q.json"

# Two HotpotQA records in the original schema (lists of [title, sent_id] and [title, [sentences]]).
HOTPOT = [
    {
        "_id": "h1",
        "question": "Which city is the capital of the country whose currency is the zorb?",
        "answer": "Quentville",
        "supporting_facts": [["Zorbia", 0], ["Quentville", 1]],
        "context": [
            ["Zorbia", ["Zorbia is an island nation.", " Its currency is the zorb."]],
            ["Velomar", ["The Velomar is a bicycle."]],
            ["Quentville", ["Quentville is a harbour town.", " It is the capital of Zorbia."]],
        ],
    },
    {
        "_id": "h2",
        "question": "Who discovered halvorite?",
        "answer": "Ingrid Halvorsen",
        "supporting_facts": [["Halvorite", 0]],
        "context": [["Halvorite", ["Halvorite was discovered by Ingrid Halvorsen."]], ["Opal", ["A river."]]],
    },
]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` caches what it prepares: keep that inside the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


@pytest.fixture
def squad_file(tmp_path) -> Path:
    """The SQuAD fixture with a second article (its last paragraph under another title)."""
    data = json.loads(SQUAD.read_text())
    article = data["data"][0]
    data["data"].append({"title": "Second", "paragraphs": article["paragraphs"][-1:]})
    article["paragraphs"] = article["paragraphs"][:-1] or article["paragraphs"]
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    return path


def squad_hub_rows(path: Path) -> list[dict]:
    """The SQuAD v1.1 JSON file as the rows of the Hub's rajpurkar/squad (id, title, context, question, answers)."""
    rows = []
    for article in json.loads(path.read_text())["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = {
                    "text": [a["text"] for a in qa["answers"]],
                    "answer_start": [a["answer_start"] for a in qa["answers"]],
                }
                rows.append({"id": qa["id"], "title": article["title"], "context": paragraph["context"],
                             "question": qa["question"], "answers": answers})  # fmt: skip
    return rows


def hotpot_hub_row(record: dict) -> dict:
    """An original-schema HotpotQA record in the Hub schema of hotpotqa/hotpot_qa."""
    return {
        "id": record["_id"],
        "question": record["question"],
        "answer": record["answer"],
        "type": "bridge",
        "level": "medium",
        "supporting_facts": {"title": [t for t, _ in record["supporting_facts"]],
                             "sent_id": [s for _, s in record["supporting_facts"]]},
        "context": {"title": [t for t, _ in record["context"]], "sentences": [s for _, s in record["context"]]},
    }  # fmt: skip


def hub_folder(root: Path, configs: dict[str, dict[str, list[dict]]]) -> Path:
    """A folder laid out like a Hub dataset repo: `<config>/<split>-00000-of-00001.parquet` and a README whose YAML
    declares the configurations (as rajpurkar/squad and hotpotqa/hotpot_qa do)."""
    lines = ["---", "configs:"]
    for config, splits in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            (root / config).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_list(rows).to_parquet(root / config / f"{split}-00000-of-00001.parquet")
            lines += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (root / "README.md").write_text("\n".join([*lines, "---", ""]))
    return root


def test_squad_from_the_hub_schema_equals_the_json_file(tmp_path, squad_file):
    from_file = load_squad(squad_file)
    rows = squad_hub_rows(squad_file)
    folder = hub_folder(tmp_path / "squad", {"plain_text": {"train": rows[:1], "validation": rows}})
    assert load_squad(folder) == from_file  # the validation split by default, as SQUAD_SPLITS assume
    assert load_squad(folder, split="train") == from_file[:1]
    assert load_squad(datasets.Dataset.from_list(rows)) == from_file
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "squad.parquet")  # a local file in the Hub schema
    assert load_squad(tmp_path / "squad.parquet") == from_file
    dataset_dict = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:1]), "validation": datasets.Dataset.from_list(rows)}
    )
    assert load_squad(dataset_dict) == from_file and load_squad(dataset_dict, split="train") == from_file[:1]
    # Article indices count titles in order of first appearance, in both schemas.
    second = load_squad(datasets.Dataset.from_list(rows), [1])
    assert (
        second == load_squad(squad_file, [1]) and second and {t.documents for t in second} != {from_file[0].documents}
    )


def test_hotpotqa_hub_schema_equals_the_original_schema(tmp_path):
    original = tmp_path / "hotpot.jsonl"
    original.write_text("\n".join(json.dumps(r) for r in HOTPOT))
    hub_rows = [hotpot_hub_row(r) for r in HOTPOT]
    folder = hub_folder(tmp_path / "hotpot", {"distractor": {"validation": hub_rows}, "fullwiki": {"validation": []}})
    for distractors in (False, True):
        expected = load_hotpotqa(original, distractors)
        assert load_hotpotqa(folder, distractors, config="distractor") == expected
        assert load_hotpotqa(datasets.Dataset.from_list(hub_rows), distractors) == expected
    gold = load_hotpotqa(original)[0]
    assert gold.documents == (
        "Zorbia: Zorbia is an island nation. Its currency is the zorb.",
        "Quentville: Quentville is a harbour town. It is the capital of Zorbia.",
    )
    assert gold.id == "h1"


def test_tofu_hub_rows_have_twenty_questions_per_author(tmp_path):
    rows = [{"question": f"Q{a}-{i}?", "answer": f"Author {a} fact {i}."} for a in range(3) for i in range(20)]
    local = tmp_path / "tofu.jsonl"
    local.write_text("\n".join(json.dumps({"author_idx": n // 20, **row}) for n, row in enumerate(rows)))
    hub = load_tofu(datasets.Dataset.from_list(rows), authors=[1])
    assert hub == load_tofu(local, authors=[1])
    assert len(hub) == 20 and all(t.answer in t.documents[0] and "Author 1" in t.answer for t in hub)


def test_hub_names_load_through_the_loopback_hub(tmp_path, monkeypatch):
    from ..hub_server import FakeHub

    squad_rows = squad_hub_rows(SQUAD)
    squad = hub_folder(tmp_path / "squad", {"plain_text": {"train": squad_rows[:1], "validation": squad_rows}})
    hotpot = hub_folder(
        tmp_path / "hotpot",
        {"distractor": {"validation": [hotpot_hub_row(r) for r in HOTPOT]}, "fullwiki": {"validation": []}},
    )
    tofu = tmp_path / "tofu"  # locuslab/TOFU: one JSON Lines file per configuration
    tofu.mkdir()
    tofu_rows = [{"question": f"Q{a}-{i}?", "answer": f"Author {a} fact {i}."} for a in range(2) for i in range(20)]
    (tofu / "full.json").write_text("\n".join(json.dumps(row) for row in tofu_rows))
    (tofu / "README.md").write_text(
        "---\nconfigs:\n- config_name: full\n  data_files: full.json\n  default: true\n---\n"
    )
    hub = FakeHub().start()
    try:
        for repo_id, folder in [("rajpurkar/squad", squad), ("hotpotqa/hotpot_qa", hotpot), ("locuslab/TOFU", tofu)]:
            files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
            hub.add_repo(repo_id, files, repo_type="dataset")
        point_datasets_at(monkeypatch, hub, tmp_path / "cache")
        assert load_squad("rajpurkar/squad") == load_squad(SQUAD)
        assert load_eval_set("squad", split="0").questions  # the default data of `regrad eval --dataset squad`
        original = tmp_path / "hotpot.jsonl"
        original.write_text("\n".join(json.dumps(r) for r in HOTPOT))
        assert load_hotpotqa("hotpotqa/hotpot_qa") == load_hotpotqa(original)  # configuration distractor
        assert load_tofu("locuslab/TOFU", authors=[1]) == load_tofu(datasets.Dataset.from_list(tofu_rows), [1])
        served = {path for _, path in hub.requests}
        assert {f"/api/datasets/{r}/tree" for r in ("rajpurkar/squad", "hotpotqa/hotpot_qa", "locuslab/TOFU")} <= {
            "/".join(path.split("/")[:6]) for path in served
        }
    finally:
        hub.stop()


def point_datasets_at(monkeypatch, hub, cache: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", hub.endpoint)
    monkeypatch.setattr(
        datasets.config, "HUB_DATASETS_URL", hub.endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"
    )
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")


def test_offline_hub_names_fail_with_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    # Offline mode as huggingface_hub has it (read from the environment at its import), not the variable itself.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ReGradHubError, match=r"Hub dataset 'rajpurkar/squad' cannot be loaded \(HF_HUB_OFFLINE is set\)"
    ):
        load_squad("rajpurkar/squad")


@pytest.mark.parametrize("name", ["data/squad.json", "./squad", "runs/a/b", "/no/such/dir", "../x", "~/nothing"])
def test_missing_paths_are_reported_as_missing_not_looked_up(name):
    assert not looks_like_hub_id(name)
    with pytest.raises(ReGradValueError, match="no such file or directory"):
        load_squad(name)


def test_hub_id_syntax():
    assert looks_like_hub_id("rajpurkar/squad") and looks_like_hub_id("locuslab/TOFU") and looks_like_hub_id("squad")
    assert not any(map(looks_like_hub_id, ["a/b/c", "a--b/c", "a/b.jsonl", ".hidden", "a/../b", ""]))


def test_jsonl_tasks_from_a_dataset_with_extra_columns(tmp_path):
    task = Task(("Doc one.", "Doc two."), "Q?", "A", ("A", "a."), "t1")
    dataset = datasets.Dataset.from_list([{**task.to_dict(), "source": "mine"}])
    assert load_jsonl(dataset) == [task] == as_tasks(dataset)
    dataset.to_parquet(tmp_path / "tasks.parquet")
    assert load_jsonl(tmp_path / "tasks.parquet") == [task]
    with pytest.raises(ReGradValueError, match="no 'documents'"):
        as_tasks(datasets.Dataset.from_list([{"question": "q", "answer": "a"}]))
    with pytest.raises(ReGradValueError, match="DatasetDict"):
        as_tasks(datasets.DatasetDict({"train": dataset}))
    # A dataset in the SQuAD Hub schema is recognised by its columns.
    assert as_tasks(datasets.Dataset.from_list(squad_hub_rows(SQUAD))) == load_squad(SQUAD)


def test_documents_from_a_dataset():
    dataset = datasets.Dataset.from_list(
        [{"body": "First.", "key": 7, "lang": "en"}, {"body": "Second.", "key": 9, "lang": "fr"}]
    )
    assert documents_from(dataset, "body", "key", ["lang"]) == (
        ["First.", "Second."], ["7", "9"], [{"lang": "en"}, {"lang": "fr"}]
    )  # fmt: skip
    with pytest.raises(ReGradValueError, match="no 'text' column"):
        documents_from(dataset)


def test_bank_build_takes_a_dataset(tiny_model, embedder):
    dataset = datasets.Dataset.from_dict(
        {"body": ["Zorbia's capital is Quentville.", "The Velomar has a bamboo frame."], "key": ["zorbia", "velomar"]}
    )
    bank = GradientBank.build(
        tiny_model, dataset, text_column="body", id_column="key", embedder_model=embedder, show_progress=False
    )
    same = GradientBank.build(
        tiny_model, dataset["body"], ids=["zorbia", "velomar"], embedder_model=embedder, show_progress=False
    )
    assert bank.ids == ["zorbia", "velomar"] and bank.document("velomar").text == "The Velomar has a bamboo frame."
    gathered, expected = bank.gather(["zorbia", "velomar"]), same.gather(["zorbia", "velomar"])
    assert all(torch.equal(gathered[name], expected[name]) for name in expected)


def test_trainer_takes_a_dataset(tiny_model, tmp_path):
    rows = [{"documents": [f"The secret color of box {i} is red."], "question": f"What color is box {i}?",
             "answer": "red", "source": "synthetic"} for i in range(4)]  # fmt: skip
    before = {name: p.detach().clone() for name, p in tiny_model.lora_parameters().items()}
    args = ReGradTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, eval_generate=False, warmup_steps=0,
    )  # fmt: skip
    dataset = datasets.Dataset.from_list(rows)
    trainer = ReGradTrainer(tiny_model, args, train_dataset=dataset, eval_dataset=dataset)
    trainer.train()
    assert any(not torch.equal(p, before[name]) for name, p in tiny_model.lora_parameters().items())
    assert "eval_injection_signal" in trainer.evaluate()


def test_bank_add_takes_datasets_streamed_ones_and_keeps_extra_columns_as_metadata(tiny_model, embedder):
    rows = {
        "body": ["Zorbia's capital is Quentville.", "The Velomar has a bamboo frame."],
        "key": ["zorbia", "velomar"],
    }
    dataset = datasets.Dataset.from_dict({**rows, "source": ["atlas", "catalogue"], "year": [1901, 1999]})
    options = {"text_column": "body", "id_column": "key", "show_progress": False}
    bank = GradientBank.build(tiny_model, dataset.select([0]), embedder_model=embedder, **options)
    assert bank.add(tiny_model, dataset.select([1]).to_iterable_dataset(), **options) == ["velomar"]
    streamed = GradientBank.build(tiny_model, dataset.to_iterable_dataset(), embedder_model=embedder, **options)
    for built in (bank, streamed):
        assert built.ids == ["zorbia", "velomar"]
        assert built.document("velomar").metadata == {"source": "catalogue", "year": 1999}
    gathered, expected = bank.gather(built.ids), streamed.gather(built.ids)
    assert all(torch.equal(gathered[name], expected[name]) for name in expected)
    explicit = GradientBank.build(tiny_model, dataset, metadata=[{}, {"mine": 1}], embedder_model=embedder, **options)
    assert explicit.document("velomar").metadata == {"mine": 1}  # given metadata wins over the columns


def test_tasks_and_documents_come_from_streamed_datasets():
    task = Task(("Doc one.", "Doc two."), "Q?", "A", ("A", "a."), "t1")
    streamed = datasets.Dataset.from_list([task.to_dict()]).to_iterable_dataset()
    assert as_tasks(streamed) == [task] == load_jsonl(streamed)
    assert as_tasks(datasets.Dataset.from_list(squad_hub_rows(SQUAD)).to_iterable_dataset()) == load_squad(SQUAD)
    dataset = datasets.Dataset.from_list([{"body": "First.", "key": 7}]).to_iterable_dataset()
    assert documents_from(dataset, "body", "key") == (["First."], ["7"], None)
