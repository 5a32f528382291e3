"""Hostile and malformed data for the loaders and the `regrad` command: every mistake is a `ReGradError` naming the
file, line or field (never a bare `KeyError`/`TypeError`/`RecursionError`), nothing is silently misread (a string
split into characters, a negative index counting from the end), and FIFOs or devices are refused without blocking."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import datasets
import pytest

from regrad_hf import ReGradError, ReGradValueError
from regrad_hf.cli import main
from regrad_hf.cli.verbs import read_documents
from regrad_hf.data import Task, as_tasks, documents_from, load_hotpotqa, load_jsonl, load_squad, load_tofu
from regrad_hf.data.sources import read_text_file
from regrad_hf.data.task_sets import tofu_tasks
from regrad_hf.errors import ReGradFileError
from regrad_hf.evaluation.datasets import load_eval_set, parse_range
from regrad_hf.evaluation.drift import load_probes
from regrad_hf.evaluation.metrics import bootstrap_ci

SQUAD = Path(__file__).resolve().parents[1] / "fixtures" / "squad_5q.json"
QA = {"id": "q1", "question": "Where?", "answers": [{"text": "Paris", "answer_start": 0}]}
TASK = {"documents": ["Paris is in France."], "question": "Where is Paris?", "answer": "France"}
HOTPOT = {
    "_id": "h1",
    "question": "Q?",
    "answer": "A",
    "supporting_facts": [["T1", 0]],
    "context": [["T1", ["First. ", "Second."]], ["T2", ["Other."]]],
}


def squad_json(qa=QA, paragraph=None, title="T") -> dict:
    return {"data": [{"title": title, "paragraphs": [paragraph or {"context": "Paris is in France.", "qas": [qa]}]}]}


def write(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def exit_status(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def one_error_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (squad_json({**QA, "answers": ["Paris"]}), r"qas\[0\]\.answers\[0\] is a string, not an object"),
        (squad_json({**QA, "answers": [{"text": 5}]}), r"answers\[0\]\.text must be a string"),
        (squad_json(paragraph={"context": "C.", "qas": "abc"}), r"paragraphs\[0\]\.qas must be a list"),
        (squad_json(paragraph={"context": "C.", "qas": [5]}), r"qas\[0\] is a int, not an object"),
        (squad_json(title=["T"]), r"data\[0\]\.title must be a string or an integer"),
        (squad_json(paragraph={"context": None, "qas": [QA]}), r"paragraphs\[0\]\.context must be a string"),
    ],
)
def test_squad_json_of_the_wrong_shape_names_the_field(tmp_path, content, match):
    with pytest.raises(ReGradValueError, match=match):
        load_squad(write(tmp_path, "squad.json", content))


def test_squad_rows_whose_answers_are_a_string_are_refused_not_split_into_characters():
    row = {"title": "T", "context": "Paris is in France.", "question": "Where?", "answers": {"text": "Paris"}}
    with pytest.raises(ReGradValueError, match=r"row 0\.answers\.text must be a list, not a string"):
        load_squad(datasets.Dataset.from_list([row]))  # before: the answers were ('P', 'a', 'r', 'i', 's')
    with pytest.raises(ReGradValueError, match="row 0 has no 'answers' field"):
        load_squad([{"title": "T", "context": "C.", "question": "Q?"}])
    with pytest.raises(ReGradValueError, match="row 0 is a int, not an object"):
        load_squad([5])
    with pytest.raises(ReGradValueError, match="cannot read data from a bytes"):
        load_squad(b"squad.json")


def test_indices_must_be_non_negative_integers(tmp_path):
    with pytest.raises(ReGradValueError, match="article indices must be at least 0, got -1"):
        load_squad(SQUAD, [-1])  # before: the last article, silently
    with pytest.raises(ReGradError, match="indices must be integers, got 'a'"):
        load_squad(SQUAD, ["a"])
    tofu = write(tmp_path, "tofu.jsonl", jsonl({"author_idx": 0, "question": "Q?", "answer": "A."}))
    with pytest.raises(ReGradError, match="iterable of integers, got int"):
        load_tofu(tofu, 3)
    with pytest.raises(ReGradError, match="facts_per_document"):
        tofu_tasks(tofu, None, "5")
    with pytest.raises(ReGradError, match="record indices must be integers"):
        load_hotpotqa(write(tmp_path, "h.jsonl", jsonl(HOTPOT)), records=["0"])


@pytest.mark.parametrize("loader", [load_squad, load_hotpotqa, load_tofu, load_jsonl])
def test_json_nested_too_deeply_or_with_nan_is_a_typed_error(tmp_path, loader):
    with pytest.raises(ReGradValueError, match="nested too deeply"):
        loader(write(tmp_path, "deep.json", "[" * 100_000 + "]" * 100_000))  # before: RecursionError
    nan = '{"data": NaN}' if loader is load_squad else '{"documents": ["D."], "question": "Q?", "answer": NaN}'
    with pytest.raises(ReGradValueError, match="NaN is not a JSON value"):
        loader(write(tmp_path, "nan.json" if loader is load_squad else "nan.jsonl", nan))


def test_a_utf8_byte_order_mark_is_dropped(tmp_path):
    bom = b"\xef\xbb\xbf"
    assert load_squad(write(tmp_path, "s.json", bom + json.dumps(squad_json()).encode()))[0].answer == "Paris"
    assert load_jsonl(write(tmp_path, "t.jsonl", bom + jsonl(TASK).encode()))[0].answer == "France"
    assert load_hotpotqa(write(tmp_path, "h.jsonl", bom + jsonl(HOTPOT).encode()))[0].id == "h1"
    texts, _, _ = read_documents(write(tmp_path, "docs.txt", bom + b"First document.\nSecond.\n"))
    assert texts == ["First document.", "Second."]


def test_json_lines_split_only_at_newlines(tmp_path):
    """U+2028 and U+0085 are legal unescaped inside JSON strings (`ensure_ascii=False` writes them)."""
    task = {**TASK, "documents": ["Paris\u2028is in\x85France."]}
    path = write(tmp_path, "t.jsonl", jsonl(json.dumps(task, ensure_ascii=False)))
    assert load_jsonl(path)[0].documents == ("Paris\u2028is in\x85France.",)
    docs = write(tmp_path, "d.jsonl", jsonl(json.dumps({"text": "a\u2028b", "id": "x"}, ensure_ascii=False)))
    assert read_documents(docs)[0] == ["a\u2028b"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"context": [["T1", [1, 2]]]}, r"context\[0\]\[1\]\[0\] must be a string"),
        ({"context": [["T1", "one sentence"]]}, r"context\[0\]\[1\] must be a list"),
        ({"context": [[5, ["s"]]], "supporting_facts": [["T1", 0]]}, r"context\[0\]\[0\] must be a string"),
        ({"supporting_facts": [["T1", "zero"]]}, r"supporting_facts\[0\]\[1\] must be a sentence index"),
        ({"supporting_facts": [["T1", 0, 1]]}, r"must be a \[title, \.\.\.\] pair"),
        ({"context": {"title": ["T1"], "sentences": [["a"], ["b"]]}}, "1 titles but 2 lists of sentences"),
    ],
)
def test_malformed_hotpotqa_records_name_the_field(tmp_path, change, match):
    with pytest.raises(ReGradValueError, match=match):
        load_hotpotqa(write(tmp_path, "h.jsonl", jsonl({**HOTPOT, **change})))


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("5", "line 2 is a int, not an object"),
        ('{"author_idx": 0, "question": "Q?"}', "row 1 has no 'answer' field"),
        ('{"author_idx": 0, "question": "Q?", "answer": 5}', r"row 1\.answer must be a string"),
        ('{"author_idx": [0], "question": "Q?", "answer": "A."}', r"row 1\.author_idx must be an integer"),
    ],
)
def test_malformed_tofu_lines_name_the_line(tmp_path, line, match):
    path = write(tmp_path, "tofu.jsonl", jsonl({"author_idx": 0, "question": "Q?", "answer": "A."}, line))
    with pytest.raises(ReGradValueError, match=match):
        load_tofu(path)


def test_task_fields_of_the_wrong_type_are_refused_not_reinterpreted(tmp_path):
    with pytest.raises(ReGradValueError, match="answers must be a list of strings, not a str"):
        Task(("Doc.",), "Q?", "A", "Paris")  # before: answers ('P', 'a', 'r', 'i', 's')
    with pytest.raises(ReGradValueError, match="documents must be a list of strings, not a dict"):
        Task({"Doc.": 1}, "Q?", "A")  # before: the keys, as documents
    with pytest.raises(ReGradValueError, match="answer 0 of answers must be a string"):
        Task(("Doc.",), "Q?", "A", (5,))
    assert Task(("Doc.",), "Q?", "A", id=7).id == "7"
    for change, match in [
        ({"answers": "Paris"}, "line 1: answers must be a list, not a string"),
        ({"id": [1]}, "line 1: id must be a string or an integer"),
        ({"documents": {"a": "b"}}, "line 1: documents must be a list, not a object"),
    ]:
        with pytest.raises(ReGradValueError, match=match):
            load_jsonl(write(tmp_path, "t.jsonl", jsonl({**TASK, **change})))
    with pytest.raises(ReGradError, match="not NoneType"):
        as_tasks(None)
    with pytest.raises(ReGradValueError, match="task 0 is a int, not an object"):
        as_tasks([5])


def test_fifos_and_devices_are_refused_without_blocking(tmp_path, monkeypatch, capsys):
    fifo = tmp_path / "tasks.jsonl"
    os.mkfifo(fifo)
    outcome: list = []

    def read():
        try:
            read_text_file(fifo)
        except ReGradValueError as error:
            outcome.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # blocked in open(): let it go before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert outcome and "not a regular file" in str(outcome[0])
    with pytest.raises(ReGradValueError, match="not a regular file"):
        load_jsonl(fifo)
    with pytest.raises(ReGradValueError, match="not a regular file"):
        load_squad("/dev/zero")
    monkeypatch.chdir(tmp_path)
    os.mkfifo("docs")  # a relative name that could be a Hub id: before, the Hub was asked for it
    assert exit_status(["build-bank", "--documents", "docs", "--output", "out"]) == 2
    one_error_line(capsys, "docs is not a regular file")
    assert exit_status(["demo", "--documents", "/dev/zero"]) == 2
    one_error_line(capsys, "/dev/zero is not a regular file")
    with pytest.raises(ReGradFileError, match="cannot read"):
        read_text_file(tmp_path / "missing.txt")  # before: a bare FileNotFoundError


@pytest.fixture
def no_work(monkeypatch):
    """Fails a test whose command got as far as loading a learner (the work a mistake should have stopped)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command started working before refusing its arguments")

    monkeypatch.setattr("regrad_hf.cli.verbs.load_learner", refuse)


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["build-bank", "--documents", "docs.jsonl", "--output", "afile"], ["afile exists and is not a directory"]),
        (["eval", "--dataset", "jsonl", "--data", "tasks.jsonl", "--output", "afile"], ["afile exists and is not"]),
        (["eval", "--dataset", "jsonl", "--data", "tasks.jsonl", "--output", "o", "--bank-cache", "afile"], ["afile"]),
        (["demo", "--seed", "-1"], ["--seed: must be at least 0"]),
        (["demo", "--seed", str(2**64)], ["--seed: must be below 2**32"]),
        (["eval", "--dataset", "jsonl", "--data", "tasks.jsonl", "--output", "o", "--bootstrap", "0"], ["--bootstrap"]),
        (["eval", "--dataset", "squad", "--data", str(SQUAD), "--split", "0-99999999999", "--output", "o"], ["more"]),
        (["eval", "--dataset", "squad", "--data", str(SQUAD), "--split", "39-35", "--output", "o"], ["backwards"]),
        (["eval", "--dataset", "squad", "--data", str(SQUAD), "--probes", "bad.json", "--output", "o"], ["bad.json"]),
        (["build-bank", "--documents", "mixed.jsonl", "--output", "out"], ["line 2: give an id on every line"]),
    ],
)
def test_command_line_mistakes_are_refused_before_any_work(argv, fragments, tmp_path, monkeypatch, capsys, no_work):
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("a file")
    Path("docs.jsonl").write_text(jsonl({"text": "A document."}))
    Path("tasks.jsonl").write_text(jsonl(TASK))
    Path("bad.json").write_text('[{"question": "q", "option1": "a", "option2": "b"}]')
    Path("mixed.jsonl").write_text(jsonl({"text": "One.", "id": "a"}, {"text": "Two."}))
    assert exit_status(argv) == 2
    one_error_line(capsys, *fragments)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("not json", "is not valid JSON"),
        ('{"question": "q"}', "must be a JSON list of probes"),
        ('[{"question": "q", "option1": "a", "option2": "b"}]', "probe 0 has no 'answer' field"),
        ("[5]", "probe 0 is a int"),
        ('[{"question": "q", "option1": "a", "answer": "a"}]', "needs two or more"),
        (b'[{"question": "caf\xe9"}]', "not UTF-8"),
    ],
)
def test_malformed_probe_files_name_the_probe(tmp_path, content, match):
    with pytest.raises(ReGradValueError, match=match):
        load_probes(write(tmp_path, "probes.json", content))


