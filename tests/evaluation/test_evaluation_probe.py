"""The knowledge probe of `regrad eval`: hand-computed scores, candidate choice, and its fields in every method's
results."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from regrad_hf import GradientBank, cli
from regrad_hf.cli import verbs
from regrad_hf.data import Task
from regrad_hf.data.collator import answer_suffix
from regrad_hf.errors import ReGradError
from regrad_hf.evaluation import METHODS, EvalConfig, load_eval_set, normalize_answer, run_evaluation, write_report
from regrad_hf.evaluation.methods import MethodRunner
from regrad_hf.evaluation.probe import (
    PROBE_DISTRACTORS,
    candidate_log_probs,
    continuation_logits,
    gold_rank,
    next_token_score,
    probe_candidates,
    probe_fields,
    prompt_cache,
)

from ..conftest import make_tiny_model

SQUAD = Path(__file__).parents[1] / "fixtures" / "squad_5q.json"
LN2 = math.log(2.0)

# A bigram "model" over 5 tokens: the next-token probabilities after each token, powers of two so that every
# log-probability is a multiple of ln 2. The logits are the log-probabilities (each row sums to 1).
NEXT = torch.tensor(
    [
        [1 / 4, 1 / 4, 1 / 4, 1 / 8, 1 / 8],  # after 0 (also the pad token)
        [1 / 8, 1 / 8, 1 / 2, 1 / 8, 1 / 8],  # after 1
        [1 / 16, 1 / 2, 1 / 8, 1 / 4, 1 / 16],  # after 2: the prompt ends with 2
        [1 / 8, 1 / 8, 1 / 8, 1 / 8, 1 / 2],  # after 3
        [1 / 2, 1 / 8, 1 / 8, 1 / 8, 1 / 8],  # after 4
    ]
)
PROMPT = [1, 2]


class BigramModel:
    """Logits that depend on the previous token only; honours `logits_to_keep` as transformers' models do."""

    device = torch.device("cpu")
    tokenizer = SimpleNamespace(pad_token_id=0)

    def __init__(self):
        self.calls = []

    def __call__(self, input_ids, attention_mask=None, logits_to_keep=0):
        self.calls.append((input_ids.clone(), attention_mask.clone(), logits_to_keep))
        logits = NEXT.log()[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_probe_scores_ranks_and_first_token_on_a_hand_computed_model():
    model = BigramModel()
    # Question 1, reference [3, 4]: ln p(3|2) = ln 1/4, ln p(4|3) = ln 1/2 -> mean -1.5 ln 2. [1] scores -ln 2 (it
    # wins), [4, 0]: (ln 1/16 + ln 1/2) / 2 = -2.5 ln 2, [2, 2, 2]: ln 1/8 three times = -3 ln 2. The sum would
    # rank [2, 2, 2] (-9 ln 2) far below; the mean is per token.
    first = candidate_log_probs(model, PROMPT, [[3, 4], [1], [4, 0], [2, 2, 2]])
    assert first == pytest.approx([-1.5 * LN2, -LN2, -2.5 * LN2, -3 * LN2], abs=1e-6)
    (input_ids, attention_mask, keep) = model.calls[0]
    assert keep == 4  # the longest candidate's 3 positions and the prompt's last
    assert input_ids.tolist()[1] == [1, 2, 1, 0, 0] and attention_mask.tolist()[1] == [1, 1, 1, 0, 0]
    # Question 2, reference [1, 2]: ln 1/2 + ln 1/2 -> -ln 2, best of [3, 4] (-1.5 ln 2), [4] (-4 ln 2), [0] (-4 ln 2).
    second = candidate_log_probs(model, PROMPT, [[1, 2], [3, 4], [4], [0]])
    assert second == pytest.approx([-LN2, -1.5 * LN2, -4 * LN2, -4 * LN2], abs=1e-6)
    assert gold_rank(first) == 2 and gold_rank(second) == 1
    rows = [probe_fields(first), probe_fields(second), probe_fields(None)]
    assert [row["probe_accuracy"] for row in rows[:2]] == [0.0, 1.0] and math.isnan(rows[2]["probe_accuracy"])
    assert [row["probe_rank"] for row in rows] == [2, 1, None]
    # probe_accuracy of the run: the share of (probed) questions ranked first.
    assert sum(row["probe_accuracy"] for row in rows[:2]) / 2 == 0.5
    # A tie counts against the reference: [1] and [1, 2] both score -ln 2 exactly.
    assert gold_rank([-LN2, -LN2, -3.0, -4.0]) == 2 and gold_rank([-4.0, -LN2, -3.0, -4.0], gold=3) == 4

    # First token: the logits after the prompt are ln p(.|2) = ln [1/16, 1/2, 1/8, 1/4, 1/16].
    logits = model(torch.tensor([PROMPT]), torch.ones(1, 2), 0).logits[0, -1]
    three = next_token_score(logits, 3)
    assert three.nll == pytest.approx(2 * LN2, abs=1e-6) and three.rank == 1 and not three.top1
    one = next_token_score(logits, 1)
    assert one.nll == pytest.approx(LN2, abs=1e-6) and one.rank == 0 and one.top1
    assert next_token_score(logits, 0).rank == 3  # 1, 3 and 2 are more likely; 4 ties and does not count
    with pytest.raises(ReGradError):
        next_token_score(logits, 5)
    with pytest.raises(ReGradError):
        candidate_log_probs(model, PROMPT, [[3], []])


def test_padded_candidate_scores_equal_each_candidate_alone(tokenizer):
    model = make_tiny_model(tokenizer)
    prompt = tokenizer("Question: where is Quentville?\nAnswer:", add_special_tokens=False)["input_ids"]
    candidates = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Zorbia", "in the north of Zorbia")]
    scores = candidate_log_probs(model, prompt, candidates)
    for ids, score in zip(candidates, scores, strict=True):
        full = torch.tensor([prompt + ids])
        labels = full.clone()
        labels[0, : len(prompt)] = -100
        with torch.no_grad():
            assert score == pytest.approx(-model(input_ids=full, labels=labels).loss.item(), abs=1e-5)


def _tasks(answers):
    return [Task(("A document.",), f"Question {i}?", a[0], tuple(a), id=f"q{i}") for i, a in enumerate(answers)]


def test_candidates_are_other_answers_of_the_set_without_the_gold_and_repeat_with_their_seed():
    tasks = _tasks(
        [
            ["The Paris", "Paris city"],
            ["paris"],  # the gold answer of question 0 once normalised: never its distractor
            ["Paris city."],  # another acceptable answer of question 0
            ["Berlin"],
            ["berlin"],  # repeats Berlin once normalised: at most one of them
            ["Rome"],
            ["Madrid"],
            ["Lisbon"],
            ["Oslo"],
        ]
    )
    draws = {seed: [probe_candidates(tasks, i, seed) for i in range(len(tasks))] for seed in range(4)}
    for seed, per_question in draws.items():
        assert per_question == [probe_candidates(tasks, i, seed) for i in range(len(tasks))]  # deterministic
        for index, candidates in enumerate(per_question):
            task = tasks[index]
            assert len(candidates) == 1 + PROBE_DISTRACTORS and candidates[0] == task.answer
            normalised = [normalize_answer(c) for c in candidates]
            assert len(set(normalised)) == len(normalised)
            assert not set(normalised[1:]) & {normalize_answer(a) for a in task.answers}
            others = {t.answer for j, t in enumerate(tasks) if j != index}
            assert set(candidates[1:]) <= others
    assert draws[0][0][1:] and not {"paris", "Paris city."} & set(draws[0][0])
    assert any(draws[0][i] != draws[1][i] for i in range(len(tasks)))  # the seed matters
    # Too few distinct other answers: no probe rather than a probe with a different chance level.
    assert probe_candidates(tasks[:3], 0, 0) is None
    exactly_enough = probe_candidates(_tasks([["a1"], ["a2"], ["a3"], ["a4"]]), 0, 0)
    assert exactly_enough[0] == "a1" and sorted(exactly_enough[1:]) == ["a2", "a3", "a4"]


def test_every_method_reports_the_probe_and_first_token_scores(tokenizer, embedder, tmp_path):
    model = make_tiny_model(tokenizer)
    eval_set = load_eval_set("squad", SQUAD)
    config = EvalConfig(METHODS, top_k=2, max_new_tokens=2, drift_ns=[], bootstrap_resamples=20, show_progress=False)
    results = run_evaluation(model, eval_set, config, embedder_model=embedder)
    assert results["integrity"]["identical"]
    assert results["probe"] == {"candidates": 4, "score": "mean token log-probability", "questions": 5}
    answers = {q.task.id: q.task.answer for q in eval_set.questions}
    for record in results["questions"]:
        candidates = record["probe_candidates"]
        assert candidates[0] == answers[record["id"]] and len(candidates) == 4
        assert set(candidates[1:]) <= {a for i, a in answers.items() if i != record["id"]}  # the same data set
        for method in METHODS:
            row = record["methods"][method]
            assert row["probe_accuracy"] in (0.0, 1.0) and row["probe_accuracy"] == float(row["probe_rank"] == 1)
            assert row["probe_rank"] == gold_rank(row["probe_scores"]) and len(row["probe_scores"]) == 4
            assert row["first_token_nll"] > 0 and row["first_token_top1"] in (0.0, 1.0)
        scores = {m: record["methods"][m]["probe_scores"] for m in METHODS}
        assert scores["regrad"] != scores["no_adaptation"]  # scored under the ReGrad step
        assert scores["rag"] != scores["closed_book"]  # scored after the prompt with the documents
    for method in METHODS:
        summary = results["summary"][method]
        for metric in ("probe_accuracy", "first_token_nll", "first_token_top1"):
            assert summary[metric]["n"] == 5 and summary[metric]["ci95"][0] <= summary[metric]["mean"]
        per_question = [r["methods"][method]["probe_accuracy"] for r in results["questions"]]
        assert summary["probe_accuracy"]["mean"] == pytest.approx(sum(per_question) / 5)

    # The probe scores are those of the method's own prompt under its own adaptation (here: ReGrad's step).
    record = results["questions"][0]
    ids = list(eval_set.documents)
    texts = [eval_set.documents[i] for i in ids]
    model.attach_bank(GradientBank.build(model, texts, ids=ids, embedder_model=embedder, show_progress=False))
    runner = MethodRunner(model)
    prompt = tokenizer(runner.prompt_text("regrad", record["question"], []), add_special_tokens=False)["input_ids"]
    encoded = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in record["probe_candidates"]]
    with runner.state("regrad", record["retrieved_ids"]) as adapted:
        expected = candidate_log_probs(adapted, prompt, encoded)
    assert expected == pytest.approx(record["methods"]["regrad"]["probe_scores"], abs=1e-5)
    model.detach_bank()

    written = write_report(results, tmp_path)
    report = written["report"].read_text()
    assert "| probe accuracy [95% CI] | first-token NLL [95% CI] | first-token top-1 [95% CI] |" in report
    assert "it ran on 5 of 5 questions" in report
    saved = json.loads(written["results"].read_text())
    assert saved["questions"][0]["methods"]["rag"]["probe_scores"] == record["methods"]["rag"]["probe_scores"]


