"""Seeded synthetic-fact meta-training tasks: invented entities, one document each, paraphrased questions.

Real QA data teaches a learner facts the base model may already half-know; invented facts cannot be guessed, so the
only way to answer is to use the injected gradient. Each entity (a person, organisation, place or product with a
name built from syllables) gets one short document stating its facts in shuffled order, each fact through one of
several paraphrase templates, and every fact is asked through other templates. Hard distractors are documents of
other entities of the same type, preferring those that share attribute values or templates with the gold one.

All randomness comes from `random.Random` instances seeded by `seed` (never the global generator): the same
arguments give the same tasks. An entity whose name, document or questions contain an `exclude` name
(case-insensitive, whole words; e.g. the entities of a test split) is drawn again.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ..errors import ReGradTypeError, ReGradValueError
from .synthetic_vocabulary import (
    ATTRIBUTES,
    COLOURS,
    DISHES,
    ENTITY_TYPES,
    HOBBIES,
    MATERIALS,
    NAME_PARTS,
    PRODUCT_LINES,
    PROFESSIONS,
    REFERENCES,
)
from .task import Task

# Invented values are reused across entities with this probability, so same-type documents share values.
_REUSE = 0.3
_MAX_ATTEMPTS = 200


@dataclass(frozen=True)
class SyntheticQuestion:
    """One paraphrased question about one fact.

    Args:
        attribute (`str`): the fact asked about (e.g. `"birthplace"`).
        template (`int`): the index of the question template.
        question (`str`): the question text; it never contains the answer.
        answer (`str`): the gold answer, verbatim in the entity's document.
    """

    attribute: str
    template: int
    question: str
    answer: str


@dataclass(frozen=True)
class SyntheticEntity:
    """An invented entity, its document and every question about it.

    Args:
        kind (`str`): one of [`ENTITY_TYPES`].
        name (`str`): the invented name.
        facts (`dict[str, str]`): attribute -> value, in the attribute order of the type.
        document (`str`): the facts in prose, in shuffled order.
        templates (`dict[str, int]`): attribute -> the index of the statement template the document uses.
        questions (`tuple[SyntheticQuestion, ...]`): every question template of every fact.
    """

    kind: str
    name: str
    facts: dict[str, str]
    document: str
    templates: dict[str, int]
    questions: tuple[SyntheticQuestion, ...]


def _words(text: str) -> list[str]:
    # Words are runs of letters and digits: "Al-Zahran" is ("al", "zahran"), "University_of_Chicago" three words.
    return re.findall(r"[^\W_]+", text.casefold())


class _Blocklist:
    """Case-insensitive whole-word matching of a set of names (each a sequence of words) in a text."""

    def __init__(self, names: Iterable[str]):
        if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
            raise ReGradTypeError(f"exclude must be a collection of names, not a {type(names).__name__}")
        self.names: set[tuple[str, ...]] = set()
        for name in names:
            if not isinstance(name, str):
                raise ReGradTypeError(f"exclude must hold strings, not {type(name).__name__} ({name!r})")
            if words := tuple(_words(name)):
                self.names.add(words)
        self.lengths = sorted({len(words) for words in self.names})

    def hits(self, text: str) -> bool:
        words = _words(text)
        return any(tuple(words[i : i + n]) in self.names for n in self.lengths for i in range(len(words) - n + 1))


def _invent(rng: random.Random, kind: str) -> str:
    return " ".join("".join(rng.choice(parts) for parts in word) for word in NAME_PARTS[kind])


_VALUES: dict[str, Callable[[random.Random], str]] = {
    "profession": lambda rng: rng.choice(PROFESSIONS),
    "hobby": lambda rng: rng.choice(HOBBIES),
    "product_line": lambda rng: rng.choice(PRODUCT_LINES),
    "material": lambda rng: rng.choice(MATERIALS),
    "colour": lambda rng: rng.choice(COLOURS),
    "year_person": lambda rng: str(rng.randrange(1921, 2000)),
    "year_organisation": lambda rng: str(rng.randrange(1821, 2016)),
    "year_product": lambda rng: str(rng.randrange(1951, 2024)),
    "population": lambda rng: f"{rng.randrange(1200, 950_000):,}",
    "price": lambda rng: f"${rng.randrange(12, 990)}",
    "dish": lambda rng: f"{_invent(rng, 'place').lower()} {rng.choice(DISHES)}",
    "town": lambda rng: _invent(rng, "place"),
    "organisation": lambda rng: _invent(rng, "organisation"),
    "person": lambda rng: _invent(rng, "person"),
}
_INVENTED = ("town", "organisation", "person")  # value kinds reused across entities


def _contains(text: str, phrase: str) -> bool:
    words, target = _words(text), tuple(_words(phrase))
    return any(tuple(words[i : i + len(target)]) == target for i in range(len(words) - len(target) + 1))


def _draft(rng: random.Random, kind: str, pools: dict[str, list[str]]) -> SyntheticEntity:
    name = _invent(rng, kind)
    facts, templates = {}, {}
    for attribute, (value_kind, statements, _) in ATTRIBUTES[kind].items():
        pool = pools.get(value_kind)
        reuse = pool and value_kind in _INVENTED and rng.random() < _REUSE
        facts[attribute] = rng.choice(pool) if reuse else _VALUES[value_kind](rng)
        templates[attribute] = rng.randrange(len(statements))
    order = list(ATTRIBUTES[kind])
    rng.shuffle(order)
    reference = name.split()[-1] if kind == "person" else REFERENCES[kind]
    text = []
    for position, attribute in enumerate(order):
        template = ATTRIBUTES[kind][attribute][1][templates[attribute]]
        # The first sentence names the entity in full; later ones may use a short reference, as prose does.
        short = position > 0 and template.startswith("{name}") and rng.random() < 0.5
        text.append(template.format(name=reference if short else name, value=facts[attribute]))
    questions = tuple(
        SyntheticQuestion(attribute, k, question.format(name=name), facts[attribute])
        for attribute, (_, _, asked) in ATTRIBUTES[kind].items()
        for k, question in enumerate(asked)
    )
    return SyntheticEntity(kind, name, facts, " ".join(text), templates, questions)


def _acceptable(entity: SyntheticEntity, taken: set[str], blocklist: _Blocklist) -> bool:
    values = list(entity.facts.values())
    if entity.name.casefold() in taken or len({v.casefold() for v in [entity.name, *values]}) != len(values) + 1:
        return False  # a repeated name, or a value equal to another: a question would have two answers
    texts = [entity.document, *(q.question for q in entity.questions)]
    if any(blocklist.hits(text) for text in texts):
        return False
    # A value that also names the entity (an org called after its own town) would put the answer in the question.
    return not any(_contains(q.question, q.answer) for q in entity.questions)


def _integer(value: object, what: str, minimum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ReGradTypeError(f"{what} must be an integer, not {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ReGradValueError(f"{what} must be at least {minimum}, not {value}")


def generate_entities(count: int, seed: int, exclude: Iterable[str] = ()) -> list[SyntheticEntity]:
    """`count` invented entities, cycling through [`ENTITY_TYPES`] (entity `i` has type `ENTITY_TYPES[i % 4]`).

    Args:
        count (`int`): how many entities (at least 1).
        seed (`int`): seeds the only random generator used; the same arguments give the same entities.
        exclude (`Iterable[str]`, *optional*): names that no entity name, document or question may contain
            (case-insensitive, whole words), e.g. the entities of a test split; an entity that contains one is
            drawn again.

    Returns:
        `list[SyntheticEntity]`: entities with distinct names (case-insensitive).

    Raises:
        [`ReGradTypeError`]: `count` or `seed` is not an integer, or `exclude` is not a collection of strings.
        [`ReGradValueError`]: `count < 1`, or `exclude` blocks words every document of a type needs.
    """
    _integer(count, "count", 1)
    _integer(seed, "seed")
    blocklist = _Blocklist(exclude)
    rng = random.Random(seed)
    pools: dict[str, list[str]] = {kind: [] for kind in _INVENTED}
    taken: set[str] = set()
    entities = []
    for index in range(count):
        kind = ENTITY_TYPES[index % len(ENTITY_TYPES)]
        for _ in range(_MAX_ATTEMPTS):
            entity = _draft(rng, kind, pools)
            if _acceptable(entity, taken, blocklist):
                break
        else:
            raise ReGradValueError(
                f"no {kind} avoiding the exclude list after {_MAX_ATTEMPTS} draws: it blocks words the {kind} "
                "templates always use"
            )
        taken.add(entity.name.casefold())
        for attribute, (value_kind, _, _) in ATTRIBUTES[kind].items():
            if value_kind in _INVENTED:
                pools[value_kind].append(entity.facts[attribute])
        entities.append(entity)
    return entities


def hard_distractors(entities: Sequence[SyntheticEntity], index: int, count: int) -> list[str]:
    """The documents of `count` other entities of the same type as `entities[index]`, hardest first.

    Hardness is the number of attribute values shared with the gold entity, then the number of statement templates
    shared; ties go to the entities that follow `index` (cyclically), so that distractors vary between entities.

    Args:
        entities (`Sequence[SyntheticEntity]`): entities from [`generate_entities`].
        index (`int`): the gold entity.
        count (`int`): how many distractors (0 gives none).

    Returns:
        `list[str]`: `count` documents, none of them the gold entity's.

    Raises:
        [`ReGradValueError`]: fewer than `count` other entities of that type, `count < 0` or `index` out of range.
        [`ReGradTypeError`]: `index` or `count` is not an integer.
    """
    _integer(index, "index")
    _integer(count, "count", 0)
    if not 0 <= index < len(entities):
        raise ReGradValueError(f"index {index} is out of range for {len(entities)} entities")
    gold = entities[index]
    others = [(index + step) % len(entities) for step in range(1, len(entities))]
    others = [i for i in others if entities[i].kind == gold.kind]
    if count > len(others):
        raise ReGradValueError(f"{count} distractors asked, but there are {len(others)} other {gold.kind} entities")

    def hardness(i: int) -> tuple[int, int]:
        other = entities[i]
        return (sum(other.facts[a] == v for a, v in gold.facts.items()),
                sum(other.templates[a] == t for a, t in gold.templates.items()))  # fmt: skip

    return [entities[i].document for i in sorted(others, key=hardness, reverse=True)[:count]]


def synthetic_tasks(
    count_entities: int,
    seed: int,
    documents_per_task: int = 3,
    questions_per_fact: int = 2,
    exclude: Iterable[str] = (),
) -> list[Task]:
    """Meta-training tasks on invented facts: every fact of every entity asked `questions_per_fact` ways.

    Args:
        count_entities (`int`): entities to invent (types cycle; see [`generate_entities`]).
        seed (`int`): the seed; the same arguments give the same tasks, in the same order.
        documents_per_task (`int`, defaults to 3): the gold document, then `documents_per_task - 1` hard
            distractors of the same type (see [`hard_distractors`]), as top-k retrieval gives.
        questions_per_fact (`int`, defaults to 2): question templates per fact, drawn without repetition (at most 3).
        exclude (`Iterable[str]`, *optional*): names no document, question or answer may contain.

    Returns:
        `list[Task]`: in entity order, with ids `synthetic-<seed>-<entity index>-<attribute>-<template>` and
        `answers == (answer,)`.

    Raises:
        [`ReGradValueError`]: an argument below 1, more question templates asked than exist, or fewer entities of
            some type than `documents_per_task`.
        [`ReGradTypeError`]: an argument of the wrong type.
    """
    for value, what in ((count_entities, "count_entities"), (documents_per_task, "documents_per_task"),
                        (questions_per_fact, "questions_per_fact")):  # fmt: skip
        _integer(value, what, 1)
    _integer(seed, "seed")
    available = min(len(asked) for by_attribute in ATTRIBUTES.values() for _, _, asked in by_attribute.values())
    if questions_per_fact > available:
        raise ReGradValueError(f"questions_per_fact={questions_per_fact}, but each fact has {available} templates")
    # The last types get one entity fewer when the count is uneven; below 4 entities, each type present has one.
    fewest = max(count_entities // len(ENTITY_TYPES), 1 if count_entities < len(ENTITY_TYPES) else 0)
    if documents_per_task > fewest:
        raise ReGradValueError(
            f"documents_per_task={documents_per_task} needs at least that many entities of each of the "
            f"{len(ENTITY_TYPES)} types; count_entities={count_entities} gives {fewest} of some type"
        )
    entities = generate_entities(count_entities, seed, exclude)
    # Questions are drawn by a generator of their own (seeded from `seed`): the entities, drawn first by
    # generate_entities, do not depend on questions_per_fact.
    rng = random.Random(f"regrad-synthetic-questions-{seed}")
    tasks = []
    for index, entity in enumerate(entities):
        documents = (entity.document, *hard_distractors(entities, index, documents_per_task - 1))
        for attribute in entity.facts:
            asked = [q for q in entity.questions if q.attribute == attribute]
            for question in sorted(rng.sample(asked, questions_per_fact), key=lambda q: q.template):
                task_id = f"synthetic-{seed}-{index}-{attribute}-{question.template}"
                tasks.append(Task(documents, question.question, question.answer, (question.answer,), task_id))
    return tasks
