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
from .task import Task

ENTITY_TYPES = ("person", "organisation", "place", "product")


def _parts(text: str) -> tuple[str, ...]:
    return tuple(part.replace("_", " ") for part in text.split())  # "_" joins the words of one item


# Invented names are onset + vowel + middle + ending: consonant and vowel runs alternate, so almost every combination
# is a distinct string (>100k names per entity type) and few are English words or real names.
_ONSETS = _parts("B Br C Cr D Dr F G Gr H J K Kr L M N P Pr Qu R S Sk St T Th Tr V Vr W Z Zh Y")
_VOWELS = _parts("a e i o u ae ei ou")
_MIDDLES = _parts("l r n v m z rn lv nd st th sk rv nt lm rd sh ld nk x")
_PLACE_ENDS = _parts("a ia ora ane eth ion ard ell ast ova uin ara esk ond ire yn ax elle oth ume en ir aro enne is")
_FIRST_ENDS = _parts("a o en is ar el ia us ine an eth yn ic ara ion e")
_SURNAME_ENDS = _parts("ard ek ov ane ish orn usk eld ett ace ins ow arro essi ald unn ier ose")
_ORG_ENDS = _parts("ex on ar ia is um or ent ica ara yx eon")
_PRODUCT_ENDS = _parts("ix ex o ar ium ette on us a ion")
_ORG_SUFFIXES = _parts("Industries Holdings Works Collective Laboratories Foundry Syndicate Guild Consortium Group "
                       "Trading_Company Mills Cooperative Instruments")  # fmt: skip
_SERIES = _parts("Nova Aero Lumen Prime Arc Echo Vista Pulse Crest Orbit Drift Spark Halo Zephyr")
# A name is space-separated words, each the concatenation of one item of each of its part lists.
_NAME_PARTS: dict[str, tuple[tuple[Sequence[str], ...], ...]] = {
    "person": ((_ONSETS, _VOWELS, _MIDDLES, _FIRST_ENDS), (_ONSETS, _VOWELS, _MIDDLES, _SURNAME_ENDS)),
    "organisation": ((_ONSETS, _VOWELS, _MIDDLES, _ORG_ENDS), (_ORG_SUFFIXES,)),
    "place": ((_ONSETS, _VOWELS, _MIDDLES, _PLACE_ENDS),),
    "product": ((_ONSETS, _VOWELS, _MIDDLES, _PRODUCT_ENDS), (_SERIES,)),
}
# Common-word values, some guessable on purpose (professions start with a consonant: templates say "a {value}").
_PROFESSIONS = _parts("clockmaker cartographer beekeeper glassblower violinist bookbinder locksmith tailor ferry_pilot "
                      "surveyor pharmacist stonemason puppeteer translator botanist carpenter librarian potter "
                      "radio_engineer sculptor tea_taster dentist")  # fmt: skip
_HOBBIES = _parts("falconry knitting birdwatching rock_climbing origami sailing fencing stargazing kite_flying bonsai "
                  "calligraphy fly_fishing juggling archery woodcarving orienteering quilting cave_diving "
                  "ballroom_dancing chess_problems")  # fmt: skip
_PRODUCT_LINES = _parts("ceramic_tiles weather_balloons canned_sardines hearing_aids garden_tools paper_lanterns "
                        "wind_turbines school_desks copper_kettles bicycle_bells sailcloth typewriter_ribbons "
                        "rope_ladders ice_skates fountain_pens tin_toys")  # fmt: skip
_MATERIALS = _parts("walnut_wood recycled_aluminium carbon_fibre brushed_steel bamboo cork glazed_ceramic "
                    "birch_plywood titanium tempered_glass hemp_fabric bronze slate")  # fmt: skip
_COLOURS = _parts("teal burnt_orange mustard_yellow slate_grey plum olive_green coral navy_blue ivory crimson lavender "
                  "charcoal sand_beige turquoise")  # fmt: skip
_DISHES = _parts("stew dumplings pie flatbread soup pudding pancakes sausages noodles cake porridge fritters")

