"""Drift: does injecting N documents change what the model knows in general?

General capability is measured with multiple-choice probes (TOFU's `world_facts.json` and `real_authors.json`),
scored by log-likelihood: each option is scored by the mean log-probability of its tokens after the question's
prompt (length-normalised, so long options are not penalised), and the highest-scoring option is the model's
choice. Perplexity is measured on held-out paragraphs that are never injected. Every parameter and buffer is
compared byte for byte with a snapshot taken before the injections.

ReGrad applies each document's step and restores the LoRA tensors bit for bit, so it must show no change at all;
continual pre-training (CPT) writes the weights and shows its measured change.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..adaptation.deltas import tokenize_document, truncation_report
from ..data.records import field, mapping, parse_json, text_at
from ..data.sources import is_dataset, read_text_file
from ..errors import ReGradValueError
from ..log import progress_bar
from ..prompting import PromptTemplate
from .methods import ContinualPretraining
from .probe import candidate_log_probs

# Tokens of each injected document run through the adapted model during a ReGrad drift run.
_INJECTION_FORWARD_TOKENS = 64


@dataclass(frozen=True)
class Probe:
    """A multiple-choice question: `options[answer]` is right."""

    question: str
    options: tuple[str, ...]
    answer: int


def load_probes(path: str | os.PathLike | Sequence[Mapping]) -> list[Probe]:
    """Reads TOFU-style probes: a JSON list of `{"question", "option1".., "answer"}` (answer = the right option's
    text), from a file or already loaded (e.g. a `datasets.Dataset` of TOFU's `world_facts`).

    Raises:
        [`ReGradValueError`]: the file is not a JSON list of such objects, or a probe has fewer than two options or
            an answer that is none of them (the message names the probe).
    """
    probes = []
    is_file = isinstance(path, (str, os.PathLike))
    name = os.fspath(path) if is_file else "probe set"
    records = parse_json(read_text_file(path), name) if is_file else path
    if isinstance(records, (str, bytes, Mapping)) or not (isinstance(records, Sequence) or is_dataset(records)):
        raise ReGradValueError(f"{name} must be a JSON list of probes, not a {type(records).__name__}")
    for number, record in enumerate(records):
        where = f"{name} probe {number}"
        record = mapping(record, where)
        question = text_at(record, "question", where)
        options = tuple(str(record[key]) for key in sorted(k for k in record if str(k).startswith("option")))
        answer = field(record, "answer", where)
        if len(options) < 2:  # one option is always "right": the probe would measure nothing
            raise ReGradValueError(f"{where} has {len(options)} options (option1, option2, ...); it needs two or more")
        if answer not in options:
            raise ReGradValueError(f"{where}: answer {answer!r} is not one of {options}")
        probes.append(Probe(question, options, options.index(answer)))
    return probes


def option_scores(model, question: str, options: Sequence[str]) -> list[float]:
    """Mean log-probability per token of each option after the question's prompt (the learner's template; one padded
    forward pass, [`candidate_log_probs`])."""
    tokenizer = model.tokenizer
    text = PromptTemplate.from_config(model.config).build(tokenizer, question)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    encoded = [tokenizer(option.strip(), add_special_tokens=False)["input_ids"] for option in options]
    return candidate_log_probs(model, prompt, encoded)


def probe_accuracy(model, probes: Sequence[Probe], show_progress: bool = False, desc: str = "Probes") -> dict:
    """Accuracy on multiple-choice probes, and the mean length-normalised log-probability of the right options."""
    correct, gold = [], []
    for probe in progress_bar(probes, desc=desc, enabled=show_progress, leave=False):
        scores = option_scores(model, probe.question, probe.options)
        correct.append(float(max(range(len(scores)), key=scores.__getitem__) == probe.answer))
        gold.append(scores[probe.answer])
    count = max(1, len(probes))
    return {"accuracy": sum(correct) / count, "gold_logprob": sum(gold) / count, "correct": correct}


def perplexity(model, texts: Sequence[str]) -> float:
    """Perplexity of `texts` (token-weighted), each truncated to `config.max_document_tokens`."""
    total_nll, total_tokens = 0.0, 0
    for text in texts:
        ids = tokenize_document(model.tokenizer, text, model.config.max_document_tokens)
        input_ids = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            total_nll += model(input_ids=input_ids, labels=input_ids).loss.item() * (len(ids) - 1)
        total_tokens += len(ids) - 1
    return math.exp(total_nll / max(1, total_tokens))


def measure(model, probes: Mapping[str, Sequence[Probe]], heldout: Sequence[str], show_progress: bool = False) -> dict:
    """Probe accuracies (and right-option log-probabilities) and held-out perplexity of `model` as it is now."""
    result: dict = {}
    for name, items in probes.items():
        scores = probe_accuracy(model, items, show_progress, desc=f"Probe {name}")
        result[name] = {"accuracy": scores["accuracy"], "gold_logprob": scores["gold_logprob"]}
    result["heldout_perplexity"] = perplexity(model, heldout) if heldout else float("nan")
    return result


class WeightSnapshot:
    """A copy of every parameter and buffer of a module, for byte-for-byte comparison later."""

    def __init__(self, module: torch.nn.Module):
        self.tensors = {name: tensor.detach().clone() for name, tensor in _state(module).items()}

    def compare(self, module: torch.nn.Module) -> dict:
        """How `module` differs from the snapshot.

        Returns:
            `dict`: `identical` (every byte equal), `changed_tensors`, `changed_elements` (elements whose bytes
            differ), `total_elements`, `max_abs_change` and `relative_l2` (`||w - w0|| / ||w0||` over all
            floating-point tensors).
        """
        now = _state(module)
        if set(now) != set(self.tensors):
            raise ReGradValueError("the module's parameter names changed since the snapshot")
        changed_tensors = changed_elements = total = 0
        max_change, diff_sq, ref_sq = 0.0, 0.0, 0.0
        for name, before in self.tensors.items():
            after = now[name].detach()
            total += before.numel()
            if before.shape != after.shape or before.dtype != after.dtype:
                changed_tensors += 1
                changed_elements += before.numel()
                continue
            width = before.element_size()
            differs = (_bytes(before, width) != _bytes(after, width)).any(dim=1)
            count = int(differs.sum())
            if count:
                changed_tensors += 1
                changed_elements += count
            if before.is_floating_point():
                difference = (after.double() - before.double()).nan_to_num()
                if count:
                    max_change = max(max_change, difference.abs().max().item())
                diff_sq += difference.pow(2).sum().item()
                ref_sq += before.double().pow(2).sum().item()
        return {
            "identical": changed_tensors == 0,
            "changed_tensors": changed_tensors,
            "changed_elements": changed_elements,
            "total_elements": total,
            "max_abs_change": max_change,
            "relative_l2": math.sqrt(diff_sq / ref_sq) if ref_sq else 0.0,
        }


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _bytes(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """The raw bytes of a tensor, one row per element."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).reshape(-1, width)


