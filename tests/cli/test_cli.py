"""The `regrad` command: `--help` imports nothing heavy, every user mistake is one `error:` line and exit status 2,
missing paths are reported as missing, and the packaged demo files are found from an installed wheel."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import datasets
import pytest

from regrad_hf import GradientBank, ReGradValueError
from regrad_hf.bank.quantization import BANK_DTYPES
from regrad_hf.cli import main, options, train_options
from regrad_hf.cli import train as train_cli
from regrad_hf.cli.verbs import read_documents

from ..conftest import DOCUMENTS, IDS

ROOT = Path(__file__).resolve().parents[2]
SQUAD = ROOT / "tests" / "fixtures" / "squad_5q.json"
VERBS = ["demo", "train", "build-bank", "ask", "push", "pull", "eval"]
HEAVY = ("torch", "transformers", "datasets", "huggingface_hub", "numpy")


def test_help_imports_nothing_heavy():
    """`regrad --help` and every `regrad VERB --help` answer without importing torch, transformers or datasets: the
    console script imports `regrad_hf.cli` (so `regrad_hf` too, which is lazy) and parses with the standard library."""
    script = f"""
import sys, contextlib, io
from regrad_hf.cli import main
for argv in [["--help"]] + [[verb, "--help"] for verb in {VERBS!r}]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    assert code == 0 and "usage: regrad" in out.getvalue(), (argv, code, out.getvalue())
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]"


def test_version_prints_the_package_version_and_imports_nothing_heavy():
    """`regrad --version` prints `regrad <version>` (the version of `pyproject.toml`), exits 0, imports no torch."""
    version = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    script = f"""
import sys, contextlib, io
from regrad_hf.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        code = main(["--version"])
    except SystemExit as exit:
        code = exit.code
assert code == 0, code
print(out.getvalue().strip())
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip().splitlines() == [f"regrad {version}", "[]"]


MISTYPED = [
    (["build-bank", "--documents", "nosuch.jsonl", "--output", "out"], "no such file or directory: nosuch.jsonl"),
    (["ask", "q", "--bank", "./nosuch"], "no such bank directory: ./nosuch"),
    (["push", "./nosuch", "user/repo"], "no such directory: ./nosuch"),
    (["eval", "--dataset", "squad", "--data", "nosuch.json", "--output", "out"], "no such file or directory"),
    (["demo", "--learner", "./nosuch"], "no such learner directory: ./nosuch"),
    (["train", "--train_file", "nosuch.json"], "no such file or directory: nosuch.json"),
    (["train", "--init-learner", "./nosuch"], "no such learner directory: ./nosuch"),
    (["train", "--resume=./nosuch"], "no such checkpoint directory: ./nosuch"),
]


def test_mistyped_paths_report_before_torch_is_imported(tmp_path):
    """A path that is neither local nor a possible Hub id is reported by the argument checks, before any verb imports
    torch or transformers (which takes seconds on a loaded machine)."""
    script = f"""
import sys, contextlib, io
from regrad_hf.cli import main
for argv, expected in {MISTYPED!r}:
    with contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(argv)
    assert code == 2 and expected in err.getvalue(), (argv, code, err.getvalue())
    assert not {{"torch", "transformers"}} & set(sys.modules), argv
