"""Synthetic-fact tasks: seeded, answerable from the gold document, same-type hard distractors, no test-set entity."""

import collections
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from regrad_hf.data import SQUAD_SPLITS, Task, hotpotqa_paragraphs, hotpotqa_rows, synthetic_vocabulary
from regrad_hf.data.synthetic import ENTITY_TYPES, generate_entities, hard_distractors, synthetic_tasks
from regrad_hf.data.task_sets import TOFU_SPLITS, hotpotqa_split_records
from regrad_hf.errors import ReGradError, ReGradTypeError, ReGradValueError

from ..fixtures import make_fixtures

FIXTURES = Path(__file__).parents[1] / "fixtures"
needs_shared = pytest.mark.skipif(
    not make_fixtures.SHARED.is_dir(), reason="the project's ../shared/data is absent (a clone has none)"
)


def mentions(text: str, name: str, case_sensitive: bool = False) -> bool:
    """`name` occurs in `text` as whole words (punctuation between words ignored); written apart from the module's."""
    if not case_sensitive:
        text, name = text.casefold(), name.casefold()
    words = re.findall(r"[^\W_]+", name)
    return bool(re.search(r"(?<![^\W_])" + r"[\W_]+".join(map(re.escape, words)) + r"(?![^\W_])", text))


class Finder:
    """Which of many names occur in a text as whole words: word n-grams against a set (a regex per name is slow)."""

    def __init__(self, names, case_sensitive: bool = False):
        self.fold = (lambda text: text) if case_sensitive else str.casefold
        self.names = {tuple(re.findall(r"[^\W_]+", self.fold(name))): name for name in names}
        self.sizes = {len(words) for words in self.names}

    def __call__(self, text: str) -> list[str]:
        words = re.findall(r"[^\W_]+", self.fold(text))
        grams = {tuple(words[i : i + n]) for n in self.sizes for i in range(len(words) - n + 1)}
        return [self.names[gram] for gram in grams & self.names.keys()]


def texts_of(entity) -> list[str]:
    return [entity.document, *(q.question for q in entity.questions), *(q.answer for q in entity.questions)]


def tofu_author_names(lines: list[str], authors: range) -> list[str]:
    """Each author's full name: the most frequent run of two or more capitalised words in their questions/answers."""
    runs: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in filter(str.strip, lines):
        row = json.loads(line)
        if row["author_idx"] in authors:
            for run in re.findall(r"[A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)+", f"{row['question']} {row['answer']}"):
                runs[row["author_idx"]][re.sub(r"['’]s$", "", run)] += 1
    return [counter.most_common(1)[0][0] for counter in runs.values()]


def squad_test_titles(path: Path) -> list[str]:
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    return [data[index]["title"].replace("_", " ") for index in SQUAD_SPLITS["test"]]


def found(entities, names: list[str], case_sensitive: bool = False) -> list[tuple[str, str]]:
    """(name, text) of every name in a document, question or answer. Case-insensitive is what `exclude` promises;
    without it, proper names are looked for as written (the common words "banks of the river" hold "Banks")."""
    finder = Finder(names, case_sensitive)
    return [(name, text) for entity in entities for text in texts_of(entity) for name in finder(text)]


# --- determinism ---


def test_the_same_seed_gives_the_same_tasks_and_another_seed_others():
    first, again = synthetic_tasks(40, seed=7), synthetic_tasks(40, seed=7)
    assert first == again and all(isinstance(task, Task) for task in first)
    other = synthetic_tasks(40, seed=8)
    assert first != other
    assert not {task.documents[0] for task in first} & {task.documents[0] for task in other}
    assert {e.name for e in generate_entities(40, 7)}.isdisjoint(e.name for e in generate_entities(40, 8))


