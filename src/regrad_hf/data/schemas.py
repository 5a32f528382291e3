"""The checked schemas of SQuAD and HotpotQA records: what [`regrad_hf.data`]'s loaders read, field by field.

Each function raises [`ReGradValueError`] naming the record and the field (`squad.json: data[3].paragraphs[0].qas[2]
.answers`) when a record does not have the shape of the original files or of the Hub datasets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ReGradValueError
from .records import field, identifier, list_at, mapping, sequence, string, strings, text_at


def squad_json_rows(top: Any, path: str) -> list[dict]:
    """SQuAD v1.1 JSON (`data[].paragraphs[].context/qas`) flattened into the Hub's rows, every level checked."""
    top = mapping(top, f"{path} (SQuAD v1.1 JSON: data[].paragraphs[].context/qas)")
    rows = []
    for a, article in enumerate(sequence(field(top, "data", path), f"{path}: data")):
        where = f"{path}: data[{a}]"
        title = identifier(mapping(article, where).get("title", str(a)), f"{where}.title")
        for p, paragraph in enumerate(list_at(article, "paragraphs", where)):
            at = f"{where}.paragraphs[{p}]"
            context = text_at(mapping(paragraph, at), "context", at)
            for q, qa in enumerate(list_at(paragraph, "qas", at)):
                qa_at = f"{at}.qas[{q}]"
                answers = list_at(mapping(qa, qa_at), "answers", qa_at)
                texts = [text_at(mapping(x, f"{qa_at}.answers[{n}]"), "text", f"{qa_at}.answers[{n}]")
                         for n, x in enumerate(answers)]  # fmt: skip
                rows.append({"id": identifier(qa.get("id"), f"{qa_at}.id"), "title": title, "context": context,
                             "question": text_at(qa, "question", qa_at), "answers": {"text": texts}})  # fmt: skip
    return rows


def squad_row(row: Any, where: str) -> tuple[str | None, str, str, list[str], str | None]:
    """`(title, context, question, answer texts, id)` of a row in the Hub schema (`answers.text` a list)."""
    row = mapping(row, where)
    answers = mapping(field(row, "answers", where), f"{where}.answers")
    texts = strings(field(answers, "text", f"{where}.answers"), f"{where}.answers.text")
    title = identifier(field(row, "title", where), f"{where}.title")
    task_id = identifier(row.get("id"), f"{where}.id")
    return title, text_at(row, "context", where), text_at(row, "question", where), texts, task_id


def _pair(value: Any, where: str) -> list:
    pair = sequence(value, where)
    if len(pair) != 2:
        raise ReGradValueError(f"{where} must be a [title, ...] pair, not a list of {len(pair)}")
    return pair


def _sentence_index(value: Any, where: str) -> None:
    # Only titles select documents; an index is checked for its type, not against its paragraph's length.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ReGradValueError(f"{where} must be a sentence index (an integer, at least 0), not {value!r}")


def hotpotqa_record(record: Any, where: str) -> tuple[set[str], list[tuple[str, list[str]]], str | None]:
    """`(supporting titles, (title, sentences) paragraphs, id)` of a record in the original or the Hub schema."""
    record = mapping(record, where)
    facts, context = field(record, "supporting_facts", where), field(record, "context", where)
    at = f"{where}.supporting_facts"
    if isinstance(facts, Mapping):  # Hub: {"title": [...], "sent_id": [...]}
        supporting = set(strings(field(facts, "title", at), f"{at}.title"))
        for n, index in enumerate(sequence(facts.get("sent_id", []), f"{at}.sent_id")):
            _sentence_index(index, f"{at}.sent_id[{n}]")
    else:  # original: [[title, sentence index], ...]
        supporting = set()
        for n, fact in enumerate(sequence(facts, at)):
            title, index = _pair(fact, f"{at}[{n}]")
            supporting.add(string(title, f"{at}[{n}][0]"))
            _sentence_index(index, f"{at}[{n}][1]")
    at = f"{where}.context"
    if isinstance(context, Mapping):  # Hub: {"title": [...], "sentences": [[...], ...]}
        titles, sentences = list_at(context, "title", at), list_at(context, "sentences", at)
        if len(titles) != len(sentences):
            raise ReGradValueError(f"{at} has {len(titles)} titles but {len(sentences)} lists of sentences")
        named = [(f"{at}.title[{n}]", f"{at}.sentences[{n}]") for n in range(len(titles))]
    else:  # original: [[title, [sentences]], ...]
        pairs = [_pair(pair, f"{at}[{n}]") for n, pair in enumerate(sequence(context, at))]
        titles, sentences = [title for title, _ in pairs], [text for _, text in pairs]
        named = [(f"{at}[{n}][0]", f"{at}[{n}][1]") for n in range(len(pairs))]
    paragraphs = [
        (string(title, title_at), strings(text, text_at_))
        for title, text, (title_at, text_at_) in zip(titles, sentences, named, strict=True)
    ]
    return supporting, paragraphs, identifier(record.get("id", record.get("_id")), f"{where}.id")
