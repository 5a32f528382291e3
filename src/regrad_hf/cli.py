"""The `regrad` command: `regrad demo`, `regrad build-bank`, `regrad ask`, `regrad eval`, `regrad push`, `regrad pull`
(and `regrad train`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .defaults import shipped_learner_path
from .quantization import BANK_DTYPES

# The method names of `regrad eval` (kept here so that `regrad --help` imports no torch).
METHOD_NAMES = ("closed_book", "no_adaptation", "rag", "cpt", "raw", "regrad", "regrad_icl")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# The project's shared real data, next to a source checkout (see its README); absent from installed wheels.
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
DEFAULT_DATA = {
    "squad": "squad_dev_articles_00-39.json",
    "hotpotqa": "hotpotqa_dev_distractor_500.jsonl",
    "tofu": "tofu_qa_authors_000-179.jsonl",
}
DEFAULT_PROBES = ("world_facts.json", "real_authors.json")
LEARNER_SUBDIR = "learner"
FRESH = "fresh"


def read_documents(path: Path) -> tuple[list[str], list[str] | None, list[dict] | None]:
    """Reads documents from JSONL (`{"text": ..., "id": ..., "metadata": {...}}` per line) or plain text (one per
    non-empty line)."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines, None, None
    records = [json.loads(line) for line in lines]
    texts = [record["text"] for record in records]
    ids = [str(record["id"]) for record in records] if all("id" in r for r in records) else None
    metadata = [record.get("metadata", {}) for record in records]
    return texts, ids, metadata


def log_to_stderr() -> None:
    """Shows regrad-hf's own INFO messages (not other libraries') on stderr."""
    import logging

    logger = logging.getLogger("regrad_hf")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def load_learner(learner: str | None, seed: int):
    """A saved learner; `"fresh"` for an untrained one on the embedded base model (seeded, so runs repeat)."""
    import torch

    from .modeling import ReGradForCausalLM

    if learner != FRESH:
        return ReGradForCausalLM.from_pretrained(learner)
    torch.manual_seed(seed)
    return ReGradForCausalLM.from_base()


def default_learner() -> str:
    """The meta-trained learner shipped with the package, when this install has it; else a fresh one."""
    path = shipped_learner_path()
    return str(path) if (path / "learner.safetensors").is_file() else FRESH


def answer(model, question: str, max_new_tokens: int, **retrieval) -> str:
    """Greedy answer to `question`, asked with the learner's prompt template and cut by its stop rule."""
    from .prompting import PromptTemplate

    tokenizer, template = model.tokenizer, PromptTemplate.from_config(model.config)
    inputs = tokenizer(template.build(tokenizer, question), return_tensors="pt", add_special_tokens=False)
    length = inputs["input_ids"].shape[1]
    stop = template.stopping_criteria(tokenizer, length)
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, stopping_criteria=stop, **retrieval
    )
    return template.cut(tokenizer.decode(output[0, length:], skip_special_tokens=True))


def document_nll(model, text: str) -> float:
    """Mean token negative log-likelihood of `text` under the model as it currently is."""
    import torch

    input_ids = model.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=input_ids, labels=input_ids).loss.item()


def build_bank(args: argparse.Namespace) -> int:
    """Builds a bank into `--output`, checkpointing finished shards: rerunning the same command after an
    interruption resumes where it stopped. Under `torchrun` or `accelerate launch` every process computes a share of
    the shards and process 0 publishes the bank (the result does not depend on the number of processes)."""
    import os

    from .bank import GradientBank
    from .bank_checkpoint import resume_message
    from .errors import ReGradError

    texts, ids, metadata = read_documents(Path(args.documents))
    model = load_learner(args.learner, args.seed)
    log_to_stderr()
    rank = 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by a launcher: join its process group
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        rank = state.process_index
        model.to(state.device)  # this process's GPU; the CPU otherwise
    output = Path(args.output)
    message = resume_message(output) if rank == 0 else None
    if message:
        print(message)
    try:
        bank = GradientBank.build(
            model,
            texts,
            ids=ids,
            metadata=metadata,
            batch_size=args.batch_size,
            dtype=args.dtype,
            output_dir=output,
            max_shard_bytes=int(args.max_shard_mb * (1 << 20)),
        )
    except ReGradError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if rank == 0:
        model.save_pretrained(output / LEARNER_SUBDIR)  # `ask` needs the very learner the bank was built with
        print(f"saved {bank} to {output}")
    return 0


