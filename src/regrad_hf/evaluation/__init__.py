"""Evaluation: answer metrics, the trainer's injection evaluation, and `regrad eval` (every method side by side
on real data, with drift, a report and plots).

Modules: `metrics` (EM/F1, answer contained, repetition, recall@k, bootstrap CIs), `injection` (the trainer's
per-task evaluation), `datasets` (evaluation sets: questions, bank documents, gold ids), `methods` (the nine
methods, one shared prompt), `sgd_ceiling` (a few plain SGD steps on the retrieved documents: a diagnostic
ceiling), `drift` (probes, perplexity, byte-for-byte weight comparison), `probe` (the knowledge probe: the reference
answer ranked among other questions' answers, first-token NLL and top-1), `report` (results.json, report.md,
plots), `runner` (the whole run).
"""

from .datasets import EvalQuestion, EvalSet, load_eval_set
from .drift import Probe, WeightSnapshot, cpt_drift, load_probes, probe_accuracy, regrad_drift
from .injection import CASES, CaseResult, evaluate_injection
from .methods import (
    DEFAULT_METHODS,
    METHODS,
    ContinualPretraining,
    CPTConfig,
    MethodRunner,
    base_only,
    untrained_learner_state,
)
from .metrics import (
    answer_contained,
    bootstrap_ci,
    exact_match,
    f1_beyond_question,
    f1_score,
    has_repetition,
    normalize_answer,
    recall_at_k,
)
from .probe import NextTokenScore, candidate_log_probs, gold_rank, next_token_score, probe_candidates
from .report import write_report
from .runner import EvalConfig, run_evaluation
from .sgd_ceiling import SGDCeilingConfig, sgd_state

__all__ = [
    "CASES",
    "DEFAULT_METHODS",
    "METHODS",
    "CPTConfig",
    "CaseResult",
    "ContinualPretraining",
    "SGDCeilingConfig",
    "EvalConfig",
    "EvalQuestion",
    "EvalSet",
    "MethodRunner",
    "NextTokenScore",
    "Probe",
    "WeightSnapshot",
    "base_only",
    "candidate_log_probs",
    "cpt_drift",
    "load_eval_set",
    "gold_rank",
    "load_probes",
    "next_token_score",
    "probe_candidates",
    "probe_accuracy",
    "regrad_drift",
    "run_evaluation",
    "sgd_state",
    "untrained_learner_state",
    "write_report",
    "answer_contained",
    "bootstrap_ci",
    "evaluate_injection",
    "exact_match",
    "f1_beyond_question",
    "f1_score",
    "has_repetition",
    "normalize_answer",
    "recall_at_k",
]