def test_cli_no_probe_leaves_the_ranking_out(tokenizer, embedder, tmp_path, monkeypatch):
    model = make_tiny_model(tokenizer)
    monkeypatch.setattr(verbs, "load_learner", lambda learner, seed: model)
    monkeypatch.setattr("regrad_hf.bank.index.load_embedder", lambda name=None: embedder)
    argv = ["eval", "--dataset", "squad", "--data", str(SQUAD), "--methods", "closed_book,regrad", "--top-k", "1"]
    argv += ["--limit", "2", "--max-new-tokens", "1", "--drift-n", "none", "--output", str(tmp_path), "--no-progress"]
    assert cli.main([*argv, "--no-probe"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert "probe" not in results and "probe_candidates" not in results["questions"][0]
    assert "probe_accuracy" not in results["summary"]["regrad"] and "first_token_nll" in results["summary"]["regrad"]
    assert not {"probe_accuracy", "probe_rank", "probe_scores"} & set(results["questions"][0]["methods"]["regrad"])
    assert "the knowledge probe was off in this run" in (tmp_path / "report.md").read_text()
    assert cli.main(argv) == 0  # on by default; 2 questions have too few other answers for 3 distractors
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["probe"]["questions"] == 0 and results["summary"]["regrad"]["probe_accuracy"]["n"] == 0
    assert results["questions"][0]["probe_candidates"] is None
    assert "it ran on 0 of 2 questions" in (tmp_path / "report.md").read_text()


def test_an_answer_from_the_cached_prompt_equals_running_the_prompt_for_every_use(tokenizer):
    # MethodRunner.answer runs the prompt once and continues from its KV cache for the answer's NLL, the probe and
    # greedy decoding; each must equal the same computation with the prompt run again.
    model = make_tiny_model(tokenizer)
    runner = MethodRunner(model, max_new_tokens=6)
    question, texts = "Where is Quentville?", ["Quentville lies in the north of Zorbia, by the Kell river."]
    candidates = ["in the north of Zorbia", "Kell", "by the sea", "1912"]
    answer = runner.answer("rag", question, candidates[0], ["d0"], texts, candidates)

    prompt = tokenizer(runner.prompt_text("rag", question, texts), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(candidates[0] + answer_suffix(tokenizer), add_special_tokens=False)["input_ids"]
    encoded = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in candidates]
    with runner.state("rag", ["d0"], texts) as base, torch.no_grad():
        full = torch.tensor([prompt + answer_ids])
        labels = full.clone()
        labels[0, : len(prompt)] = -100
        output = base(input_ids=full, labels=labels)
        first = next_token_score(output.logits[0, len(prompt) - 1], answer_ids[0])
        expected_scores = candidate_log_probs(base, prompt, encoded)
        generated = base.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False, use_bank=False,
            **runner.prompt.generation_kwargs(tokenizer, len(prompt)),
        )  # fmt: skip
        cache = prompt_cache(base, prompt)
        length = cache.get_seq_length()
        assert continuation_logits(base, prompt, answer_ids, cache) == pytest.approx(
            continuation_logits(base, prompt, answer_ids), abs=1e-4
        )
        assert cache.get_seq_length() == length == len(prompt) - 1  # each use extends a copy
    assert answer.answer_nll == pytest.approx(output.loss.item(), abs=1e-5)
    assert answer.first_token_nll == pytest.approx(first.nll, abs=1e-5) and answer.first_token_top1 == first.top1
    assert answer.probe_scores == pytest.approx(expected_scores, abs=1e-5)
    expected_prediction = tokenizer.decode(generated[0, len(prompt) :], skip_special_tokens=True)
    assert answer.prediction == runner.prompt.cut(expected_prediction)