print("checked")
"""
    env = {**os.environ, "PYTHONPATH": str(Path(options.__file__).parents[2])}  # the sources this test imported
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "checked", result.stderr


def test_every_option_takes_both_spellings_and_help_shows_one():
    parser = options.build_parser()
    for kebab, snake in [("--top-k", "--top_k"), ("--max-new-tokens", "--max_new_tokens")]:
        assert parser.parse_args(["ask", "q", "--bank", "b", kebab, "3"]) == parser.parse_args(
            ["ask", "q", "--bank", "b", snake, "3"]
        )
    evaluation = ["eval", "--dataset", "squad", "--output", "o"]
    assert parser.parse_args([*evaluation, "--bank_cache", "c", "--no_progress"]).bank_cache == "c"
    commands = parser._subparsers._group_actions[0].choices
    for verb, sub in commands.items():
        for action in sub._actions:
            # argparse's own negation of a BooleanOptionalAction (--no-probe) has no alias
            kebab = [name for name in action.option_strings if "-" in name[2:] and not name.startswith("--no-")]
            assert all(f"--{name[2:].replace('-', '_')}" in action.option_strings for name in kebab), (verb, action)
        text = train_options.train_help().replace("--snake_case", "") if verb == "train" else sub.format_help()
        listed = [word for word in text.split() if word.startswith("--")]
        assert listed and not [word for word in listed if "_" in word], verb  # metavars (TOP_K) are not options
    train = train_options.option_values(["--max-steps", "5", "--output_dir=o", "--preset", "smollm2-squad"])
    assert train == {"max_steps": "5", "output_dir": "o", "preset": "smollm2-squad"}
    expanded = train_cli._with_preset(["--preset", "smollm2-squad", "--max-steps", "5"])
    assert "--max_steps" not in expanded and expanded[-2:] == ["--max-steps", "5"]  # the given one wins, once


def test_the_cli_copies_of_library_constants_agree():
    from regrad_hf.data import HUB_DATASETS
    from regrad_hf.evaluation.methods import METHODS

    assert options.BANK_DTYPES == BANK_DTYPES and options.METHOD_NAMES == METHODS
    assert {name: hub.repo_id for name, hub in HUB_DATASETS.items()} == options.HUB_DATA


def one_error_line(capsys, *fragments: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    return lines[0]


def exit_status(argv) -> int:
    """`main`'s status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.fixture
def saved_bank(tiny_model, embedder, tmp_path) -> Path:
    """A 4-document bank saved as `regrad build-bank` writes it (bank + learner/)."""
    bank = GradientBank.build(tiny_model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False)
    bank.save_pretrained(tmp_path / "bank")
    tiny_model.save_pretrained(tmp_path / "bank" / "learner")
    return tmp_path / "bank"


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ('{"text": "fine"}\n{"id": "x", "body": "no text"}\n', ['line 2 has no "text"']),
        ('{"text": "fine"}\n{"text": "unterminated\n', ["line 2 is not valid JSON"]),
        ('["a list"]\n', ['line 1 has no "text"']),
        ('{"text": "ok", "metadata": 3}\n', ['"metadata" must be an object']),
        ("\n\n", ["holds no documents"]),
    ],
)
def test_bad_document_files(tmp_path, capsys, content, fragments):
    path = tmp_path / "docs.jsonl"
    path.write_text(content)
    assert exit_status(["build-bank", "--documents", str(path), "--output", str(tmp_path / "out")]) == 2
    one_error_line(capsys, str(path), *fragments)
    with pytest.raises(ReGradValueError):
        read_documents(path)


def test_files_that_are_not_utf8_are_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("latin1.jsonl").write_bytes('{"text": "café"}\n'.encode("latin-1"))
    Path("binary.txt").write_bytes(b"\xff\xfe\x00binary")
    Path("tasks.jsonl").write_bytes(b"\x80")
    for argv, name in [
        (["build-bank", "--documents", "latin1.jsonl", "--output", "out"], "latin1.jsonl"),
        (["build-bank", "--documents", "binary.txt", "--output", "out"], "binary.txt"),
        (["demo", "--questions", "binary.txt"], "binary.txt"),
        (["eval", "--dataset", "jsonl", "--data", "tasks.jsonl", "--output", "o"], "tasks.jsonl"),
    ]:
        assert exit_status(argv) == 2
        one_error_line(capsys, name, "is not UTF-8 text")