def test_evaluation_arguments_of_the_wrong_value_are_refused():
    for kwargs, match in [
        ({"limit": -1}, "limit must be an integer of at least 1"),  # before: every question but the last
        ({"limit": "3"}, "limit must be an integer"),
        ({"split": 3}, "split must be a string"),
    ]:
        with pytest.raises(ReGradError, match=match):
            load_eval_set("squad", SQUAD, **kwargs)
    with pytest.raises(ReGradValueError, match="backwards"):
        parse_range("5-1")  # before: no indices, silently
    with pytest.raises(ReGradValueError, match="more than"):
        parse_range("0-99999999999")  # before: MemoryError
    with pytest.raises(ReGradValueError, match="at least 1"):
        bootstrap_ci([0.5, 1.0], resamples=0)  # before: IndexError


def test_document_ids_are_given_on_every_line_and_never_null(tmp_path):
    with pytest.raises(ReGradValueError, match="line 1: the id must be a string or an integer"):
        read_documents(write(tmp_path, "d.jsonl", jsonl({"text": "One.", "id": ["a"]})))
    assert read_documents(write(tmp_path, "n.jsonl", jsonl({"text": "One.", "id": 7})))[1] == ["7"]
    with pytest.raises(ReGradValueError, match="row 1 has no 'id'"):
        documents_from(datasets.Dataset.from_dict({"text": ["a", "b"], "id": ["x", None]}), id_column="id")


