"""The options of every `regrad` verb, parsed with the standard library alone: `regrad --help` and
`regrad VERB --help` import no torch, transformers or datasets (a test checks). A verb imports what it needs when it
runs ([`regrad_hf.cli.verbs`], [`regrad_hf.cli.train`]); the entry point is [`regrad_hf.cli.main`].
"""

from __future__ import annotations

import argparse
import copy
import math
import re
from pathlib import Path

from ..names import missing_location, missing_path_message

# The method names of `regrad eval` (`regrad_hf.evaluation.methods.METHODS`; a test keeps the two equal).
METHOD_NAMES = ("closed_book", "no_adaptation", "rag", "learner_icl", "cpt", "raw", "sgd", "regrad", "regrad_icl")
DEFAULT_METHOD_NAMES = tuple(method for method in METHOD_NAMES if method != "sgd")  # sgd: a costly diagnostic
# Gradient storage formats (`regrad_hf.bank.quantization.BANK_DTYPES`; a test keeps the two equal).
BANK_DTYPES = ("bfloat16", "float16", "float32", "int8", "int4", "int3", "int2")
# The Hub datasets `regrad eval` and `regrad train` read by default (`regrad_hf.data.HUB_DATASETS`).
HUB_DATA = {"squad": "rajpurkar/squad", "hotpotqa": "hotpotqa/hotpot_qa", "tofu": "locuslab/TOFU"}
FRESH = "fresh"


def package_dir() -> Path:
    """The installed `regrad_hf` package folder."""
    return Path(__file__).parent.parent


def examples_dir() -> Path:
    """The example documents and questions shipped inside the package (`regrad demo`'s defaults)."""
    return package_dir() / "examples"


def default_learner() -> str:
    """The meta-trained learner shipped with the package, when this install has it; else a fresh one."""
    path = package_dir() / "learners" / "smollm2-135m-mixed"
    return str(path) if (path / "learner.safetensors").is_file() else FRESH


# ---------------------------------------------------------------------------------------------- values


def integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    return integer(text, 1)