def test_push_of_a_learner_with_a_symlinked_or_damaged_file_is_one_error_line(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "learner")
    (tmp_path / "learner" / "config.json").rename(tmp_path / "config.json")
    (tmp_path / "learner" / "config.json").symlink_to(tmp_path / "config.json")
    assert main(["push", str(tmp_path / "learner"), "user/repo"]) == 2
    one_error_line(capsys, "config.json is a symlink")
    (tmp_path / "learner" / "config.json").unlink()
    (tmp_path / "config.json").rename(tmp_path / "learner" / "config.json")
    (tmp_path / "learner" / "learner.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{garbage")
    assert main(["push", str(tmp_path / "learner"), "user/repo"]) == 2
    one_error_line(capsys, "learner.safetensors is not a readable learner file")


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["build-bank", "--documents", "nope.jsonl", "--output", "out"], ["no such file or directory: nope.jsonl"]),
        (["build-bank", "--documents", "docs/a/typo", "--output", "out"], ["no such file or directory: docs/a/typo"]),
        (["demo", "--questions", "missing/questions.jsonl"], ["no such file"]),
        (["ask", "--bank", "runs/typo/bank", "q?"], ["no such bank directory: runs/typo/bank"]),
        (["ask", "--bank", "./bnak", "q?"], ["no such bank directory: ./bnak"]),
        (["ask", "--bank", "user/bank-on-hub", "q?"], ["not local: pass --learner"]),
        (["push", "runs/missing", "user/repo"], ["no such directory: runs/missing"]),
        (["push", ".", "user/repo"], ["is neither a saved learner"]),
        (["eval", "--dataset", "squad", "--data", "data/squad.json", "--output", "o"], ["no such file or directory"]),
        (["eval", "--dataset", "jsonl", "--output", "o"], ["needs --data"]),
        (["eval", "--dataset", "squad", "--probes", "none.json", "--output", "o"], ["no such file: none.json"]),
        (["eval", "--dataset", "squad", "--methods", "magic", "--data", str(SQUAD), "--output", "o"], ["magic"]),
        (["eval", "--dataset", "squad", "--split", "x-y", "--data", str(SQUAD), "--output", "o"], ["'x-y'"]),
        (["eval", "--dataset", "squad", "--drift-n", "lots", "--data", str(SQUAD), "--output", "o"], ["'lots'"]),
        (["ask", "--bank", "b", "--top-k", "0", "q?"], ["--top-k: must be at least 1"]),
        (["demo", "--gamma", "nan"], ["--gamma: must be finite"]),
        (["demo", "--max-new-tokens", "many"], ["'many' is not an integer"]),
        (["build-bank", "--documents", "d", "--output", "o", "--max-shard-mb", "-1"], ["must not be negative"]),
        (["build-bank", "--documents", "d", "--output", "o", "--dtype", "int5"], ["invalid choice: 'int5'"]),
        (["eval", "--dataset", "wiki", "--output", "o"], ["invalid choice: 'wiki'"]),
        (["frobnicate"], ["invalid choice: 'frobnicate'"]),
        ([], ["required: COMMAND"]),
        (["train", "--train_format", "csv", "--train_file", str(SQUAD)], ["unknown task format 'csv'"]),
        (["train", "--preset", "nope"], ["unknown preset 'nope'"]),
        (["train", "--max_steps", "many"], ["--max_steps"]),
        (["train", "--data", "tasks/none.jsonl", "--train_format", "jsonl"], ["no such file or directory"]),
    ],
)
def test_user_mistakes_are_one_error_line(argv, fragments, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("d").write_text('{"text": "A document."}\n')  # a valid --documents file for the cases about other options
    assert exit_status(argv) == 2
    one_error_line(capsys, *fragments)


def test_top_k_larger_than_the_bank(saved_bank, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["ask", "--bank", str(saved_bank), "--top-k", "9", "What is the capital of Zorbia?"]) == 2
    one_error_line(capsys, "--top-k 9 is larger than the bank, which holds 4 documents")
    documents = tmp_path / "two.jsonl"
    documents.write_text('{"text": "One."}\n{"text": "Two."}\n')
    assert main(["demo", "--documents", str(documents), "--top-k", "3"]) == 2
    one_error_line(capsys, "--top-k 3 is larger than the bank, which holds 2 documents")


def test_a_missing_learner_is_reported_as_missing(saved_bank, capsys):
    assert main(["ask", "--bank", str(saved_bank), "--learner", "./no/learner", "q?"]) == 2
    one_error_line(capsys, "no such learner directory: ./no/learner")


def test_library_errors_escaping_a_verb_become_one_line(saved_bank, capsys, monkeypatch):
    """A ReGradError raised deep inside a verb (here: a damaged bank) is caught at the boundary."""
    (saved_bank / "bank_config.json").write_text("{not json")
    assert main(["ask", "--bank", str(saved_bank), "q?"]) == 2
    one_error_line(capsys, "bank_config.json")
    assert main(["push", str(saved_bank), "user/repo"]) == 2  # refused before anything is uploaded
    one_error_line(capsys, "has a damaged config")
    (saved_bank / "bank_config.json").write_text('{"format_version": 2}')
    assert main(["push", str(saved_bank), "user/repo"]) == 2
    one_error_line(capsys, "has a damaged config (no 'learner')")


def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")


def test_eval_and_train_default_to_hub_datasets_and_name_data_offline(monkeypatch, tmp_path, capsys):
    offline(monkeypatch, tmp_path)
    assert main(["eval", "--dataset", "squad", "--output", str(tmp_path / "out")]) == 2
    one_error_line(capsys, "'rajpurkar/squad'", "HF_HUB_OFFLINE", "pass --data PATH")
    assert main(["eval", "--dataset", "tofu", "--output", str(tmp_path / "out")]) == 2
    one_error_line(capsys, "'locuslab/TOFU'", "pass --data PATH")
    # With local data, the drift probes are the next thing taken from the Hub by default.
    argv = ["eval", "--dataset", "squad", "--data", str(SQUAD), "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    one_error_line(capsys, "'locuslab/TOFU'", "pass --probes FILE ... or --drift-n none")
    assert main(["train", "--output_dir", str(tmp_path / "run")]) == 2
    one_error_line(capsys, "'rajpurkar/squad'", "pass --data PATH")
    assert main(["train", "--preset", "smollm2-squad", "--output_dir", str(tmp_path / "run")]) == 2
    one_error_line(capsys, "'rajpurkar/squad'", "pass --data PATH")


def test_eval_without_matplotlib_fails_before_any_work(monkeypatch, tmp_path, capsys):
    """The plots are drawn last; a missing matplotlib is reported before the data or the learner are loaded."""
    import regrad_hf.evaluation

    for module in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, module, None)  # `import matplotlib` raises ImportError

    def work(*args, **kwargs):
        raise AssertionError("the evaluation started without matplotlib")

    monkeypatch.setattr(regrad_hf.evaluation, "load_eval_set", work)
    monkeypatch.setattr("regrad_hf.cli.verbs.load_learner", work)
    argv = ["eval", "--dataset", "squad", "--data", str(SQUAD), "--drift-n", "none", "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    one_error_line(capsys, "the evaluation plots need matplotlib", "pip install matplotlib")
    assert not (tmp_path / "o").exists()


def test_no_default_points_beside_the_checkout():
    """No option defaults to a path outside the installed package (a user has no ../shared)."""
    parser = options.build_parser()
    package = options.package_dir().resolve()
    for action in parser._subparsers._group_actions[0].choices.values():
        for option in action._actions:
            if isinstance(option.default, str) and ("/" in option.default or os.sep in option.default):
                path = Path(option.default)
                assert not path.is_absolute() or path.resolve().is_relative_to(package), (option.dest, path)
    for value in [*train_options.PRESETS["smollm2-squad"].values(), train_options.DataArguments().train_file]:
        assert "shared" not in str(value)


def test_the_wheel_ships_the_demo_files_and_the_entry_point(tmp_path):
    """`pip wheel` the checkout and install it into an empty folder: `regrad demo`'s default files are found there."""
    source, wheel_dir, target = tmp_path / "source", tmp_path / "wheel", tmp_path / "site"
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir)]
    subprocess.run([*build, str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheel_dir.glob("regrad_hf-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        metadata = archive.read("regrad_hf-0.1.0.dist-info/METADATA").decode()
        license_text = archive.read("regrad_hf-0.1.0.dist-info/licenses/LICENSE").decode()
    # The license as an SPDX expression (PEP 639) and the Apache-2.0 text itself in the wheel.
    assert re.search(r"^License-Expression: Apache-2.0$", metadata, re.M)
    assert re.search(r"^License-File: LICENSE$", metadata, re.M)
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    # One package on the path: nothing beside regrad_hf but its dist-info.
    assert {name.split("/")[0] for name in names} == {"regrad_hf", "regrad_hf-0.1.0.dist-info"}
    assert {"regrad_hf/examples/documents.jsonl", "regrad_hf/examples/questions.jsonl"} <= names
    assert {"regrad_hf/cli/__main__.py", "regrad_hf/templates/MODEL_CARD_TEMPLATE.md"} <= names
    assert "regrad_hf/learners/smollm2-135m-mixed/learner.safetensors" in names
    assert re.search(r"^regrad = regrad_hf.cli:main$", entry_points, re.M)
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    # The installed copy alone on the path: the demo's defaults are the packaged files.
    script = (
        "from regrad_hf.cli import options; p = options.build_parser().parse_args(['demo']); "
        "print(p.documents, p.questions)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    documents, questions = map(Path, result.stdout.split())
    assert documents.is_relative_to(target) and questions.is_relative_to(target)
    assert json.loads(documents.read_text().splitlines()[0])["id"] == "zorbia" and questions.is_file()


def test_build_bank_from_a_parquet_file(tiny_model, embedder, tmp_path, monkeypatch, capsys):
    path = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"body": DOCUMENTS, "key": IDS}).to_parquet(path)
    monkeypatch.setattr("regrad_hf.cli.verbs.load_learner", lambda learner, seed: tiny_model)
    monkeypatch.setattr("regrad_hf.bank.index.load_embedder", lambda name=None: embedder)
    argv = ["build-bank", "--documents", str(path), "--text-column", "body", "--id-column", "key"]
    assert main([*argv, "--output", str(tmp_path / "bank")]) == 0
    bank = GradientBank.from_pretrained(tmp_path / "bank")
    assert bank.ids == IDS and bank.document("velomar").text == DOCUMENTS[2]
    capsys.readouterr()
    assert main([*argv[:3], "--output", str(tmp_path / "other")]) == 2  # the default column "text" is not there
    err = capsys.readouterr().err  # datasets' own progress lines may come first
    assert [line for line in err.splitlines() if "error" in line.lower()] == [
        "error: the dataset has no 'text' column for documents (it has ['body', 'key'])"
    ]
    assert "Traceback" not in err


def test_ask_names_a_learner_directory_given_as_the_bank(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "learner")
    for extra in ([], ["--learner", str(tmp_path / "learner")]):
        assert main(["ask", "--bank", str(tmp_path / "learner"), *extra, "q?"]) == 2
        one_error_line(capsys, f"{tmp_path / 'learner'} is a learner", "not a bank", "pass it as --learner")


def test_build_bank_refuses_an_existing_bank_without_overwrite(
    saved_bank, tiny_model, embedder, tmp_path, monkeypatch, capsys
):
    """A bank in --output (here built from other documents) is kept unless --overwrite is given."""
    monkeypatch.setattr("regrad_hf.cli.verbs.load_learner", lambda learner, seed: tiny_model)
    monkeypatch.setattr("regrad_hf.bank.index.load_embedder", lambda name=None: embedder)
    documents = tmp_path / "new.jsonl"
    documents.write_text('{"id": "one", "text": "One new document."}\n{"id": "two", "text": "Another one."}\n')
    before = {path: path.read_bytes() for path in saved_bank.rglob("*") if path.is_file()}
    argv = ["build-bank", "--documents", str(documents), "--output", str(saved_bank)]
    assert main(argv) == 2
    one_error_line(capsys, f"{saved_bank} already holds a bank", "pass --overwrite to replace it")
    assert {path: path.read_bytes() for path in saved_bank.rglob("*") if path.is_file()} == before
    assert GradientBank.from_pretrained(saved_bank).ids == IDS
    assert main([*argv, "--overwrite"]) == 0
    assert GradientBank.from_pretrained(saved_bank).ids == ["one", "two"]


def test_build_bank_honours_the_columns_of_a_jsonl_file_and_refuses_them_for_text(
    tiny_model, embedder, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr("regrad_hf.cli.verbs.load_learner", lambda learner, seed: tiny_model)
    monkeypatch.setattr("regrad_hf.bank.index.load_embedder", lambda name=None: embedder)
    documents = tmp_path / "docs.jsonl"
    records = [{"content": text, "key": id_} for text, id_ in zip(DOCUMENTS, IDS, strict=True)]
    documents.write_text("".join(json.dumps(record) + "\n" for record in records))
    argv = ["build-bank", "--documents", str(documents), "--text-column", "content", "--id-column", "key"]
    assert main([*argv, "--output", str(tmp_path / "bank")]) == 0
    bank = GradientBank.from_pretrained(tmp_path / "bank")
    assert bank.ids == IDS and bank.document("velomar").text == DOCUMENTS[2]
    capsys.readouterr()
    assert main([*argv[:3], "--text-column", "body", "--output", str(tmp_path / "other")]) == 2
    one_error_line(capsys, 'line 1 has no "body" string')
    text = tmp_path / "docs.txt"
    text.write_text("\n".join(DOCUMENTS) + "\n")
    for option in ("--text-column", "--id-column"):
        assert main(["build-bank", "--documents", str(text), option, "x", "--output", str(tmp_path / "o")]) == 2
        one_error_line(capsys, f"{option} names a JSONL field or a dataset column", "docs.txt is a text file")
    assert not (tmp_path / "other").exists() and not (tmp_path / "o").exists()


def test_errors_from_the_network_and_multi_line_messages_are_one_line(tmp_path, capsys, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    transport = next(base for base in HfHubHTTPError.__bases__ if base is not OSError)  # httpx's HTTPError

    def offline_verb(args):
        raise transport("[Errno -2] Name or service not known")

    def wordy_verb(args):
        raise OSError("An error happened while trying to locate the files on the Hub,\nplease check your connection.")

    for verb, fragment in [(offline_verb, "cannot reach the Hub: [Errno -2]"), (wordy_verb, "Hub, please check")]:
        monkeypatch.setattr("regrad_hf.cli.verbs.pull", verb)
        assert main(["pull", "user/repo", str(tmp_path / "here")]) == 2
        one_error_line(capsys, fragment)

    def interrupted_verb(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("regrad_hf.cli.verbs.pull", interrupted_verb)
    assert main(["pull", "user/repo", str(tmp_path / "here")]) == 130
    one_error_line(capsys, "interrupted")


def test_ask_answers_from_a_saved_bank(saved_bank, tiny_model, capsys, monkeypatch):
    monkeypatch.setattr("regrad_hf.cli.verbs.load_learner", lambda learner, seed: tiny_model)
    assert main(["ask", "--bank", str(saved_bank), "--max-new-tokens", "2", "Where is Quentville?"]) == 0
    output = capsys.readouterr().out
    assert "retrieved: " in output and output.count("(") >= 3  # the learner's top_k_docs=3 of the 4 documents


def test_train_help_all_lists_the_training_arguments(capsys):
    assert main(["train", "--help-all"]) == 0
    text = capsys.readouterr().out
    assert all(option in text for option in ("--output_dir", "--first_order", "--step_size_learning_rate", "--data"))


def test_the_training_preset_reads_local_data_given_with_data(monkeypatch, capsys, tmp_path):
    """`regrad train --preset smollm2-squad --data FILE`: train and dev tasks both come from FILE (another split)."""
    calls = []

    def record(format_, source, split):
        calls.append((format_, source, split))
        if len(calls) == 2:
            raise ReGradValueError("stop before the model loads")
        return []

    monkeypatch.setattr("regrad_hf.cli.train._load_tasks", record)
    argv = ["train", "--preset", "smollm2-squad", "--data", str(SQUAD), "--output_dir", str(tmp_path / "run")]
    assert main(argv) == 2
    one_error_line(capsys, "stop before the model loads")
    assert calls == [("squad", str(SQUAD), "train"), ("squad", str(SQUAD), "dev")]
