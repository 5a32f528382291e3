"""`regrad eval`'s whole run: build the banks, fine-tune the CPT copy, answer every question with every method,
measure drift, and check that the ReGrad model came out of it byte for byte unchanged."""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..adaptation.deltas import truncation_report
from ..bank import GradientBank
from ..defaults import load_embedder
from ..errors import ReGradValueError
from ..log import progress_bar
from ..prompting import PromptTemplate
from .datasets import EvalQuestion, EvalSet
from .drift import Probe, WeightSnapshot, cpt_drift, regrad_drift
from .methods import (
    DEFAULT_METHODS,
    RETRIEVING,
    ContinualPretraining,
    CPTConfig,
    MethodRunner,
    check_methods,
    untrained_learner_state,
)
from .metrics import (
    answer_contained,
    bootstrap_ci,
    exact_match,
    f1_beyond_question,
    f1_score,
    has_repetition,
    recall_at_k,
)
from .probe import PROBE_DISTRACTORS, PROBE_METRIC, probe_candidates, probe_fields
from .sgd_ceiling import SGDCeilingConfig

GRADIENT_METHODS = ("regrad", "regrad_icl")
# Per-question scores of each answer, summarised with bootstrap intervals.
ANSWER_METRICS = (
    "exact_match",
    "f1",
    "f1_beyond_question",
    "contained",
    "repetition",
    "answer_nll",
    "first_token_nll",
    "first_token_top1",
)


@dataclass
class EvalConfig:
    """Settings of an evaluation run.

    Args:
        methods (`Sequence[str]`): which of [`METHODS`] to run; defaults to all but the `sgd` diagnostic.
        top_k (`int`, *optional*): documents retrieved per question; defaults to the learner's `top_k_docs`.
        oracle (`bool`): inject / paste each question's gold documents instead of retrieving.
        seed (`int`): seed of everything random (untrained LoRA start, CPT order, bootstrap, drift stream).
        max_new_tokens (`int`): answer length.
        num_beams (`int`): beam search width of every method (1: greedy).
        gamma (`float`, *optional*): ReGrad step multiplier; defaults to the learner's.
        prompt ([`PromptTemplate`], *optional*): the prompt every method is asked with (instruction, layout, stop
            rule); defaults to the learner's own template.
        cpt ([`CPTConfig`]): the CPT baseline's settings.
        sgd ([`SGDCeilingConfig`]): the `sgd` ceiling's steps and learning rate.
        drift_ns (`Sequence[int]`): document counts N to measure drift at; empty skips drift. ReGrad cycles through
            the gold documents when N exceeds them; CPT is measured at the N below its training length and at it.
        drift_methods (`Sequence[str]`): methods whose drift is measured (`regrad`, `cpt`).
        drift_heldout (`int`): bank documents (gold for no evaluated question, so never trained on or injected)
            whose perplexity is measured.
        bootstrap_resamples (`int`): resamples of the confidence intervals (95 %, percentile).
        batch_size (`int`): documents per gradient batch when building banks.
        bank_cache (`str`, *optional*): a directory that keeps the learner's gradients of the evaluation set's
            documents between runs (a bank; each run adds the documents it needs and lacks).
        probe (`bool`): run the knowledge probe (see [`regrad_hf.evaluation.probe`]): rank the reference answer
            among itself and 3 other questions' answers by mean token log-probability after each method's prompt.
        show_progress (`bool`): progress bars.
    """

    methods: Sequence[str] = DEFAULT_METHODS
    top_k: int | None = None
    oracle: bool = False
    seed: int = 0
    max_new_tokens: int = 24
    num_beams: int = 1
    gamma: float | None = None
    prompt: PromptTemplate | None = None
    cpt: CPTConfig = field(default_factory=CPTConfig)
    sgd: SGDCeilingConfig = field(default_factory=SGDCeilingConfig)
    drift_ns: Sequence[int] = (10, 100)
    drift_methods: Sequence[str] = ("regrad", "cpt")
    drift_heldout: int = 20
    bootstrap_resamples: int = 1000
    batch_size: int = 8
    bank_cache: str | None = None
    probe: bool = True
    show_progress: bool = True