def ask(args: argparse.Namespace) -> int:
    from .bank import GradientBank

    bank_dir = Path(args.bank)
    learner = args.learner or str(bank_dir / LEARNER_SUBDIR)
    if not Path(learner).is_dir() and args.learner is None:
        print(f"error: {bank_dir} has no {LEARNER_SUBDIR}/ folder; pass --learner", file=sys.stderr)
        return 2
    model = load_learner(learner, args.seed)
    model.attach_bank(GradientBank.from_pretrained(bank_dir))
    for question in args.question:
        hits = model.bank.search(question, args.top_k or model.config.top_k_docs)
        print(f"Q: {question}")
        print("   retrieved: " + ", ".join(f"{hit.id} ({hit.score:.2f})" for hit in hits))
        print(f"   ReGrad:    {answer(model, question, args.max_new_tokens, top_k_docs=args.top_k, gamma=args.gamma)}")
        if args.compare:
            print(f"   no bank:   {answer(model, question, args.max_new_tokens, use_bank=False)}")
    return 0


def demo(args: argparse.Namespace) -> int:
    """Builds a bank from the example documents and answers the example questions with and without ReGrad."""
    from .bank import GradientBank

    texts, ids, metadata = read_documents(Path(args.documents))
    questions = [json.loads(line) for line in Path(args.questions).read_text(encoding="utf-8").splitlines() if line]
    model = load_learner(args.learner, args.seed)
    print(f"base model: {model.config.base_model_name_or_path} ({model.config.base_model_revision})")
    print(
        f"learner: {'fresh (not meta-trained)' if not args.learner else args.learner}, "
        f"{sum(p.numel() for p in model.lora_parameters().values()):,} LoRA parameters, "
        f"step size {model.step_sizes.values().mean().item():.3g}, gamma {args.gamma}"
    )
    bank = GradientBank.build(model, texts, ids=ids, metadata=metadata)
    model.attach_bank(bank)
    if Path(args.learner) == shipped_learner_path():
        print("meta-trained by `regrad train --preset smollm2-squad` (seed 0, SQuAD articles 0-29): see TRAINING.md")
    print(f"bank: {bank}\n")

    for item in questions:
        question = item["question"]
        hits = bank.search(question, args.top_k)
        print(f"Q: {question}   (expected: {item.get('answer', '?')})")
        print("   retrieved:      " + ", ".join(f"{hit.id} ({hit.score:.2f})" for hit in hits))
        if item.get("doc_id") in bank:
            before = document_nll(model, bank.document(item["doc_id"]).text)
            with model.retrieved(question, args.top_k, gamma=args.gamma):
                after = document_nll(model, bank.document(item["doc_id"]).text)
            print(f"   NLL of its source document without / with ReGrad: {before:.3f} / {after:.3f}")
        print(f"   without ReGrad: {answer(model, question, args.max_new_tokens, use_bank=False)}")
        regrad_answer = answer(model, question, args.max_new_tokens, top_k_docs=args.top_k, gamma=args.gamma)
        print(f"   with ReGrad:    {regrad_answer}")
        print()
    return 0


def folder_card(folder: Path, repo_id: str, subfolder: str | None) -> tuple[str, list[str]] | None:
    """The card of a saved learner or bank directory, and the repo files a push of it replaces; None if neither."""
    from safetensors import safe_open

    from . import bank, hub, modeling
    from .config import ReGradConfig

    if (folder / bank.CONFIG_FILE).is_file():
        bank_config = json.loads((folder / bank.CONFIG_FILE).read_text(encoding="utf-8"))
        return hub.render_bank_card(bank_config, repo_id=repo_id, subfolder=subfolder), [f"{bank.GRADIENTS_DIR}/*"]
    if (folder / modeling.CONFIG_FILE).is_file() and (folder / modeling.LEARNER_FILE).is_file():
        config = ReGradConfig.from_json_file(str(folder / modeling.CONFIG_FILE))
        with safe_open(str(folder / modeling.LEARNER_FILE), framework="pt") as learner:
            fingerprint, names = (learner.metadata() or {}).get("fingerprint", "unknown"), list(learner.keys())
        lora_tensors = len([name for name in names if name != modeling.STEP_SIZES_KEY])
        return hub.render_model_card(
            config, fingerprint=fingerprint, num_lora_tensors=lora_tensors, repo_id=repo_id
        ), []
    return None


