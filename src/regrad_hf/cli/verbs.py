"""The verbs of the `regrad` command: `regrad demo`, `regrad build-bank`, `regrad ask`, `regrad eval`, `regrad push`,
`regrad pull` (`regrad train` is [`regrad_hf.cli.train`]); their options are in [`regrad_hf.cli.options`]."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..defaults import shipped_learner_path
from ..errors import ReGradValueError
from ..names import missing_location, missing_path_message

# The options live in .options (imported without torch); METHOD_NAMES is re-exported for callers of this module.
from .documents import load_documents, read_documents, read_questions  # noqa: F401  (read_documents: tests)
from .options import FRESH, METHOD_NAMES  # noqa: F401

LEARNER_SUBDIR = "learner"
# `regrad eval`'s default drift probes: the multiple-choice sets of TOFU on the Hub (configuration names).
HUB_PROBES = ("world_facts", "real_authors")
HUB_PROBES_REPO = "locuslab/TOFU"


def check_location(name: str, what: str) -> None:
    """A learner or bank given on the command line: a local directory, or a name that can be a Hub repo id (then
    the Hub is asked, and its answer names both). A path-like name that does not exist is a typo: say so."""
    if name != FRESH and (problem := missing_location(name, f"{what} directory")):
        raise ReGradValueError(problem)


def log_to_stderr() -> None:
    """Shows regrad-hf's own INFO messages (not other libraries') on stderr."""
    import logging

    logger = logging.getLogger("regrad_hf")  # has regrad_hf's own stderr handler (regrad_hf.log)
    logger.setLevel(logging.INFO)


def load_learner(learner: str | None, seed: int):
    """A saved learner; `"fresh"` for an untrained one on the embedded base model (seeded, so runs repeat)."""
    import torch

    from ..modeling.causal_lm import ReGradForCausalLM

    if learner != FRESH:
        check_location(learner, "learner")
        return ReGradForCausalLM.from_pretrained(learner)
    torch.manual_seed(seed)
    return ReGradForCausalLM.from_base()


def answer(model, question: str, max_new_tokens: int, documents: list[str] | None = None, **retrieval) -> str:
    """Greedy answer to `question`, asked with the learner's prompt template (`documents` in it, for RAG) and decoded
    by its generation config (stop rule, repetition penalty), cut at the stop rule."""
    tokenizer, template = model.tokenizer, model.prompt_template
    inputs = tokenizer(template.build(tokenizer, question, documents), return_tensors="pt", add_special_tokens=False)
    length = inputs["input_ids"].shape[1]
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, **retrieval)
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

    from ..bank import GradientBank
    from ..bank.checkpoint import resume_message

    check_bank_output(Path(args.output).expanduser(), args.overwrite)
    texts, ids, metadata = load_documents(args.documents, args.text_column, args.id_column, args.split)
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
    if rank == 0:
        model.save_pretrained(output / LEARNER_SUBDIR)  # `ask` needs the very learner the bank was built with
        print(f"saved {bank} to {output}")
    return 0


def check_bank_output(output: Path, overwrite: bool) -> None:
    """`build-bank --output`: refuses a directory that holds a finished bank, unless `--overwrite` is given. An
    interrupted build (its state kept beside or inside `output`) is not refused: rerunning the command resumes it.

    Raises:
        [`ReGradValueError`]: `output` holds a bank and `overwrite` is `False`.
    """
    from ..bank.checkpoint import find_state
    from ..bank.directory import CONFIG_FILE

    if overwrite or not (output / CONFIG_FILE).is_file() or find_state(output.resolve()) is not None:
        return
    raise ReGradValueError(
        f"{output} already holds a bank ({CONFIG_FILE}): pass --overwrite to replace it, or choose another --output"
    )


def check_not_a_learner(bank_dir: Path, name: str) -> None:
    """`ask --bank`: a learner directory (what `save_pretrained` writes) given where a bank belongs is named as such.

    Raises:
        [`ReGradValueError`]: `bank_dir` is a saved learner and not a bank.
    """
    from ..bank.directory import CONFIG_FILE
    from ..modeling.learner_files import CONFIG_FILE as LEARNER_CONFIG
    from ..modeling.learner_files import LEARNER_FILE

    if (bank_dir / CONFIG_FILE).is_file() or not all((bank_dir / f).is_file() for f in (LEARNER_CONFIG, LEARNER_FILE)):
        return
    raise ReGradValueError(
        f"{name} is a learner ({LEARNER_CONFIG} + {LEARNER_FILE}), not a bank: pass it as --learner, and as --bank a "
        "directory written by `regrad build-bank`"
    )


def ask(args: argparse.Namespace) -> int:
    from ..bank import GradientBank

    check_location(args.bank, "bank")
    bank_dir = Path(args.bank)
    check_not_a_learner(bank_dir.expanduser(), args.bank)
    learner = args.learner or str(bank_dir / LEARNER_SUBDIR)
    if args.learner is None and not Path(learner).is_dir():
        where = f"{bank_dir} has no {LEARNER_SUBDIR}/ folder" if bank_dir.is_dir() else f"{bank_dir} is not local"
        raise ReGradValueError(f"{where}: pass --learner (the learner the bank was built with)")
    bank = GradientBank.from_pretrained(args.bank)
    if args.top_k is not None and args.top_k > len(bank):
        raise ReGradValueError(f"--top-k {args.top_k} is larger than the bank, which holds {len(bank)} documents")
    model = load_learner(learner, args.seed)
    model.attach_bank(bank)
    top_k = min(model.config.top_k_docs, len(bank)) if args.top_k is None else args.top_k
    for question in args.question:
        hits = model.bank.search(question, top_k)
        print(f"Q: {question}")
        print("   retrieved: " + ", ".join(f"{hit.id} ({hit.score:.2f})" for hit in hits))
        print(f"   ReGrad:    {answer(model, question, args.max_new_tokens, top_k_docs=top_k, gamma=args.gamma)}")
        if args.compare:
            print(f"   no bank:   {answer(model, question, args.max_new_tokens, use_bank=False)}")
    return 0


def demo(args: argparse.Namespace) -> int:
    """Builds a bank from the example documents and answers each example question closed-book (the base model),
    with ReGrad and with RAG (the base model, the retrieved documents in the prompt); says which answers contain the
    expected one, and what to expect of a 135M model."""
    from ..bank import GradientBank
    from ..evaluation.metrics import answer_contained

    texts, ids, metadata = read_documents(Path(args.documents))
    questions = read_questions(Path(args.questions))
    if args.top_k > len(texts):
        raise ReGradValueError(f"--top-k {args.top_k} is larger than the bank, which holds {len(texts)} documents")
    model = load_learner(args.learner, args.seed)
    print(f"base model: {model.config.base_model_name_or_path} ({model.config.base_model_revision})")
    print(
        f"learner: {'fresh (not meta-trained)' if not args.learner else args.learner}, "
        f"{sum(p.numel() for p in model.lora_parameters().values()):,} LoRA parameters, "
        f"step size {model.step_sizes.values().mean().item():.3g}, gamma {args.gamma}"
    )
    bank = GradientBank.build(model, texts, ids=ids, metadata=metadata)
    model.attach_bank(bank)
    if args.learner != FRESH and Path(args.learner).resolve() == shipped_learner_path().resolve():
        print("meta-trained on SQuAD, TOFU and HotpotQA tasks of 3 documents each: see its TRAINING.md")
    print(f"bank: {bank}\n")

    methods = ("closed-book", "ReGrad", "RAG")
    found = dict.fromkeys(methods, 0)
    for item in questions:
        question, expected = item["question"], item.get("answer")
        hits = bank.search(question, args.top_k)
        print(f"Q: {question}   (expected: {expected or '?'})")
        print("   retrieved:   " + ", ".join(f"{hit.id} ({hit.score:.2f})" for hit in hits))
        if item.get("doc_id") in bank:
            before = document_nll(model, bank.document(item["doc_id"]).text)
            with model.retrieved(question, args.top_k, gamma=args.gamma):
                after = document_nll(model, bank.document(item["doc_id"]).text)
            print(f"   NLL of its source document without / with ReGrad: {before:.3f} / {after:.3f}")
        with model.disable_adapter():  # the base model, asked with the same prompt: without and with the documents
            closed_book = answer(model, question, args.max_new_tokens)
            rag = answer(model, question, args.max_new_tokens, [bank.document(hit.id).text for hit in hits])
        regrad = answer(model, question, args.max_new_tokens, top_k_docs=args.top_k, gamma=args.gamma)
        for method, text in zip(methods, (closed_book, regrad, rag), strict=True):
            contained = expected is not None and answer_contained(text, [expected]) == 1.0
            found[method] += contained
            mark = "  [contains the answer]" if contained else ""
            print(f"   {method + ':':<13}{text}{mark}")
        print()
    if any(item.get("answer") for item in questions):
        counts = ", ".join(f"{method} {count}/{len(questions)}" for method, count in found.items())
        print(f"answers that contain the expected one: {counts}")
        print(
            "What to expect at 135M parameters: one gradient step carries less than a pasted document, so RAG "
            "answers more of these than ReGrad (on SQuAD test its answers contain the gold answer 3.3x as often), "
            "while ReGrad's prompt stays as short as the closed-book one."
        )
    return 0


def folder_card(folder: Path, repo_id: str, subfolder: str | None) -> tuple[str, list[str]] | None:
    """The card of a saved learner or bank directory, and the repo files a push of it replaces; None if neither."""
    from safetensors import SafetensorError, safe_open

    from .. import bank
    from ..hub import cards
    from ..modeling import learner_files, learner_state

    if (folder / bank.CONFIG_FILE).is_file():
        bank_config = learner_files.read_json_object(folder / bank.CONFIG_FILE, "bank config")
        return cards.render_bank_card(bank_config, repo_id=repo_id, subfolder=subfolder), [f"{bank.GRADIENTS_DIR}/*"]
    config_path = learner_files.learner_file(folder, learner_files.CONFIG_FILE)
    learner_path = learner_files.learner_file(folder, learner_files.LEARNER_FILE)
    if config_path.is_file() and learner_path.is_file():
        config = learner_files.read_config(config_path)
        try:
            with safe_open(str(learner_path), framework="pt") as learner:
                fingerprint, names = (learner.metadata() or {}).get("fingerprint", "unknown"), list(learner.keys())
        except SafetensorError as error:
            raise ReGradValueError(f"{learner_path} is not a readable learner file ({error})") from error
        learner_keys = (learner_state.STEP_SIZES_KEY, learner_state.TRANSFORM_KEY)
        lora_tensors = len([name for name in names if name not in learner_keys])
        return cards.render_model_card(
            config, fingerprint=fingerprint, num_lora_tensors=lora_tensors, repo_id=repo_id
        ), []
    return None


def push(args: argparse.Namespace) -> int:
    from ..hub.repos import push_folder

    folder = Path(args.path)
    if not folder.is_dir():
        raise ReGradValueError(missing_path_message(folder, "directory"))
    try:
        found = folder_card(folder, args.repo_id, args.subfolder)
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # hand-edited, truncated, not UTF-8: typed too
        detail = f"no {error}" if isinstance(error, KeyError) else str(error)
        raise ReGradValueError(f"{folder} has a damaged config ({detail}): rebuild or re-save it") from error
    if found is None:
        raise ReGradValueError(
            f"{folder} is neither a saved learner (config.json + learner.safetensors) nor a bank (bank_config.json)"
        )
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
    from ..hub.repos import pull as pull_repo

    directory = pull_repo(args.repo_id, args.directory, revision=args.revision, token=args.token)
    print(f"pulled {args.repo_id} to {directory}")
    return 0


def learner_note(learner: str) -> str:
    """What the report says about how the learner was trained (ReGrad+ICL depends on it)."""
    if learner == FRESH:
        return "fresh, not meta-trained (peft init, B = 0): ReGrad is then a raw-gradient step with the init step size"
    if Path(learner).resolve() == shipped_learner_path().resolve():
        return (
            "the shipped learner, meta-trained blind (question-only prompts) on the mixed train split (SQuAD "
            "articles 0-29, TOFU authors 0-119, HotpotQA records 0-349), each task with its gold document(s) and "
            "hard distractors, 3 documents (its TRAINING.md); ReGrad+ICL shows it documents in the prompt, which it "
            "never saw in training (no learner trained with blind=False is shipped)"
        )
    return "a saved learner; whether it was trained blind or with documents in the prompt is not in its config"


def eval_prompt(config, args: argparse.Namespace):
    """The prompt of every method: the learner's template, with the fields given on the command line replaced (`\\n`
    in them is a newline; `--system-prompt none` sends no system turn)."""
    from ..config import PROMPT_FIELDS
    from ..prompting import PromptTemplate, template_fields

    fields = template_fields({name: getattr(args, name) for name in PROMPT_FIELDS})
    learner = PromptTemplate.from_config(config)
    return PromptTemplate(**{**vars(learner), **fields})


def evaluate(args: argparse.Namespace) -> int:
    """Runs every method on a dataset and writes results.json, report.md and the plots to --output."""
    import shlex

    from ..evaluation import (
        CPTConfig,
        EvalConfig,
        SGDCeilingConfig,
        load_eval_set,
        load_probes,
        run_evaluation,
        write_report,
    )
    from ..evaluation.datasets import parse_range
    from ..evaluation.methods import check_methods
    from ..evaluation.report import require_matplotlib

    if args.dataset == "jsonl" and args.data is None:
        raise ReGradValueError("--dataset jsonl needs --data PATH (a JSONL file of tasks)")
    require_matplotlib()  # the plots come last: a missing matplotlib must not cost a whole evaluation first
    drift_ns = [] if args.drift_n in ("", "none") else parse_range(args.drift_n)
    methods = check_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    eval_set = offline_hint(load_eval_set, "--data PATH")(args.dataset, args.data, args.split, args.limit, args.seed)
    probes = {}
    if drift_ns and args.probes is not None:
        probes = {Path(path).stem: load_probes(path)[: args.probe_limit] for path in args.probes}
    elif drift_ns:
        from ..data.sources import read_rows

        read = offline_hint(read_rows, "--probes FILE ... or --drift-n none")
        probes = {name: load_probes(read(HUB_PROBES_REPO, config=name))[: args.probe_limit] for name in HUB_PROBES}
    config = EvalConfig(
        methods=methods,
        top_k=args.top_k,
        oracle=args.oracle,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        gamma=args.gamma,
        cpt=CPTConfig(args.cpt_mode, args.cpt_epochs, args.cpt_lr, args.seed),
        sgd=SGDCeilingConfig(args.sgd_steps, args.sgd_lr),
        drift_ns=drift_ns,
        drift_methods=[m.strip() for m in args.drift_methods.split(",") if m.strip()],
        drift_heldout=args.drift_heldout,
        bootstrap_resamples=args.bootstrap,
        show_progress=not args.no_progress,
        bank_cache=args.bank_cache,
        probe=args.probe,
    )
    model = load_learner(args.learner, args.seed)
    config.prompt = eval_prompt(model.config, args)
    command = (
        "regrad " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if args.command_line is None else args.command_line
    )
    run_info = {"command": command, "learner": args.learner, "learner_note": learner_note(args.learner)}
    results = run_evaluation(model, eval_set, config, probes, run_info=run_info)
    written = write_report(results, args.output)
    from ..evaluation.report import results_table

    print(results_table(results))
    print(f"wrote {', '.join(str(path) for path in written.values())}")
    return 0 if results["integrity"]["identical"] else 1


def offline_hint(load, option: str):
    """`load`, whose Hub errors (offline, no such dataset) also say which option reads local data instead."""
    from ..errors import ReGradHubError

    def wrapped(*args, **kwargs):
        try:
            return load(*args, **kwargs)
        except ReGradHubError as error:
            raise ReGradHubError(f"{error}; pass {option} to use local data") from error

    return wrapped