def _learner_bank(directory, model, ids: Sequence[str], texts: Mapping[str, str], embedder, show: bool):
    """The learner's bank of the documents `ids`: loaded from the cache `directory` when it has one for this learner,
    the documents it lacks computed and added (and the cache saved again); built in memory without a cache.

    Returns:
        `tuple[GradientBank, int]`: the bank (it may hold more documents than `ids`) and how many were computed now.
    """
    if directory is None or not (Path(directory) / "bank_config.json").is_file():
        bank = GradientBank.build(model, [texts[i] for i in ids], ids=list(ids), embedder_model=embedder,
                                  show_progress=show)  # fmt: skip
        if directory is not None:
            bank.save_pretrained(directory)
        return bank, len(ids)
    bank = GradientBank.from_pretrained(directory, embedder_model=embedder)
    bank.check_learner(model)
    if any(bank.document(i).text != texts[i] for i in ids if i in bank):
        raise ReGradValueError(f"the bank cache {directory} holds other documents; use another --bank-cache directory")
    missing = [i for i in ids if i not in bank]
    if missing:
        bank.add(model, [texts[i] for i in missing], ids=missing, show_progress=show)
        bank.save_pretrained(directory)
    return bank, len(missing)


def _whole_bank_ranking(embedder, questions: Sequence[EvalQuestion], texts: Mapping[str, str], k: int):
    """Exact cosine top-`k` over every document for each question (what the bank's exact search returns), timed per
    question. Retrieval needs only the embeddings: gradients are then computed for the retrieved documents alone."""
    ids = list(texts)
    vectors = np.asarray(embedder.encode([texts[i] for i in ids], normalize_embeddings=True, show_progress_bar=False))
    found = []
    for question in questions:
        start = time.perf_counter()
        query = np.asarray(embedder.encode(question.task.question, normalize_embeddings=True, show_progress_bar=False))
        order = np.argsort(-(vectors @ query), kind="stable")[:k]
        found.append(([ids[i] for i in order], time.perf_counter() - start))
    return found


def _rank(embedder, question: str, candidates: Sequence[str], texts: Mapping[str, str], k: int) -> list[str]:
    """The `k` candidate ids most similar to the question (cosine of the embedder's normalised vectors)."""
    vectors = embedder.encode(
        [question] + [texts[c] for c in candidates], normalize_embeddings=True, show_progress_bar=False
    )
    scores = np.asarray(vectors[1:]) @ np.asarray(vectors[0])
    return [candidates[i] for i in np.argsort(-scores, kind="stable")[:k]]


def _summary(values: Sequence[float], resamples: int, seed: int) -> dict:
    clean = [v for v in values if v == v]  # NaN answer NLLs (empty answers) are left out
    mean = float(np.mean(clean)) if clean else float("nan")
    low, high = bootstrap_ci(clean, resamples=resamples, seed=seed)
    return {"mean": mean, "ci95": [low, high], "n": len(clean)}