# attribute -> (value kind, statement templates, question templates), "|"-separated. A statement may start with
# {name}, which later sentences may replace by a short reference ("The company"); only proper-name values start one,
# so common-word answers keep their case.
# fmt: off
_TEMPLATES: dict[str, dict[str, tuple[str, str, str]]] = {
    "person": {
        "birthplace": ("town", "{name} was born in the small town of {value}.|"
            "The birthplace of {name} is a town called {value}.|"
            "{name} grew up in {value}, the town where the family lived for generations.|"
            "Records show that {name} was born in {value}.",
            "Where was {name} born?|What is the birthplace of {name}?|In which town was {name} born?"),
        "profession": ("profession", "{name} works as a {value}.|By trade, {name} is a {value}.|"
            "{name} earns a living as a {value} and is respected for it.|"
            "For most of a long career, {name} has been a {value}.",
            "What is the profession of {name}?|What does {name} do for a living?|What job does {name} have?"),
        "birth_year": ("year_person", "{name} was born in the year {value}.|The year {value} saw the birth of {name}.|"
            "{name} came into the world in {value}.|According to the parish register, {name} was born in {value}.",
            "In what year was {name} born?|What is the birth year of {name}?|When was {name} born?"),
        "employer": ("organisation", "{name} is employed by {value}.|{name} works for {value}.|"
            "The employer of {name} is {value}.|For several years now, {name} has been on the staff of {value}.",
            "Which organisation employs {name}?|Who is the employer of {name}?|For which company does {name} work?"),
        "hobby": ("hobby", "In spare hours, {name} enjoys {value}.|{name}'s favourite hobby is {value}.|"
            "Away from work, {name} is devoted to {value}.|Friends say that {name} never tires of {value}.",
            "What is the hobby of {name}?|What does {name} enjoy in spare hours?|Which pastime is {name} devoted to?"),
    },
    "organisation": {
        "founded": ("year_organisation", "{name} was founded in {value}.|"
            "{name} opened its doors for the first time in {value}.|The founding year of {name} is {value}.|"
            "Since {value}, {name} has been in business.",
            "In what year was {name} founded?|When was {name} established?|What is the founding year of {name}?"),
        "headquarters": ("town", "{name} has its headquarters in {value}.|"
            "The head office of {name} is in the town of {value}.|"
            "{name} is based in {value}, where its head office stands.|"
            "The town of {value} is home to the headquarters of {name}.",
            "Where is {name} headquartered?|In which town is the head office of {name}?|"
            "Where are the headquarters of {name}?"),
        "founder": ("person", "{name} was founded by {value}.|{value} started {name} with a small loan.|"
            "The founder of {name} is {value}.|{name} owes its existence to its founder, {value}.",
            "Who founded {name}?|Who is the founder of {name}?|Who started {name}?"),
        "product_line": ("product_line", "{name} makes {value}.|{name} is best known for its {value}.|"
            "The main products of {name} are {value}.|Most of the revenue of {name} comes from {value}.",
            "What does {name} make?|What products is {name} known for?|What is the main product line of {name}?"),
    },
    "place": {
        "region": ("town", "{name} is a town in the region of {value}.|{name} lies in the northern part of {value}.|"
            "The town of {name} belongs to the province of {value}.|"
            "In the province of {value}, the largest market town is {name}.",
            "In which region is {name}?|Which province does {name} belong to?|What region is {name} located in?"),
        "population": ("population", "{name} has a population of {value}.|About {value} people live in {name}.|"
            "The population of {name} is {value}.|{name} is home to {value} residents.",
            "What is the population of {name}?|How many people live in {name}?|How many residents does {name} have?"),
        "river": ("town", "The river {value} flows through {name}.|{name} stands on the banks of the river {value}.|"
            "{name} is crossed by the {value}, a slow and wide river.|A river named {value} runs past {name}.",
            "Which river flows through {name}?|On which river does {name} stand?|"
            "What is the name of the river of {name}?"),
        "dish": ("dish", "The famous local dish of {name} is {value}.|{name} is known for its {value}.|"
            "Visitors to {name} are always served {value}.|No feast in {name} is complete without {value}.",
            "What is the famous dish of {name}?|Which dish is {name} known for?|What local food is {name} famous for?"),
    },
    "product": {
        "maker": ("organisation", "{name} is made by {value}.|The maker of {name} is {value}.|"
            "{name} comes from the workshops of {value}.|It is {value} that manufactures {name}.",
            "Who makes {name}?|Which company manufactures {name}?|Who is the maker of {name}?"),
        "launch_year": ("year_product", "{name} was launched in {value}.|{name} first went on sale in {value}.|"
            "The launch year of {name} was {value}.|Since {value}, {name} has been available in shops.",
            "When was {name} launched?|In what year did {name} go on sale?|What is the launch year of {name}?"),
        "material": ("material", "{name} is made of {value}.|The body of {name} is built from {value}.|"
            "{name} has a casing of {value}.|The designers chose {value} as the material of {name}.",
            "What material is {name} made of?|What is {name} built from?|Which material is used for {name}?"),
        "colour": ("colour", "{name} comes in {value}.|The colour of {name} is {value}.|"
            "{name} is sold only in {value}.|Every unit of {name} is painted {value}.",
            "What colour is {name}?|In which colour does {name} come?|What is the colour of {name}?"),
        "price": ("price", "{name} costs {value}.|{name} sells for {value}.|The price of {name} is {value}.|"
            "A new {name} can be bought for {value}.",
            "How much does {name} cost?|What is the price of {name}?|For how much does {name} sell?"),
    },
}
# fmt: on
_ATTRIBUTES = {
    kind: {
        attribute: (value, tuple(statements.split("|")), tuple(questions.split("|")))
        for attribute, (value, statements, questions) in table.items()
    }
    for kind, table in _TEMPLATES.items()
}  # fmt: skip
_REFERENCES = {"organisation": "The company", "place": "The town", "product": "The product"}  # person: the surname
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
    return " ".join("".join(rng.choice(parts) for parts in word) for word in _NAME_PARTS[kind])