def _saved_documents(folder: Path, texts: list[str]) -> Path:
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "symlinked split", "symlinked data file", "data file path"])
def test_a_saved_dataset_folder_is_never_read_outside_itself(tmp_path, escape):
    """`load_from_disk` joins the split names of dataset_dict.json and the file names of state.json to the folder as
    they are: a hostile folder must not make documents_from read another folder's data."""
    other = _saved_documents(tmp_path / "other", ["a secret document outside the folder"])
    folder = _saved_documents(tmp_path / "deep" / "er" / "documents", ["the folder's own document"])
    assert documents_from(folder)[0] == ["the folder's own document"]
    listing = folder / "dataset_dict.json"
    if escape == "dotdot":
        listing.write_text(json.dumps({"splits": ["../../../other/train"]}))
    elif escape == "absolute":
        listing.write_text(json.dumps({"splits": [str(other / "train")]}))
    elif escape == "symlinked split":
        (folder / "train").rename(folder / "train-moved")
        (folder / "train").symlink_to(other / "train", target_is_directory=True)
    else:
        state_path = folder / "train" / "state.json"
        state = json.loads(state_path.read_text())
        (data_file,) = [entry["filename"] for entry in state["_data_files"]]
        if escape == "symlinked data file":
            (folder / "train" / data_file).unlink()
            (folder / "train" / data_file).symlink_to(other / "train" / data_file)
        else:
            state["_data_files"] = [{"filename": f"../../../../other/train/{data_file}"}]
            state_path.write_text(json.dumps(state))
    with pytest.raises(ReGradError, match="never read") as raised:
        documents_from(folder)
    assert isinstance(raised.value, (ReGradValueError, ReGradFileError))