@truncation_report()  # one warning for all the documents it truncates
def run_evaluation(
    model,
    eval_set: EvalSet,
    config: EvalConfig,
    probes: Mapping[str, Sequence[Probe]] | None = None,
    embedder_model=None,
    run_info: Mapping | None = None,
) -> dict:
    """Runs every method of `config` on `eval_set` with `model` (left byte for byte as it was).

    Args:
        model ([`ReGradForCausalLM`]): the learner to evaluate (any bank attached to it is set aside for the run).
        eval_set ([`EvalSet`]): questions and bank documents.
        config ([`EvalConfig`]): the run's settings.
        probes (`Mapping[str, Sequence[Probe]]`, *optional*): multiple-choice probes for drift.
        embedder_model (*optional*): a loaded sentence-transformers model (else the learner's default embedder).
        run_info (`Mapping`, *optional*): what the report states about the run besides what is known here
            (`command`, `learner`, `learner_note`).

    Returns:
        `dict`: everything `results.json` holds (see [`write_report`]).
    """
    methods = check_methods(config.methods)
    if not eval_set.questions:
        raise ReGradValueError(f"{eval_set.name} has no questions to evaluate")
    top_k = config.top_k or model.config.top_k_docs
    prompt = config.prompt or PromptTemplate.from_config(model.config)
    if not config.oracle and top_k > len(eval_set.documents):
        raise ReGradValueError(f"top_k={top_k} is larger than the bank ({len(eval_set.documents)} documents)")
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    show = config.show_progress
    drift_methods = list(config.drift_methods) if config.drift_ns else []
    started = time.perf_counter()
    previous_bank = model.detach_bank()
    integrity = WeightSnapshot(model)
    results: dict = {"methods": methods, "top_k": top_k, "prompt": asdict(prompt), "timings": {}}
    try:
        needs_untrained = any(method in methods for method in ("raw", "sgd", "cpt")) or "cpt" in drift_methods
        untrained = untrained_learner_state(model, config.seed) if needs_untrained else None

        # CPT trains on, and drift injects, the evaluated questions' gold documents (`epochs` seeded passes);
        # held-out perplexity uses bank documents that are gold for no evaluated question.
        gold = list(dict.fromkeys(doc_id for q in eval_set.questions for doc_id in q.gold_ids))
        stream = ContinualPretraining.stream(gold, config.cpt.epochs, config.seed)
        others = [doc_id for doc_id in eval_set.documents if doc_id not in set(gold)]
        random.Random(config.seed).shuffle(others)
        heldout = [eval_set.documents[doc_id] for doc_id in others[: config.drift_heldout]]
        drift: dict = {}

        cpt_model = None
        if "cpt" in methods or "cpt" in drift_methods:
            cpt = ContinualPretraining(model, config.cpt, untrained)
            texts = [eval_set.documents[doc_id] for doc_id in stream]
            # Drift points along the way, and always the end: the CPT model the questions are asked to.
            ns = sorted({n for n in config.drift_ns if n < len(stream)} | {len(stream)})
            if "cpt" in drift_methods:
                drift["cpt"] = cpt_drift(cpt, texts, ns, probes or {}, heldout, show)
                change = drift["cpt"]["weights"][-1]
            else:
                before = WeightSnapshot(cpt.model)
                cpt.train(texts, show)
                change = before.compare(cpt.model)
                del before
            results["cpt"] = {
                **asdict(config.cpt),
                "documents": len(gold),
                "steps": cpt.steps,
                "train_seconds": cpt.seconds,
                "truncated_documents": cpt.truncated_documents,
                "first_loss": cpt.losses[0],
                "last_epoch_mean_loss": float(np.mean(cpt.losses[-len(gold) :])),
                "weight_change": change,
            }
            cpt_model = cpt.model
            del cpt  # the optimiser state is no longer needed

        embedder = embedder_model or load_embedder(model.config.embedder)
        questions = eval_set.questions
        retrieved: dict[int, tuple[list[str], float]] = {}
        whole = [] if config.oracle else [i for i, q in enumerate(questions) if q.candidate_ids is None]
        ranked = _whole_bank_ranking(embedder, [questions[i] for i in whole], eval_set.documents, top_k)
        retrieved.update(zip(whole, ranked, strict=True))
        for index, question in enumerate(questions):
            if index not in retrieved:
                start = time.perf_counter()
                ids_found = (
                    list(question.gold_ids)
                    if config.oracle
                    else _rank(embedder, question.task.question, question.candidate_ids, eval_set.documents, top_k)
                )
                retrieved[index] = (ids_found, time.perf_counter() - start)
        # Gradients only where a step uses them: the documents ReGrad's methods retrieved, and drift's stream of gold
        # documents (a run of the baselines alone computes none: the bank is most of a short run's time).
        stepping = any(method in GRADIENT_METHODS for method in methods)
        needed = [doc_id for ids_found, _ in retrieved.values() for doc_id in ids_found] if stepping else []
        needed = list(dict.fromkeys(needed + (stream if "regrad" in drift_methods else [])))
        start, computed = time.perf_counter(), 0
        if needed:
            bank, computed = _learner_bank(config.bank_cache, model, needed, eval_set.documents, embedder, show)
            model.attach_bank(bank)
        results["timings"]["bank_build_seconds"] = time.perf_counter() - start
        results["timings"]["bank_gradient_documents"] = len(needed)
        results["timings"]["bank_computed_documents"] = computed

        raw_bank = None
        if "raw" in methods:
            # Only the documents some question retrieved: the raw step never touches the others.
            needed = list(dict.fromkeys(doc_id for ids_found, _ in retrieved.values() for doc_id in ids_found))
            start = time.perf_counter()
            with model.swapped_learner(untrained):
                raw_bank = GradientBank.build(
                    model,
                    [eval_set.documents[doc_id] for doc_id in needed],
                    ids=needed,
                    embedder_model=embedder,
                    show_progress=show,
                )
            results["timings"]["raw_bank_build_seconds"] = time.perf_counter() - start
            results["timings"]["raw_bank_documents"] = len(needed)

        if "sgd" in methods:
            results["sgd"] = asdict(config.sgd)
        runner = MethodRunner(
            model, untrained, raw_bank, cpt_model, config.max_new_tokens, config.gamma, prompt, config.num_beams,
            config.sgd,
        )  # fmt: skip
        records = []
        questions = eval_set.questions
        tasks = [question.task for question in questions]
        for index, question in enumerate(
            progress_bar(questions, desc=f"Questions ({len(methods)} methods)", enabled=show)
        ):
            retrieved_ids, retrieval_seconds = retrieved[index]
            retrieved_texts = [eval_set.documents[doc_id] for doc_id in retrieved_ids]
            task = question.task
            candidates = probe_candidates(tasks, index, config.seed) if config.probe else None
            record = {
                "id": task.id,
                "question": task.question,
                "answers": list(task.answers),
                "gold_ids": list(question.gold_ids),
                "retrieved_ids": retrieved_ids,
                "recall_at_k": recall_at_k(retrieved_ids, question.gold_ids, None if config.oracle else top_k),
                "retrieval_seconds": retrieval_seconds,
                **({"probe_candidates": candidates} if config.probe else {}),
                "methods": {},
            }
            for method in methods:
                answer = runner.answer(method, task.question, task.answer, retrieved_ids, retrieved_texts, candidates)
                record["methods"][method] = {
                    "prediction": answer.prediction,
                    "exact_match": exact_match(answer.prediction, task.answers),
                    "f1": f1_score(answer.prediction, task.answers),
                    "f1_beyond_question": f1_beyond_question(answer.prediction, task.answers, task.question),
                    "contained": answer_contained(answer.prediction, task.answers),
                    "repetition": has_repetition(answer.prediction),
                    "answer_nll": answer.answer_nll,
                    "first_token_nll": answer.first_token_nll,
                    "first_token_top1": answer.first_token_top1,
                    "prompt_tokens": answer.prompt_tokens,
                    "seconds": answer.seconds + (retrieval_seconds if method in RETRIEVING else 0.0),
                }
                if config.probe:
                    record["methods"][method].update(probe_fields(answer.probe_scores))
            records.append(record)
        del cpt_model, runner, raw_bank

        results["questions"] = records
        results["retrieval"] = {
            "recall_at_k": _summary([r["recall_at_k"] for r in records], config.bootstrap_resamples, config.seed)
        }
        metrics = (*ANSWER_METRICS, PROBE_METRIC) if config.probe else ANSWER_METRICS
        results["summary"] = {
            method: {
                **{
                    metric: _summary(
                        [r["methods"][method][metric] for r in records], config.bootstrap_resamples, config.seed
                    )
                    for metric in metrics
                },
                "prompt_tokens": float(np.mean([r["methods"][method]["prompt_tokens"] for r in records])),
                "seconds_per_question": float(np.mean([r["methods"][method]["seconds"] for r in records])),
            }
            for method in methods
        }

        if config.probe:
            probed = sum(record["probe_candidates"] is not None for record in records)
            results["probe"] = {"candidates": 1 + PROBE_DISTRACTORS, "score": "mean token log-probability",
                                "questions": probed}  # fmt: skip
        if "regrad" in drift_methods:
            drift["regrad"] = regrad_drift(model, stream, config.drift_ns, probes or {}, heldout, show)
        if drift:
            drift["stream_documents"] = len(gold)
            drift["heldout_documents"] = len(heldout)
            drift["probes"] = {name: len(items) for name, items in (probes or {}).items()}
            results["drift"] = drift
    finally:
        model.detach_bank()
        if previous_bank is not None:
            model.attach_bank(previous_bank, force=True)
    results["integrity"] = integrity.compare(model)
    results["run"] = {
        "command": None,
        "learner": None,
        "learner_note": "not stated",
        **(run_info or {}),
        "dataset": eval_set.name,
        "data_note": eval_set.note,
        "bank_documents": len(eval_set.documents),
        "base_model": model.config.base_model_name_or_path,
        "base_model_revision": model.config.base_model_revision,
        "fingerprint": model.fingerprint(),
        "seed": config.seed,
        "oracle": config.oracle,
        "max_new_tokens": config.max_new_tokens,
        "num_beams": config.num_beams,
        "gamma": model.config.gamma if config.gamma is None else config.gamma,
        "bootstrap_resamples": config.bootstrap_resamples,
        "torch_threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - started,
    }
    return results