def test_the_output_does_not_depend_on_the_hash_seed_or_the_global_generator():
    import random

    random.seed(1)
    here = [task.to_dict() for task in synthetic_tasks(12, seed=3)]
    random.seed(2)
    assert [task.to_dict() for task in synthetic_tasks(12, seed=3)] == here
    code = "import json; from regrad_hf.data.synthetic import synthetic_tasks as s; "
    code += "print(json.dumps([t.to_dict() for t in s(12, seed=3)]))"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    src = str(Path(__file__).parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    output = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(output.stdout.strip().splitlines()[-1]) == here


# --- documents, questions, answers ---


def test_documents_are_40_to_150_tokens_of_the_smollm2_tokenizer(tokenizer):
    entities = generate_entities(200, seed=0)
    lengths = {kind: [] for kind in ENTITY_TYPES}
    for entity in entities:
        lengths[entity.kind].append(len(tokenizer(entity.document, add_special_tokens=False)["input_ids"]))
    for kind, counts in lengths.items():
        assert len(counts) == 50 and min(counts) >= 40 and max(counts) <= 150, (kind, min(counts), max(counts))


def test_tasks_have_ids_one_short_answer_verbatim_in_the_gold_document_and_never_in_the_question():
    entities = generate_entities(60, seed=5)
    tasks = synthetic_tasks(60, seed=5)
    facts = sum(len(entity.facts) for entity in entities)
    assert len(tasks) == 2 * facts and len({task.id for task in tasks}) == len(tasks)
    for task in tasks:
        prefix, seed, index, attribute, template = task.id.split("-")
        entity = entities[int(index)]
        assert (prefix, seed) == ("synthetic", "5") and attribute in entity.facts and template in "012"
        assert task.documents[0] == entity.document and task.answer == entity.facts[attribute]
        assert task.answers == (task.answer,) and len(task.answer.split()) <= 4
        assert task.answer in task.documents[0] and mentions(task.documents[0], task.answer, case_sensitive=True)
        assert not mentions(task.question, task.answer) and entity.name in task.question
    by_fact = collections.Counter(task.id.rsplit("-", 1)[0] for task in tasks)
    assert set(by_fact.values()) == {2}  # questions_per_fact distinct questions per fact
    assert len(synthetic_tasks(60, seed=5, questions_per_fact=3)) == 3 * facts


def skeleton(sentence: str, entity, value: str) -> str:
    reference = entity.name.split()[-1] if entity.kind == "person" else None
    sentence = sentence.replace(value, "{value}").replace(entity.name, "{name}")
    for short in filter(None, [reference, "The company", "The town", "The product"]):
        sentence = re.sub(rf"(?<!\w){re.escape(short)}(?!\w)", "{name}", sentence)
    return sentence


def test_every_fact_is_written_four_ways_and_asked_several_ways_in_shuffled_order():
    entities = generate_entities(400, seed=11)
    statements, questions, first_facts = collections.defaultdict(set), collections.defaultdict(set), {}
    for entity in entities:
        sentences = re.split(r"(?<=\.) (?=[A-Z])", entity.document)
        assert len(sentences) == len(entity.facts) >= 4
        for attribute, value in entity.facts.items():
            (sentence,) = [s for s in sentences if mentions(s, value, case_sensitive=True)]
            statements[entity.kind, attribute].add(skeleton(sentence, entity, value))
        assert entity.name in sentences[0]  # the first sentence names the entity in full
        first = next(a for a, v in entity.facts.items() if mentions(sentences[0], v, case_sensitive=True))
        first_facts.setdefault(entity.kind, set()).add(first)
        for question in entity.questions:
            questions[entity.kind, question.attribute].add(question.question.replace(entity.name, "{name}"))
    assert len(statements) == 18 and all(len(forms) >= 4 for forms in statements.values()), statements
    assert all(len(forms) >= 2 for forms in questions.values())
    assert all(len(first) >= 3 for first in first_facts.values())  # facts come in varying order
    kinds_of_entities = collections.Counter(entity.kind for entity in entities)
    assert kinds_of_entities == {kind: 100 for kind in ENTITY_TYPES}


def test_names_are_unique_and_drawn_from_over_100k_per_type():
    for kind, words in synthetic_vocabulary.NAME_PARTS.items():
        space = 1
        for parts in words:
            space *= len({"".join(combination) for combination in itertools.product(*parts)})
        assert space > 100_000, kind
    entities = generate_entities(4000, seed=2)
    assert len({entity.name.casefold() for entity in entities}) == 4000


# --- distractors ---


def test_distractors_are_other_entities_of_the_same_type_gold_first():
    entities = generate_entities(40, seed=9)
    kind_of = {entity.document: entity.kind for entity in entities}
    for task in synthetic_tasks(40, seed=9, documents_per_task=3):
        entity = entities[int(task.id.split("-")[2])]
        gold, *distractors = task.documents
        assert gold == entity.document and len(distractors) == 2 and len(set(task.documents)) == 3
        assert all(kind_of[document] == entity.kind for document in distractors)
    assert all(len(task.documents) == 1 for task in synthetic_tasks(8, seed=9, documents_per_task=1))
    assert all(len(task.documents) == 10 for task in synthetic_tasks(40, seed=9, documents_per_task=10))


def test_hard_distractors_share_the_most_attribute_values():
    entities = generate_entities(80, seed=4)
    shared_any = 0
    for index, gold in enumerate(entities):
        picked = hard_distractors(entities, index, 3)
        same = [e for i, e in enumerate(entities) if i != index and e.kind == gold.kind]

        def shared(other, gold=gold):
            return sum(other.facts[a] == v for a, v in gold.facts.items())

        chosen = [e for e in same if e.document in picked]
        rest = [e for e in same if e.document not in picked]
        assert len(chosen) == 3 and min(map(shared, chosen)) >= max(map(shared, rest))
        shared_any += shared(chosen[0]) > 0
    assert shared_any > len(entities) // 2  # invented values are reused, so most golds have a confusable neighbour
    assert hard_distractors(entities, 0, 0) == []


# --- exclusion of test-set entities ---


def test_excluded_names_are_never_generated_case_insensitively_and_whole_words_only():
    entities = generate_entities(40, seed=3)
    names = [entity.name for entity in entities[:20]]
    again = generate_entities(40, seed=3, exclude=[name.upper() for name in names])
    assert not found(again, names)
    assert {e.name for e in again}.isdisjoint(names)
    without = generate_entities(60, seed=3, exclude=["falconry", "TEAL", "1950"])
    assert not [e for e in without if {"falconry", "teal", "1950"} & set(e.facts.values())]
    assert not found(without, ["falconry", "teal", "1950"])
    # Whole words: a prefix of a name, or a word with letters around it, blocks nothing.
    fragments = [entities[0].name[:4], "ndor", "Mill"]
    assert generate_entities(40, seed=3, exclude=fragments) == entities


def test_no_test_split_entity_of_the_fixtures_is_generated():
    tofu = tofu_author_names(
        (FIXTURES / "tofu_3_authors.jsonl").read_text(encoding="utf-8").splitlines(), range(150, 180)
    )
    assert tofu == ["Youssef Al-Zahran"]
    names = tofu + squad_test_titles(FIXTURES / "squad_40_articles.json")
    assert "Kenya" in names and "University of Chicago" in names
    for seed in (0, 1):
        assert not found(generate_entities(400, seed), names, case_sensitive=True)
        assert not found(generate_entities(400, seed, exclude=names), names)
    finder = Finder(names)
    tasks = synthetic_tasks(40, seed=0, exclude=names)
    texts = [text for task in tasks for text in (*task.documents, task.question, *task.answers)]
    assert texts and not [finder(text) for text in texts if finder(text)]


@needs_shared
def test_no_test_split_entity_of_the_shared_data_is_generated():
    shared = make_fixtures.SHARED
    tofu_lines = (shared / "tofu_qa_authors_000-179.jsonl").read_text(encoding="utf-8").splitlines()
    tofu = tofu_author_names(tofu_lines, TOFU_SPLITS["test"])
    hotpot = shared / "hotpotqa_dev_distractor_500.jsonl"
    rows = hotpotqa_rows(hotpot)
    titles = {
        re.sub(r"\s*\(.*\)$", "", title)  # "Banks (singer)" is the name "Banks"
        for index in hotpotqa_split_records(hotpot, "test")
        for title, _ in hotpotqa_paragraphs(rows[index])
    }
    names = sorted({*tofu, *squad_test_titles(shared / "squad_dev_articles_00-39.json"), *titles})
    assert len(tofu) == 30 and len(names) > 600
    assert not found(generate_entities(1000, seed=0), names, case_sensitive=True)
    assert not found(generate_entities(1000, seed=0, exclude=names), names)
    assert found(generate_entities(1000, seed=0), ["Banks"])  # what `exclude` is there for: "the banks of the river"


# --- errors ---


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: synthetic_tasks(0, seed=0), ReGradValueError),
        (lambda: synthetic_tasks(40, seed=0, documents_per_task=0), ReGradValueError),
        (lambda: synthetic_tasks(40, seed=0, documents_per_task=11), ReGradValueError),  # 10 entities of each type
        (lambda: synthetic_tasks(11, seed=0, documents_per_task=3), ReGradValueError),  # only 2 products
        (lambda: synthetic_tasks(40, seed=0, questions_per_fact=0), ReGradValueError),
        (lambda: synthetic_tasks(40, seed=0, questions_per_fact=4), ReGradValueError),
        (lambda: synthetic_tasks(40.0, seed=0), ReGradTypeError),
        (lambda: synthetic_tasks(40, seed="0"), ReGradTypeError),
        (lambda: synthetic_tasks(40, seed=0, exclude="Kenya"), ReGradTypeError),
        (lambda: synthetic_tasks(40, seed=0, exclude=["Kenya", 3]), ReGradTypeError),
        (lambda: generate_entities(-1, seed=0), ReGradValueError),
        (lambda: generate_entities(True, seed=0), ReGradTypeError),
        (lambda: generate_entities(4, seed=0, exclude=["the"]), ReGradValueError),  # every entity needs "the"
        (lambda: hard_distractors(generate_entities(8, seed=0), 8, 1), ReGradValueError),
        (lambda: hard_distractors(generate_entities(8, seed=0), 0, 2), ReGradValueError),
        (lambda: hard_distractors(generate_entities(8, seed=0), 0, -1), ReGradValueError),
    ],
)
def test_bad_arguments_raise_typed_errors(call, error):
    with pytest.raises(error) as raised:
        call()
    assert isinstance(raised.value, ReGradError)


def test_small_counts_work_with_one_document_per_task():
    tasks = synthetic_tasks(1, seed=0, documents_per_task=1, questions_per_fact=1)
    assert len(tasks) == 5 and all(task.id.startswith("synthetic-0-0-") for task in tasks)