def push(args: argparse.Namespace) -> int:
    from .hub import push_folder

    folder = Path(args.path)
    found = folder_card(folder, args.repo_id, args.subfolder) if folder.is_dir() else None
    if found is None:
        print(
            f"error: {folder} is neither a saved learner (config.json + learner.safetensors) nor a bank "
            "(bank_config.json)",
            file=sys.stderr,
        )
        return 2
    card, replaced = found
    commit = push_folder(
        folder,
        args.repo_id,
        path_in_repo=args.subfolder or "",
        commit_message=args.commit_message or f"Upload {folder.name} with regrad push",
        private=args.private or None,
        token=args.token,
        revision=args.revision,
        create_pr=args.create_pr,
        delete_patterns=replaced,
        card=card,
    )
    print(f"pushed {folder} to {args.repo_id} (commit {commit.oid}{', PR ' + commit.pr_url if commit.pr_url else ''})")
    return 0


def pull(args: argparse.Namespace) -> int:
    from .hub import pull as pull_repo

    directory = pull_repo(args.repo_id, args.directory, revision=args.revision, token=args.token)
    print(f"pulled {args.repo_id} to {directory}")
    return 0


def learner_note(learner: str) -> str:
    """What the report says about how the learner was trained (ReGrad+ICL depends on it)."""
    if learner == FRESH:
        return "fresh, not meta-trained (peft init, B = 0): ReGrad is then a raw-gradient step with the init step size"
    if Path(learner).resolve() == shipped_learner_path().resolve():
        return (
            "the shipped learner, meta-trained blind (question-only prompts) on SQuAD articles 0-29 with one "
            "document per task (its TRAINING.md); ReGrad+ICL shows it documents in the prompt, which it never saw "
            "in training (no learner trained with blind=False is shipped)"
        )
    return "a saved learner; whether it was trained blind or with documents in the prompt is not in its config"