@truncation_report()  # one warning for all the documents it truncates
def regrad_drift(
    model,
    stream: Sequence[str],
    ns: Sequence[int],
    probes: Mapping[str, Sequence[Probe]],
    heldout: Sequence[str],
    show_progress: bool = False,
) -> dict:
    """Measures the learner at rest after N inject / restore cycles, for each N in `ns` (cumulative).

    Each cycle injects one document through its bank gradient (`model.injected`), runs its first tokens through
    the adapted model and restores the LoRA tensors.

    Args:
        model ([`ReGradForCausalLM`]): the learner with a bank holding `stream`'s ids.
        stream (`Sequence[str]`): bank ids to inject, in order; cycled when N exceeds its length.
        ns (`Sequence[int]`): document counts to measure at (N = 0 is always measured).
        probes (`Mapping[str, Sequence[Probe]]`): named multiple-choice probe sets.
        heldout (`Sequence[str]`): held-out texts for perplexity (never injected).
        show_progress (`bool`): show progress bars.

    Returns:
        `dict`: `{"n": [0, *ns], "measurements": [...], "weights": [...]}`, one entry per N.
    """
    ns = _check_ns(stream, ns)
    snapshot = WeightSnapshot(model)
    record = {
        "n": [0],
        "measurements": [measure(model, probes, heldout, show_progress)],
        "weights": [snapshot.compare(model)],
    }
    # Plain truncation: the injected document's first tokens, not its LM-loss tokenisation.
    texts = {doc_id: model.bank.document(doc_id).text for doc_id in dict.fromkeys(stream)}
    tokens = {doc_id: model.tokenizer(text)["input_ids"][:_INJECTION_FORWARD_TOKENS] for doc_id, text in texts.items()}
    done = 0
    for n in ns:
        for index in progress_bar(range(done, n), desc=f"ReGrad drift to N={n}", enabled=show_progress):
            doc_id = stream[index % len(stream)]
            with model.injected([doc_id]), torch.no_grad():
                model(input_ids=torch.tensor([tokens[doc_id]], device=model.device))
        done = n
        record["n"].append(n)
        record["measurements"].append(measure(model, probes, heldout, show_progress))
        record["weights"].append(snapshot.compare(model))
    return record


@truncation_report()
def cpt_drift(
    cpt: ContinualPretraining,
    stream: Sequence[str],
    ns: Sequence[int],
    probes: Mapping[str, Sequence[Probe]],
    heldout: Sequence[str],
    show_progress: bool = False,
) -> dict:
    """Trains `cpt` along `stream` (one optimiser step per document) and measures it at each N in `ns`.

    Args:
        cpt ([`ContinualPretraining`]): the copy being fine-tuned; left trained on the first `max(ns)` documents.
        stream (`Sequence[str]`): document texts, in training order; N must not exceed its length.
        ns, probes, heldout, show_progress: as in [`regrad_drift`].

    Returns:
        `dict`: `{"n": [0, *ns], "measurements": [...], "weights": [...]}`.
    """
    ns = _check_ns(stream, ns)
    if ns[-1] > len(stream):
        raise ReGradValueError(f"CPT drift to N={ns[-1]} needs that many documents, the stream has {len(stream)}")
    snapshot = WeightSnapshot(cpt.model)
    record = {
        "n": [0],
        "measurements": [measure(cpt.model, probes, heldout, show_progress)],
        "weights": [snapshot.compare(cpt.model)],
    }
    done = 0
    for n in ns:
        cpt.train(stream[done:n], show_progress)
        done = n
        record["n"].append(n)
        record["measurements"].append(measure(cpt.model, probes, heldout, show_progress))
        record["weights"].append(snapshot.compare(cpt.model))
    return record


def _check_ns(stream: Sequence[str], ns: Sequence[int]) -> list[int]:
    ns = sorted(set(ns))
    if not stream or not ns or ns[0] < 1:
        raise ReGradValueError(f"drift needs documents to inject and document counts >= 1, got ns={ns}")
    return ns
