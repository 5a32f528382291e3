"""What `regrad eval` writes: `results.json`, `report.md` and PNG plots (matplotlib, the `eval` extra)."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from pathlib import Path

from ..errors import MissingPackageError
from ..files import atomic_write_bytes, atomic_write_text
from .methods import LABELS

PLOTS = {
    "f1": "f1_per_method.png",
    "tokens": "f1_vs_prompt_tokens.png",
    "drift": "drift_vs_n.png",
}


PLOTTING_INSTALL = "pip install 'regrad-hf[eval]' (or pip install matplotlib)"


def require_matplotlib() -> None:
    """Checks that matplotlib, which draws the plots of [`write_report`], can be imported. `regrad eval` calls it
    before any work, so that a missing matplotlib fails at once rather than after the whole evaluation.

    Raises:
        [`MissingPackageError`]: matplotlib is not installed; the message names the install command.
    """
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError as error:
        raise MissingPackageError(f"the evaluation plots need matplotlib: {PLOTTING_INSTALL}") from error


def _figure(width: float, height: float):
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110)


def _save(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def _errors(summary: Mapping, methods, metric: str) -> tuple[list[float], list[list[float]]]:
    means = [summary[m][metric]["mean"] for m in methods]
    lows = [max(0.0, mean - summary[m][metric]["ci95"][0]) for m, mean in zip(methods, means, strict=True)]
    highs = [max(0.0, summary[m][metric]["ci95"][1] - mean) for m, mean in zip(methods, means, strict=True)]
    return means, [lows, highs]


def plot_f1(results: Mapping, path: Path) -> None:
    """Bar chart: F1 and answer-contained accuracy of each method with their 95 % bootstrap intervals."""
    methods = results["methods"]
    figure = _figure(7.5, 4.0)
    axes = figure.add_subplot()
    positions = list(range(len(methods)))
    for offset, metric, label, color in ((-0.2, "f1", "F1", "tab:gray"), (0.2, "contained", "contained", "tab:red")):
        means, errors = _errors(results["summary"], methods, metric)
        axes.bar([p + offset for p in positions], means, width=0.4, yerr=errors, capsize=3, color=color, label=label)
    axes.set_xticks(positions, [LABELS[m] for m in methods], rotation=25, ha="right", fontsize=8)
    axes.set_ylabel("score")
    axes.legend(fontsize=8)
    axes.set_title(f"F1 and answer contained per method, 95 % bootstrap CI ({len(results['questions'])} questions)")
    _save(figure, path)


def plot_f1_vs_tokens(results: Mapping, path: Path) -> None:
    """Scatter: F1 against mean prompt tokens per question, one point per method."""
    methods = results["methods"]
    means, errors = _errors(results["summary"], methods, "f1")
    tokens = [results["summary"][m]["prompt_tokens"] for m in methods]
    figure = _figure(6.5, 4.0)
    axes = figure.add_subplot()
    axes.errorbar(tokens, means, yerr=errors, fmt="o", capsize=4, color="tab:blue")
    for x, y, method in zip(tokens, means, methods, strict=True):
        axes.annotate(LABELS[method], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    axes.set_xlabel("prompt tokens per question (mean)")
    axes.set_ylabel("F1")
    axes.set_title("F1 against prompt length")
    _save(figure, path)


def plot_drift(results: Mapping, path: Path) -> None:
    """Probe accuracies and held-out perplexity against the number of injected documents N (symlog axis)."""
    drift = results["drift"]
    methods = [m for m in ("regrad", "cpt") if m in drift]
    panels = [*drift["probes"], "heldout_perplexity"]
    figure = _figure(4.0 * len(panels), 3.6)
    for index, panel in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        for method, marker in zip(methods, ("o", "s"), strict=False):
            points = drift[method]["measurements"]
            values = [p[panel] if panel == "heldout_perplexity" else p[panel]["accuracy"] for p in points]
            axes.plot(drift[method]["n"], values, marker=marker, label=LABELS[method])
        axes.set_xscale("symlog", linthresh=10)
        axes.set_xlabel("documents injected (N)")
        axes.set_ylabel("perplexity" if panel == "heldout_perplexity" else "accuracy")
        axes.set_title("held-out perplexity" if panel == "heldout_perplexity" else f"{panel} probes")
        axes.legend(fontsize=7)
    _save(figure, path)


def _interval(entry: Mapping, digits: int = 3) -> str:
    low, high = entry["ci95"]
    if math.isnan(entry["mean"]):
        return "n/a"
    return f"{entry['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _penalty(penalty: float) -> str:
    if penalty == 1.0:
        return ", with no repetition penalty"
    return f", decoded with a repetition penalty of {penalty:g} on each answer's own word tokens (digits exempt)"


def _decoding(run: dict) -> str:
    """How answers were decoded: greedy, or beam search of the run's width (runs saved before it existed: greedy)."""
    beams = run.get("num_beams", 1)
    return "greedy" if beams == 1 else f"beam-search ({beams} beams)"