def eval_prompt(config, args: argparse.Namespace):
    """The prompt of every method: the learner's template, with the fields given on the command line replaced (`\\n`
    in them is a newline; `--system-prompt none` sends no system turn)."""
    from .prompting import PromptTemplate

    fields = {}
    for name in ("system_prompt", "user_template", "document_template"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = None if name == "system_prompt" and value == "none" else value.replace("\\n", "\n")
    if args.answer_stop is not None:
        fields["answer_stop"] = args.answer_stop
    learner = PromptTemplate.from_config(config)
    return PromptTemplate(**{**vars(learner), **fields})


def evaluate(args: argparse.Namespace) -> int:
    """Runs every method on a dataset and writes results.json, report.md and the plots to --output."""
    import shlex

    from .evaluation import CPTConfig, EvalConfig, load_eval_set, load_probes, run_evaluation, write_report
    from .evaluation.datasets import parse_range
    from .evaluation.methods import check_methods

    data = args.data or (str(SHARED_DATA / DEFAULT_DATA[args.dataset]) if args.dataset in DEFAULT_DATA else None)
    if data is None or not Path(data).is_file():
        print(
            f"error: no data file for --dataset {args.dataset} ({data or 'none given'}); pass --data", file=sys.stderr
        )
        return 2
    probe_paths = args.probes if args.probes is not None else [str(SHARED_DATA / name) for name in DEFAULT_PROBES]
    drift_ns = [] if args.drift_n in ("", "none") else parse_range(args.drift_n)
    missing = [path for path in probe_paths if not Path(path).is_file()]
    if drift_ns and missing:
        print(f"error: probe files not found: {missing}; pass --probes or --drift-n none", file=sys.stderr)
        return 2
    methods = check_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    eval_set = load_eval_set(args.dataset, data, args.split, args.limit, args.seed)
    probes = {Path(path).stem: load_probes(path)[: args.probe_limit] for path in probe_paths} if drift_ns else {}
    config = EvalConfig(
        methods=methods,
        top_k=args.top_k,
        oracle=args.oracle,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        gamma=args.gamma,
        cpt=CPTConfig(args.cpt_mode, args.cpt_epochs, args.cpt_lr, args.seed),
        drift_ns=drift_ns,
        drift_methods=[m.strip() for m in args.drift_methods.split(",") if m.strip()],
        drift_heldout=args.drift_heldout,
        bootstrap_resamples=args.bootstrap,
        show_progress=not args.no_progress,
        bank_cache=args.bank_cache,
    )
    model = load_learner(args.learner, args.seed)
    config.prompt = eval_prompt(model.config, args)
    command = (
        "regrad " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if args.command_line is None else args.command_line
    )
    run_info = {"command": command, "learner": args.learner, "learner_note": learner_note(args.learner)}
    results = run_evaluation(model, eval_set, config, probes, run_info=run_info)
    written = write_report(results, args.output)
    from .evaluation.report import results_table

    print(results_table(results))
    print(f"wrote {', '.join(str(path) for path in written.values())}")
    return 0 if results["integrity"]["identical"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regrad", description="Retrievable Gradients for Hugging Face models.")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser, default: str | None) -> None:
        sub.add_argument(
            "--learner",
            default=default,
            help="a saved learner (directory or Hub id), or 'fresh' for an untrained one on the embedded "
            f"SmolLM2-135M-Instruct (default: {default or 'the one saved with the bank'})",
        )
        sub.add_argument("--seed", type=int, default=0, help="seed of a fresh learner's LoRA init (default 0)")

    sub = commands.add_parser(
        "demo",
        help="build a bank from example documents and answer questions with and "
        "without ReGrad (embedded models, offline)",
    )
    sub.add_argument("--documents", default=str(EXAMPLES / "documents.jsonl"), help="JSONL or text documents")
    sub.add_argument("--questions", default=str(EXAMPLES / "questions.jsonl"), help='JSONL of {"question", "answer"}')
    sub.add_argument("--top-k", type=int, default=1, help="documents retrieved per question (default 1)")
    sub.add_argument("--gamma", type=float, default=1.0, help="step multiplier (default 1.0)")
    sub.add_argument("--max-new-tokens", type=int, default=24)
    common(sub, default_learner())
    sub.set_defaults(run=demo)

    commands.add_parser(
        "train", help="meta-train a learner (ReGradTrainer); `regrad train --help` lists its options", add_help=False
    )

    sub = commands.add_parser("build-bank", help="compute and save the gradient bank of a set of documents")
    sub.add_argument("--documents", required=True, help="JSONL ({text, id?, metadata?} per line) or text, one per line")
    sub.add_argument(
        "--output",
        required=True,
        help="directory to write the bank to; finished shards are checkpointed, so rerunning an interrupted "
        "command resumes it",
    )
    sub.add_argument("--batch-size", type=int, default=16, help="documents per gradient batch")
    sub.add_argument(
        "--dtype", choices=BANK_DTYPES, default=None, help="how to store gradients (default: the learner's bank_dtype)"
    )
    sub.add_argument(
        "--max-shard-mb",
        type=float,
        default=1024,
        help="shard (and checkpoint) size in MiB (default 1024); the unit of work of each process in a multi-process "
        "build",
    )
    common(sub, default_learner())
    sub.set_defaults(run=build_bank)

    sub = commands.add_parser("ask", help="answer questions with gradients retrieved from a saved bank")
    sub.add_argument("question", nargs="+", help="one or more questions")
    sub.add_argument("--bank", required=True, help="a bank directory (written by build-bank)")
    sub.add_argument("--top-k", type=int, default=None, help="documents per question (default: the learner's)")
    sub.add_argument("--gamma", type=float, default=None, help="step multiplier (default: the learner's)")
    sub.add_argument("--max-new-tokens", type=int, default=32)
    sub.add_argument("--compare", action="store_true", help="also answer without the bank")
    common(sub, None)
    sub.set_defaults(run=ask)

    sub = commands.add_parser(
        "push", help="upload a saved learner or bank directory to a Hub repo, with its model card"
    )
    sub.add_argument("path", help="a directory written by save_pretrained or build-bank")
    sub.add_argument("repo_id", help="the repo, e.g. user/my-learner (created if needed)")
    sub.add_argument("--subfolder", default=None, help="folder of the repo to write to, e.g. bank")
    sub.add_argument("--revision", default=None, help="branch to push to (created from main if needed)")
    sub.add_argument("--private", action="store_true", help="create the repo as private")
    sub.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    sub.add_argument("--commit-message", default=None)
    sub.add_argument("--token", default=None, help="Hub token (default: the saved login)")
    sub.set_defaults(run=push)

    sub = commands.add_parser("pull", help="download a learner or bank repo (data files only) to a directory")
    sub.add_argument("repo_id", help="the repo, e.g. user/my-learner")
    sub.add_argument("directory", help="where to put its files")
    sub.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    sub.add_argument("--token", default=None, help="Hub token (default: the saved login)")
    sub.set_defaults(run=pull)

    sub = commands.add_parser(
        "eval",
        help="compare ReGrad with closed-book, no-adaptation, RAG, CPT, raw gradients and ReGrad+ICL on a dataset, "
        "with drift; writes results.json, report.md and PNG plots",
    )
    sub.add_argument("--dataset", required=True, choices=["squad", "hotpotqa", "tofu", "jsonl"], help="data format")
    sub.add_argument("--data", help="the data file (default: the project's shared/data file for the format)")
    sub.add_argument(
        "--split",
        help="squad: train/dev/test or article indices like 35-39; tofu: author indices like 0-39 (default: all)",
    )
    sub.add_argument("--limit", type=int, help="questions to evaluate, sampled with --seed (the bank is unchanged)")
    sub.add_argument("--top-k", type=int, help="documents retrieved per question (default: the learner's)")
    sub.add_argument("--oracle", action="store_true", help="use each question's gold documents instead of retrieval")
    sub.add_argument("--methods", default=",".join(METHOD_NAMES), help=f"comma-separated, of {','.join(METHOD_NAMES)}")
    sub.add_argument("--output", required=True, help="directory for results.json, report.md and the plots")
    sub.add_argument("--max-new-tokens", type=int, default=24)
    sub.add_argument("--gamma", type=float, help="ReGrad step multiplier (default: the learner's)")
    sub.add_argument(
        "--system-prompt", help="system turn of every method's prompt, or 'none' (default: the learner's template)"
    )
    sub.add_argument("--user-template", help="user turn with {question} and {context} (default: the learner's)")
    sub.add_argument("--document-template", help="each document in {context}: {document}, {index} (default: learner's)")
    sub.add_argument(
        "--bank-cache", help="directory to build the learner's bank into, reused by later runs on the same documents"
    )
    sub.add_argument("--answer-stop", choices=["line", "turn"], help="where answers end (default: the learner's)")
    sub.add_argument("--cpt-mode", default="full", choices=["full", "lora"], help="CPT trains all weights or a LoRA")
    sub.add_argument("--cpt-epochs", type=int, default=1, help="CPT passes over the bank documents (default 1)")
    sub.add_argument("--cpt-lr", type=float, default=2e-5, help="CPT AdamW learning rate (default 2e-5)")
    sub.add_argument("--drift-n", default="10,100", help="document counts to measure drift at, or 'none'")
    sub.add_argument("--drift-methods", default="regrad,cpt", help="methods whose drift is measured")
    sub.add_argument("--drift-heldout", type=int, default=20, help="bank documents held out for perplexity")
    sub.add_argument("--probes", nargs="*", help="multiple-choice probe files (default: world_facts, real_authors)")
    sub.add_argument("--probe-limit", type=int, help="use only the first N questions of each probe file")
    sub.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the 95%% intervals")
    sub.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub.add_argument("--command-line", help=argparse.SUPPRESS)
    common(sub, default_learner())
    sub.set_defaults(run=evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # its options come from HfArgumentParser over the training arguments
        from .train_cli import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
