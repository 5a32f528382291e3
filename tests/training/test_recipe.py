import json

import numpy as np
import pytest
import torch

from regrad_hf import ReGradConfig, ReGradForCausalLM
from regrad_hf.cli import main
from regrad_hf.cli.train_options import RecipeArguments
from regrad_hf.data import Task, load_jsonl
from regrad_hf.data.task_sets import (
    SPLITS,
    TOFU_FACTS_PER_DOCUMENT,
    hotpotqa_tasks,
    mixed_tasks,
    squad_tasks,
    task_pool,
    tofu_tasks,
    with_hard_distractors,
)
from regrad_hf.errors import ReGradValueError

from ..conftest import make_tiny_base

TOPICS = ["harbour", "mineral", "bicycle", "board game", "violin", "glacier", "comet", "orchard"]


def topic_tasks() -> list[Task]:
    """Two documents per topic, so that the nearest non-gold document is usually the topic's other one."""
    tasks = []
    for topic in TOPICS:
        for number in (1, 2):
            document = f"The {topic} number {number} of Zorbia was described by Ingrid in year {1900 + number}."
            tasks.append(Task((document,), f"When was the {topic} number {number} of Zorbia described?", "1900"))
    return tasks


def test_hard_distractors_are_the_nearest_non_gold_documents(embedder):
    tasks = topic_tasks()
    padded = with_hard_distractors(tasks, 3, embedder)
    pool = task_pool(tasks)
    documents = embedder.encode(pool, normalize_embeddings=True)
    for task, result in zip(tasks, padded, strict=True):
        assert result.documents[0] == task.documents[0] and len(result.documents) == 3
        assert task.documents[0] not in result.documents[1:]  # never a gold document
        scores = documents @ embedder.encode([task.question], normalize_embeddings=True)[0]
        ranked = [pool[i] for i in np.argsort(-scores) if pool[i] != task.documents[0]]
        assert list(result.documents[1:]) == ranked[:2]
    # the topic's other document shares the most words with the question: it is the first distractor
    assert sum(TOPICS[i // 2] in r.documents[1] for i, r in enumerate(padded)) >= len(TOPICS)


def test_hard_distractors_never_include_any_gold_document_of_the_task(embedder):
    shared = "The comet Velomar returns every 76 years and was first seen from Tromsø."
    tasks = [
        Task((shared, "Velomar's tail is green."), "How often does the comet Velomar return?", "76 years"),
        Task((shared,), "Where was the comet Velomar first seen?", "Tromsø"),
        Task(("Quillon is a board game with wooden swans.",), "What is Quillon?", "a board game"),
        Task(("The Velomar bicycle weighs 19 kilograms.",), "How much does the Velomar weigh?", "19 kilograms"),
    ]
    pool = [*task_pool(tasks), shared, "Velomar's tail is green."]  # duplicates of gold documents in the pool
    for task, result in zip(tasks, with_hard_distractors(tasks, 3, embedder, pool), strict=True):
        assert result.documents[: len(task.documents)] == task.documents
        assert not set(result.documents[len(task.documents) :]) & set(task.documents)
        assert len(set(result.documents)) == 3
    with pytest.raises(ReGradValueError, match="cannot pad"):
        with_hard_distractors(tasks[:2], 4, embedder)


@pytest.fixture
def sources(tmp_path):
    """Small files in the three formats, with as many articles / authors / records as the real splits need."""
    squad = {
        "data": [
            {
                "title": f"article {a}",
                "paragraphs": [
                    {
                        "context": f"Article {a} paragraph {p}: the founder of town {a}-{p} was Ada {a}{p}.",
                        "qas": [
                            {
                                "id": f"{a}-{p}",
                                "question": f"Who founded town {a}-{p}?",
                                "answers": [{"text": f"Ada {a}{p}"}],
                            }
                        ],
                    }
                    for p in range(2)
                ],
            }
            for a in range(40)
        ]
    }
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    rows = [
        {"author_idx": a, "question": f"What is fact {f} of author {a}?", "answer": f"Author {a} has fact {f}."}
        for a in range(180)
        for f in range(3)
    ]
    (tmp_path / "tofu.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    records = []
    for r in range(500):
        # records 350 and 430 reuse a paragraph title of a training record: they must leave dev / test
        titles = [f"Gold {r}a", f"Gold {r}b", f"Other {r}", "Gold 3a" if r in (350, 430) else f"Extra {r}"]
        records.append(
            {
                "_id": str(r),
                "question": f"Which two things does record {r} join?",
                "answer": f"thing {r}",
                "supporting_facts": [[titles[0], 0], [titles[1], 0]],
                "context": [[title, [f"{title} is thing {r}."]] for title in titles],
            }
        )
    (tmp_path / "hotpot.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return tmp_path


def test_splits_share_no_document(sources):
    pools = {}
    for split in SPLITS:
        tasks = [
            *squad_tasks(sources / "squad.json", split),
            *tofu_tasks(sources / "tofu.jsonl", split),
            *hotpotqa_tasks(sources / "hotpot.jsonl", split),
        ]
        pools[split] = {d for task in tasks for d in task.documents}
    assert not pools["train"] & pools["dev"] and not pools["train"] & pools["test"] and not pools["dev"] & pools["test"]
    assert len(squad_tasks(sources / "squad.json", "dev")) == 5 * 2  # articles 30-34
    assert {t.id.split("-")[1] for t in tofu_tasks(sources / "tofu.jsonl", "test")} == {str(a) for a in range(150, 180)}
    dev = {t.id for t in hotpotqa_tasks(sources / "hotpot.jsonl", "dev")}
    assert "350" not in dev and "351" in dev and len(dev) == 74


def test_eval_sets_of_a_split_are_the_meta_training_split(sources):
    from regrad_hf.evaluation import load_eval_set

    hotpot = load_eval_set("hotpotqa", sources / "hotpot.jsonl", split="test")
    assert {q.task.id for q in hotpot.questions} == {t.id for t in hotpotqa_tasks(sources / "hotpot.jsonl", "test")}
    assert "430" not in {q.task.id for q in hotpot.questions} and len(hotpot.questions) == 74
    assert all(len(q.candidate_ids) == 4 and set(q.gold_ids) < set(q.candidate_ids) for q in hotpot.questions)
    by_index = load_eval_set("hotpotqa", sources / "hotpot.jsonl", split="3,7")
    assert [q.task.id for q in by_index.questions] == ["3", "7"]
    tofu = load_eval_set("tofu", sources / "tofu.jsonl", split="test")
    assert sorted(tofu.documents.values()) == sorted(task_pool(tofu_tasks(sources / "tofu.jsonl", "test")))
    assert {q.task.id.split("-")[1] for q in tofu.questions} == {str(a) for a in range(150, 180)}
    few = sources / "few.jsonl"
    few.write_text("".join(line + "\n" for line in (sources / "hotpot.jsonl").read_text().splitlines()[:10]))
    with pytest.raises(ReGradValueError, match="needs records up to 499"):
        load_eval_set("hotpotqa", few, split="test")
    with pytest.raises(ReGradValueError, match="record indices"):
        load_eval_set("hotpotqa", sources / "hotpot.jsonl", split="499-500")


def test_tofu_documents_are_whole_facts_and_hold_the_answer(sources):
    tasks = tofu_tasks(sources / "tofu.jsonl", "train", facts_per_document=2)
    assert len(tasks) == 120 * 3
    for task in tasks:
        assert task.answer in task.documents[0]
        facts = task.documents[0].split(". ")
        assert 1 <= len(facts) <= 2 and all(f.startswith("Author") for f in facts)
    assert len(task_pool(tasks)) == 120 * 2  # 3 facts in documents of 2 and 1
    mixed = mixed_tasks("train", tofu=sources / "tofu.jsonl", tofu_facts_per_document=2)
    assert len(task_pool(mixed)) == 120 * 2  # the mixed set passes the document size on
    assert RecipeArguments().tofu_facts_per_document == TOFU_FACTS_PER_DOCUMENT  # regrad train's default is the same


def test_mixed_tasks_pad_each_source_from_its_own_split(sources, embedder):
    files = {"squad": sources / "squad.json", "tofu": sources / "tofu.jsonl", "hotpotqa": sources / "hotpot.jsonl"}
    dev = mixed_tasks("dev", **files, documents_per_task=3, embedder=embedder, max_tasks_per_source=6)
    assert len(dev) == 18 and all(len(task.documents) == 3 for task in dev)
    train_pool = {d for split_task in mixed_tasks("train", **files) for d in split_task.documents}
    assert not {d for task in dev for d in task.documents} & train_pool
    with pytest.raises(ReGradValueError, match="embedder"):
        mixed_tasks("dev", **files, documents_per_task=3)


def test_train_command_on_the_mixed_set_resumes_the_last_checkpoint(sources, tokenizer, tmp_path):
    make_tiny_base(tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    output = tmp_path / "out"
    argv = [
        "train", "--base_model", str(tmp_path / "base"), "--task_set", "mixed", "--lora_rank", "2",
        "--squad_file", str(sources / "squad.json"), "--tofu_file", str(sources / "tofu.jsonl"),
        "--documents_per_task", "3", "--eval_tasks_per_source", "2",
        "--output_dir", str(output), "--per_device_train_batch_size", "2", "--save_steps", "1", "--logging_steps", "1",
        "--eval_generate", "false", "--eval_cases", "no_adaptation,regrad", "--report_to", "none", "--use_cpu", "true",
        "--compact_checkpoint_dir", str(tmp_path / "compact"),
    ]  # fmt: skip
    assert main([*argv, "--max_steps", "2"]) == 0
    train = load_jsonl(output / "tasks_train.jsonl")
    assert len(train) == 60 + 120 * 3 and all(len(task.documents) == 3 for task in train)
    first = json.loads((output / "training_record.json").read_text())
    assert main([*argv, "--max_steps", "3", "--resume", "last"]) == 0
    record = json.loads((output / "training_record.json").read_text())
    assert record["resumed_from"].endswith("checkpoint-2") and record["metrics_before"] == {}
    steps = [entry["step"] for entry in record["log_history"] if "loss" in entry]
    assert steps == [1, 2, 3]  # the resumed run continues the first one's log
    assert record["log_history"][:2] == first["log_history"][:2]
    assert [e["wall_seconds"] for e in record["log_history"] if "loss" in e] == sorted(
        e["wall_seconds"] for e in record["log_history"] if "loss" in e
    )
    assert json.loads((tmp_path / "compact" / "trainer_state.json").read_text())["global_step"] == 3


@pytest.mark.parametrize("init", ["folder", "shipped"])
def test_train_command_starts_from_init_learner_under_the_given_config(tokenizer, tmp_path, monkeypatch, init):
    make_tiny_base(tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    start = ReGradForCausalLM.from_base(str(tmp_path / "base"), ReGradConfig(lora_rank=2))
    with torch.no_grad():
        for parameter in start.lora_parameters().values():
            parameter.uniform_(-0.1, 0.1)
    start.save_pretrained(tmp_path / "init")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps(t.to_dict()) for t in topic_tasks()[:4]))
    argv = [
        "train", "--base_model", str(tmp_path / "base"), "--train_format", "jsonl", "--train_file", str(tasks),
        "--init_learner", str(tmp_path / "init") if init == "folder" else "shipped",
        "--lora_rank", "2", "--gamma", "0.5",
        "--system_prompt", "none", "--user_template", "{context}Q: {question}\\nA:", "--answer_repetition_penalty",
        "1.2", "--output_dir",
        str(tmp_path / "out"), "--max_steps", "1", "--learning_rate", "0", "--step_size_learning_rate", "0",
        "--per_device_train_batch_size", "2", "--report_to", "none", "--use_cpu", "true", "--warmup_steps", "0",
    ]  # fmt: skip
    # "shipped" names the package's learner (of the embedded SmolLM2): here a tiny one stands in for it.
    monkeypatch.setattr("regrad_hf.defaults.shipped_learner_path", lambda: tmp_path / "init")
    assert main(argv) == 0
    trained = ReGradForCausalLM.from_pretrained(tmp_path / "out")
    assert trained.config.gamma == 0.5  # the config given here, not the init learner's
    # The prompt template given on the command line is the one saved (`\\n` typed in a shell is a newline).
    assert trained.config.system_prompt is None
    assert trained.config.user_template == "{context}Q: {question}\nA:"
    assert trained.config.answer_repetition_penalty == 1.2
    assert trained.config.answer_stop == ReGradConfig().answer_stop  # not given: the default
    for name, tensor in start.learner_state_dict().items():
        assert torch.equal(trained.learner_state_dict()[name], tensor)  # lr 0: still the init learner's tensors


def test_train_command_refuses_prompt_options_for_a_resumed_learner(tokenizer, tmp_path, capsys):
    make_tiny_base(tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    ReGradForCausalLM.from_base(str(tmp_path / "base"), ReGradConfig(lora_rank=2)).save_pretrained(tmp_path / "old")
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps(t.to_dict()) for t in topic_tasks()[:2]))
    argv = [
        "train", "--train_format", "jsonl", "--train_file", str(tasks), "--resume_learner", str(tmp_path / "old"),
        "--answer_repetition_penalty", "1.2", "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
        "--report_to", "none", "--use_cpu", "true",
    ]  # fmt: skip
    assert main(argv) == 2  # one line on stderr, as every regrad mistake
    error = capsys.readouterr().err
    assert "--resume_learner keeps the learner's own prompt template" in error
    assert "--answer_repetition_penalty" in error
    assert not (tmp_path / "out" / "config.json").exists()  # nothing trained or saved