def _prompt(prompt: Mapping) -> str:
    system = "no system turn" if prompt["system_prompt"] is None else f"system turn {prompt['system_prompt']!r}"
    stop = "the end of the first line or of the turn" if prompt["answer_stop"] == "line" else "the end of the turn"
    return (
        f"{system}; user turn {prompt['user_template']!r}, each document written as "
        f"{prompt['document_template']!r}; answers end at {stop}"
        f"{_penalty(prompt.get('answer_repetition_penalty', 1.0))}."
    )


def _optional(summary: Mapping, metric: str) -> str:
    """A metric's cell, or `n/a` for a run without it (the probe switched off, or results saved before it existed)."""
    return _interval(summary[metric]) if metric in summary else "n/a"


def results_table(results: Mapping) -> str:
    """The main table of the report, in markdown."""
    lines = [
        "| method | EM [95% CI] | F1 [95% CI] | F1 beyond the question [95% CI] | contained [95% CI] | repetition "
        "| answer NLL [95% CI] | probe accuracy [95% CI] | first-token NLL [95% CI] | first-token top-1 [95% CI] "
        "| prompt tokens | s / question |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in results["methods"]:
        s = results["summary"][method]
        lines.append(
            f"| {LABELS[method]} | {_interval(s['exact_match'])} | {_interval(s['f1'])} | "
            f"{_interval(s['f1_beyond_question'])} | {_interval(s['contained'])} | {s['repetition']['mean']:.3f} | "
            f"{_interval(s['answer_nll'])} | {_optional(s, 'probe_accuracy')} | {_optional(s, 'first_token_nll')} | "
            f"{_optional(s, 'first_token_top1')} | {s['prompt_tokens']:.1f} | {s['seconds_per_question']:.2f} |"
        )
    return "\n".join(lines)


def _probe_note(results: Mapping) -> str:
    """What the probe columns mean, and on how many questions the probe ran."""
    probe = results.get("probe")
    if probe is None:
        ran = "the knowledge probe was off in this run"
    else:
        ran = f"it ran on {probe['questions']} of {len(results['questions'])} questions"
        if probe["questions"] < len(results["questions"]):
            ran += " (the others have too few distinct answers among the other questions)"
    return (
        " Probe accuracy (format-free knowledge): the share of questions whose reference answer has the highest mean "
        "token log-probability, teacher-forced after the method's own prompt and adaptation, among itself and 3 "
        "answers of other questions of the set (seeded; chance 0.25; a tie counts as wrong); first-token NLL and "
        f"top-1: the reference answer's first token after the prompt, and whether it is the greedy next token; {ran}."
    )


def drift_table(results: Mapping) -> str:
    """Drift against N, in markdown."""
    drift = results["drift"]
    probes = list(drift["probes"])
    header = " | ".join(f"{name} accuracy (right-option log-prob)" for name in probes)
    lines = [
        f"| method | N | {header} | held-out perplexity | weights changed (tensors / elements) | relative L2 change |",
        "|---|---|" + "---|" * len(probes) + "---|---|---|",
    ]
    for method in ("regrad", "cpt"):
        if method not in drift:
            continue
        record = drift[method]
        for n, point, weights in zip(record["n"], record["measurements"], record["weights"], strict=True):
            cells = " | ".join(f"{point[p]['accuracy']:.3f} ({point[p]['gold_logprob']:.4f})" for p in probes)
            lines.append(
                f"| {LABELS[method]} | {n} | {cells} | {point['heldout_perplexity']:.3f} | "
                f"{weights['changed_tensors']} / {weights['changed_elements']:,} | {weights['relative_l2']:.2e} |"
            )
    return "\n".join(lines)


def _examples(results: Mapping, count: int = 3) -> str:
    blocks = []
    for record in results["questions"][:count]:
        lines = [f"- **Q:** {record['question']} (gold: {' / '.join(record['answers'])}; retrieved "
                 f"{', '.join(record['retrieved_ids'])}, gold {', '.join(record['gold_ids'])})"]  # fmt: skip
        for method, answer in record["methods"].items():
            prediction = answer["prediction"].replace("\n", " ").replace("|", "/")[:120]
            lines.append(f"  - {LABELS[method]}: {prediction!r} (F1 {answer['f1']:.2f})")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def render_report(results: Mapping) -> str:
    """`report.md`: setup, the table, the plots, drift and the integrity check."""
    run = results["run"]
    retrieval = "gold documents (oracle)" if run["oracle"] else f"top-{results['top_k']} retrieval over the bank"
    cpt = results.get("cpt")
    integrity = results["integrity"]
    parts = [
        f"# ReGrad evaluation: {run['dataset']}",
        "",
        f"- Command: `{run['command']}`",
        f"- Base model: `{run['base_model']}` ({run['base_model_revision']}); learner: `{run['learner']}` "
        f"(fingerprint `{run['fingerprint'][:16]}`)",
        f"- Learner training: {run['learner_note']}",
        f"- Data: {run['data_note']}. {len(results['questions'])} questions (sampled with seed {run['seed']}), "
        f"bank of {run['bank_documents']} documents; {retrieval}; retrieval recall@k "
        f"{_interval(results['retrieval']['recall_at_k'])}.",
        f"- Seed {run['seed']} (question sample, untrained LoRA start, CPT document order, drift stream, bootstrap); "
        f"{_decoding(run)} answers of at most {run['max_new_tokens']} tokens; gamma {run['gamma']}; torch threads "
        f"{run['torch_threads']}; {run['seconds']:.0f} s in all.",
        f"- Prompt, the same for every method (documents only for RAG and ReGrad+ICL): {_prompt(results['prompt'])}",
        "- Closed-book and RAG use the base model (LoRA layers switched off); raw gradients start from an untrained "
        "LoRA (B = 0, so without a step it is the base model) with step size `init_step_size`.",
    ]
    if cpt:
        change = cpt["weight_change"]
        parts.append(
            f"- CPT: {cpt['mode']} fine-tuning on the {cpt['documents']} gold documents of the evaluated questions "
            f"(the documents the questions need, as in CaMeLS-style evaluations), {cpt['epochs']} "
            f"epoch(s), AdamW lr {cpt['learning_rate']}, one document per step ({cpt['steps']} steps, "
            f"{cpt['train_seconds']:.0f} s); LM loss {cpt['first_loss']:.3f} (first step) -> "
            f"{cpt['last_epoch_mean_loss']:.3f} (mean of the last epoch; "
            f"{cpt.get('truncated_documents', 0)} document(s) truncated to the learner's max_document_tokens, as for "
            "ReGrad's gradients); it changed "
            f"{change['changed_elements']:,} of {change['total_elements']:,} weights (relative L2 "
            f"{change['relative_l2']:.2e}) and they stay changed."
        )
    timings = results["timings"]
    build, used = timings["bank_build_seconds"], timings.get("bank_gradient_documents", run["bank_documents"])
    computed = timings.get("bank_computed_documents", used)
    parts.append(
        f"- Offline: retrieval searches all {run['bank_documents']} documents by their embeddings; the ReGrad bank "
        f"holds the gradients of the {used} that some question retrieves (the others are never stepped on): "
        f"{computed} computed in this run"
        + (f" ({build:.0f} s, {build / computed:.2f} s per document)" if computed else "")
        + (f", {used - computed} loaded from the --bank-cache of an earlier run" if computed < used else "")
        + ". Seconds per question below are online (retrieval, gradient step and restore, NLL and generation)."
    )
    parts += [
        "",
        "## Answers",
        "",
        "EM and F1 with SQuAD v1.1 normalisation; F1 beyond the question: F1 over the words not in the question, so "
        "that restating the question scores nothing (the metric for sentence answers such as TOFU's); contained: the "
        "normalised gold answer appears (whole words) in the normalised prediction (best over the gold answers), fair "
        "to a method that answers in sentences; repetition: "
        "the share of answers with a repeated word 3-gram; answer NLL is the teacher-forced mean NLL of the reference "
        "answer (and end of turn) after each method's prompt; 95 % percentile bootstrap intervals "
        f"({run['bootstrap_resamples']} resamples, seed {run['seed']})." + _probe_note(results),
        "",
        results_table(results),
        "",
        f"![F1 and contained per method]({PLOTS['f1']})",
        "",
        f"![F1 against prompt tokens]({PLOTS['tokens']})",
    ]
    if "drift" in results:
        drift = results["drift"]
        parts += [
            "",
            "## Drift",
            "",
            f"After injecting N documents: the {drift['stream_documents']} gold documents of the evaluated questions, "
            "in CPT's seeded training order (ReGrad cycles through them when N is larger; CPT stops at its training "
            f"length, and its last point is the CPT model of the table above). Held-out perplexity is measured on "
            f"{drift['heldout_documents']} bank document{'s' if drift['heldout_documents'] != 1 else ''} that "
            f"{'are' if drift['heldout_documents'] != 1 else 'is'} gold for no evaluated question. Probes: "
            + ", ".join(f"{name} ({count} questions)" for name, count in drift["probes"].items())
            + ", each option scored by the mean log-probability of its tokens after the question's chat prompt "
            "(length-normalised); the highest score is the model's choice; the mean right-option log-probability is "
            "in brackets. ReGrad is measured on the learner at rest after N inject / restore cycles; CPT from the "
            "base model after N one-document optimiser steps. Weights are compared byte for byte with a snapshot "
            "taken before the first injection.",
            "",
            drift_table(results),
            "",
            f"![Drift against N]({PLOTS['drift']})",
        ]
    parts += [
        "",
        "## Integrity",
        "",
        f"After the whole run (every method{', drift included' if 'drift' in results else ''}) the ReGrad model is "
        + (
            f"**identical byte for byte** to before: 0 of {integrity['total_elements']:,} parameter and buffer "
            "elements changed."
            if integrity["identical"]
            else f"**changed**: {integrity['changed_elements']:,} elements of {integrity['changed_tensors']} tensors."
        ),
        "",
        "## Examples",
        "",
        _examples(results),
        "",
    ]
    return "\n".join(parts)


def write_report(results: Mapping, output: str | Path) -> dict[str, Path]:
    """Writes `results.json`, the plots and `report.md` into `output`.

    Returns:
        `dict[str, Path]`: the written files by kind (`results`, `report`, and one per plot).
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written = {"results": output / "results.json"}
    atomic_write_text(written["results"], json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    plot_f1(results, output / PLOTS["f1"])
    plot_f1_vs_tokens(results, output / PLOTS["tokens"])
    written["f1"], written["tokens"] = output / PLOTS["f1"], output / PLOTS["tokens"]
    if "drift" in results:
        plot_drift(results, output / PLOTS["drift"])
        written["drift"] = output / PLOTS["drift"]
    written["report"] = output / "report.md"
    atomic_write_text(written["report"], render_report(results))
    return written