_VALUES: dict[str, Callable[[random.Random], str]] = {
    "profession": lambda rng: rng.choice(_PROFESSIONS),
    "hobby": lambda rng: rng.choice(_HOBBIES),
    "product_line": lambda rng: rng.choice(_PRODUCT_LINES),
    "material": lambda rng: rng.choice(_MATERIALS),
    "colour": lambda rng: rng.choice(_COLOURS),
    "year_person": lambda rng: str(rng.randrange(1921, 2000)),
    "year_organisation": lambda rng: str(rng.randrange(1821, 2016)),
    "year_product": lambda rng: str(rng.randrange(1951, 2024)),
    "population": lambda rng: f"{rng.randrange(1200, 950_000):,}",
    "price": lambda rng: f"${rng.randrange(12, 990)}",
    "dish": lambda rng: f"{_invent(rng, 'place').lower()} {rng.choice(_DISHES)}",
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
    for attribute, (value_kind, statements, _) in _ATTRIBUTES[kind].items():
        pool = pools.get(value_kind)
        reuse = pool and value_kind in _INVENTED and rng.random() < _REUSE
        facts[attribute] = rng.choice(pool) if reuse else _VALUES[value_kind](rng)
        templates[attribute] = rng.randrange(len(statements))
    order = list(_ATTRIBUTES[kind])
    rng.shuffle(order)
    reference = name.split()[-1] if kind == "person" else _REFERENCES[kind]
    text = []
    for position, attribute in enumerate(order):
        template = _ATTRIBUTES[kind][attribute][1][templates[attribute]]
        # The first sentence names the entity in full; later ones may use a short reference, as prose does.
        short = position > 0 and template.startswith("{name}") and rng.random() < 0.5
        text.append(template.format(name=reference if short else name, value=facts[attribute]))
    questions = tuple(
        SyntheticQuestion(attribute, k, question.format(name=name), facts[attribute])
        for attribute, (_, _, asked) in _ATTRIBUTES[kind].items()
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
        for attribute, (value_kind, _, _) in _ATTRIBUTES[kind].items():
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
    available = min(len(asked) for by_attribute in _ATTRIBUTES.values() for _, _, asked in by_attribute.values())
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