def seed_int(text: str) -> int:
    value = integer(text, 0)
    if value >= 2**32:  # numpy's and torch's generators take no larger (or negative) seed
        raise argparse.ArgumentTypeError(f"must be below 2**32, got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def existing_file(text: str) -> str:
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory, not a file")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    if not path.is_file():  # reading a FIFO would block, a device such as /dev/zero never ends
        raise argparse.ArgumentTypeError(f"{text} is not a regular file (a FIFO or a device)")
    return text


def output_directory(text: str) -> str:
    """A directory to write to: refused now if it is a file, not after the work is done."""
    if (path := Path(text).expanduser()).exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    return text


_SNAKE_ALIAS = re.compile(r"/--[a-z0-9]+(?:_[a-z0-9]+)+\b")


class OneSpelling(argparse.HelpFormatter):
    """Help that lists each option once, in its `--kebab-case` spelling (not the `--snake_case` alias)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if len(action.option_strings) > 1:
            action = copy.copy(action)
            action.option_strings = [name for name in action.option_strings if "_" not in name]
        return super()._format_action_invocation(action)


class Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose mistakes are one line on stderr: `error: ...`, exit status 2. Every `--kebab-case`
    option also answers to `--snake_case`, as `regrad train`'s options (transformers' `HfArgumentParser`) do."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", OneSpelling)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names: str, **kwargs) -> argparse.Action:
        aliases = [f"--{name[2:].replace('-', '_')}" for name in names if name.startswith("--") and "-" in name[2:]]
        return super().add_argument(*names, *aliases, **kwargs)

    def error(self, message: str):
        message = _SNAKE_ALIAS.sub("", message)  # argparse names an option by all its names: "--top-k/--top_k"
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def path_mistake(args: argparse.Namespace) -> str | None:
    """The first path on the command line that cannot be right (neither an existing local path nor a possible Hub
    repo id), as an error message; `None` if there is none. Checked before a verb imports torch, so that a typo
    reports at once.
    """
    learner = getattr(args, "learner", None)
    if learner not in (None, FRESH) and (problem := missing_location(learner, "learner directory")):
        return problem
    kinds = {"documents": "file or directory", "bank": "bank directory", "data": "file or directory"}
    for option, kind in kinds.items():
        value = getattr(args, option, None)
        if value is not None and (problem := missing_location(value, kind)):
            return problem
    if args.verb == "push" and not Path(args.path).expanduser().is_dir():
        return missing_path_message(args.path, "directory")
    return None


# ---------------------------------------------------------------------------------------------- verbs


def build_parser() -> Parser:
    """The `regrad` parser: `--version`, and one sub-command per verb.

    Returns:
        [`Parser`]: a parser whose `parse_args` gives the verb's options, with `verb` naming its function in
        [`regrad_hf.cli.verbs`].
    """
    from ..version import __version__

    parser = Parser(prog="regrad", description="Retrievable Gradients for Hugging Face models.")
    parser.add_argument("--version", action="version", version=f"regrad {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")

    def common(sub: argparse.ArgumentParser, default: str | None) -> None:
        sub.add_argument(
            "--learner",
            default=default,
            help="a saved learner (directory or Hub id), or 'fresh' for an untrained one on the embedded "
            f"SmolLM2-135M-Instruct (default: {default or 'the one saved with the bank'})",
        )
        sub.add_argument("--seed", type=seed_int, default=0, help="seed of a fresh learner's LoRA init (default 0)")

    examples = examples_dir()
    sub = commands.add_parser(
        "demo",
        help="build a bank from example documents and answer questions with and without ReGrad (embedded models, "
        "offline)",
    )
    sub.add_argument("--documents", type=existing_file, default=str(examples / "documents.jsonl"), help="JSONL or text")
    sub.add_argument(
        "--questions", type=existing_file, default=str(examples / "questions.jsonl"), help='JSONL of {"question", ...}'
    )
    sub.add_argument("--top-k", type=positive_int, default=1, help="documents retrieved per question (default 1)")
    sub.add_argument("--gamma", type=finite_float, default=1.0, help="step multiplier (default 1.0)")
    sub.add_argument("--max-new-tokens", type=positive_int, default=24)
    common(sub, default_learner())
    sub.set_defaults(verb="demo")

    commands.add_parser(
        "train", help="meta-train a learner (ReGradTrainer); `regrad train --help` lists its options", add_help=False
    )

    sub = commands.add_parser("build-bank", help="compute and save the gradient bank of a set of documents")
    sub.add_argument(
        "--documents",
        required=True,
        help="JSONL ({text, id?, metadata?} per line), text (one document per line), or through `datasets`: a "
        "Parquet/CSV file, a dataset folder or a Hub dataset name",
    )
    sub.add_argument(
        "--text-column", default=None, help="for JSONL or a dataset: the field or column of the texts (default text)"
    )
    sub.add_argument(
        "--id-column",
        default=None,
        help="for JSONL or a dataset: the field or column of unique ids (default: JSONL's id, a dataset's row numbers)",
    )
    sub.add_argument("--split", default=None, help="for a dataset with several splits (default: train)")
    sub.add_argument(
        "--output",
        required=True,
        type=output_directory,
        help="directory to write the bank to; finished shards are checkpointed, so rerunning an interrupted "
        "command resumes it",
    )
    sub.add_argument(
        "--overwrite", action="store_true", help="replace the bank --output already holds (refused without it)"
    )
    sub.add_argument("--batch-size", type=positive_int, default=16, help="documents per gradient batch")
    sub.add_argument(
        "--dtype", choices=BANK_DTYPES, default=None, help="how to store gradients (default: the learner's bank_dtype)"
    )
    sub.add_argument(
        "--max-shard-mb",
        type=nonnegative_float,
        default=1024,
        help="shard (and checkpoint) size in MiB (default 1024; 0: one document per shard); the unit of work of "
        "each process in a multi-process build",
    )
    common(sub, default_learner())
    sub.set_defaults(verb="build_bank")

    sub = commands.add_parser("ask", help="answer questions with gradients retrieved from a saved bank")
    sub.add_argument("question", nargs="+", help="one or more questions")
    sub.add_argument("--bank", required=True, help="a bank directory (written by build-bank) or a Hub bank repo")
    sub.add_argument("--top-k", type=positive_int, default=None, help="documents per question (default: the learner's)")
    sub.add_argument("--gamma", type=finite_float, default=None, help="step multiplier (default: the learner's)")
    sub.add_argument("--max-new-tokens", type=positive_int, default=32)
    sub.add_argument("--compare", action="store_true", help="also answer without the bank")
    common(sub, None)
    sub.set_defaults(verb="ask")

    sub = commands.add_parser("push", help="upload a saved learner or bank directory to a Hub repo, with its card")
    sub.add_argument("path", help="a directory written by save_pretrained or build-bank")
    sub.add_argument("repo_id", help="the repo, e.g. user/my-learner (created if needed)")
    sub.add_argument("--subfolder", default=None, help="folder of the repo to write to, e.g. bank")
    sub.add_argument("--revision", default=None, help="branch to push to (created from main if needed)")
    sub.add_argument("--private", action="store_true", help="create the repo as private")
    sub.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    sub.add_argument("--commit-message", default=None)
    sub.add_argument("--token", default=None, help="Hub token (default: the saved login)")
    sub.set_defaults(verb="push")

    sub = commands.add_parser("pull", help="download a learner or bank repo (data files only) to a directory")
    sub.add_argument("repo_id", help="the repo, e.g. user/my-learner")
    sub.add_argument("directory", type=output_directory, help="where to put its files")
    sub.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    sub.add_argument("--token", default=None, help="Hub token (default: the saved login)")
    sub.set_defaults(verb="pull")

    sub = commands.add_parser(
        "eval",
        help="compare ReGrad with closed-book, no-adaptation, RAG, CPT, raw gradients and ReGrad+ICL on a dataset, "
        "with drift; writes results.json, report.md and PNG plots",
    )
    sub.add_argument("--dataset", required=True, choices=["squad", "hotpotqa", "tofu", "jsonl"], help="data format")
    sub.add_argument(
        "--data",
        help="a local file or dataset folder, or a Hub dataset name (default: "
        + ", ".join(f"{name}: {repo}" for name, repo in HUB_DATA.items())
        + "; jsonl needs --data)",
    )
    sub.add_argument(
        "--split",
        help="train/dev/test (the meta-training splits of regrad_hf.data.task_sets) or indices like 35-39 of squad "
        "articles, tofu authors or hotpotqa records (default: all)",
    )
    sub.add_argument("--limit", type=positive_int, help="questions to evaluate, sampled with --seed (bank unchanged)")
    sub.add_argument("--top-k", type=positive_int, help="documents retrieved per question (default: the learner's)")
    sub.add_argument("--oracle", action="store_true", help="use each question's gold documents instead of retrieval")
    sub.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHOD_NAMES),
        help=f"comma-separated, of {','.join(METHOD_NAMES)} (default: all but sgd)",
    )
    sub.add_argument(
        "--output", required=True, type=output_directory, help="directory for results.json, report.md and the plots"
    )
    sub.add_argument("--max-new-tokens", type=positive_int, default=24)
    sub.add_argument("--num-beams", type=positive_int, default=1, help="beam search width of every method (1: greedy)")
    sub.add_argument("--gamma", type=finite_float, help="ReGrad step multiplier (default: the learner's)")
    sub.add_argument(
        "--system-prompt", help="system turn of every method's prompt, or 'none' (default: the learner's template)"
    )
    sub.add_argument("--user-template", help="user turn with {question} and {context} (default: the learner's)")
    sub.add_argument("--document-template", help="each document in {context}: {document}, {index} (default: learner's)")
    sub.add_argument("--answer-stop", choices=["line", "turn"], help="where answers end (default: the learner's)")
    sub.add_argument(
        "--answer-repetition-penalty",
        type=finite_float,
        help="repetition penalty on each answer's own word tokens, every method (1 is off; default: the learner's)",
    )
    sub.add_argument(
        "--bank-cache",
        type=output_directory,
        help="directory keeping the learner's document gradients between runs (reused, extended)",
    )
    sub.add_argument("--cpt-mode", default="full", choices=["full", "lora"], help="CPT trains all weights or a LoRA")
    sub.add_argument("--cpt-epochs", type=positive_int, default=1, help="CPT passes over the bank (default 1)")
    sub.add_argument("--cpt-lr", type=positive_float, default=2e-5, help="CPT AdamW learning rate (default 2e-5)")
    sub.add_argument("--sgd-steps", type=positive_int, default=5, help="the sgd ceiling's gradient steps (default 5)")
    sub.add_argument(
        "--sgd-lr",
        type=positive_float,
        default=1.0,
        help="the sgd ceiling's first step size, halved where it overshoots (default 1)",
    )
    sub.add_argument("--drift-n", default="10,100", help="document counts to measure drift at, or 'none'")
    sub.add_argument("--drift-methods", default="regrad,cpt", help="methods whose drift is measured")
    sub.add_argument("--drift-heldout", type=positive_int, default=20, help="bank documents held out for perplexity")
    sub.add_argument(
        "--probes",
        nargs="*",
        type=existing_file,
        help="multiple-choice probe files (default: the world_facts and real_authors sets of locuslab/TOFU)",
    )
    sub.add_argument("--probe-limit", type=positive_int, help="use only the first N questions of each probe set")
    sub.add_argument(
        "--probe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the knowledge probe of every method (not the drift --probes): rank the reference answer among it and "
        "3 other questions' answers by mean token log-probability after the method's prompt (default: on)",
    )
    sub.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples of the 95%% CIs")
    sub.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_argument("--command-line", help=argparse.SUPPRESS)
    common(sub, default_learner())
    sub.set_defaults(verb="evaluate")
    return parser
