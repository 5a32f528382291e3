"""`regrad eval`: metrics on hand-computed cases, evaluation sets, the seven methods, drift, and the report."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import bootstrap

from regrad_hf import BankMismatchError, GradientBank, ReGradForCausalLM, cli
from regrad_hf.cli import options, verbs
from regrad_hf.evaluation import (
    DEFAULT_METHODS,
    METHODS,
    CPTConfig,
    EvalConfig,
    EvalSet,
    WeightSnapshot,
    answer_contained,
    base_only,
    bootstrap_ci,
    cpt_drift,
    exact_match,
    f1_beyond_question,
    f1_score,
    has_repetition,
    load_eval_set,
    load_probes,
    normalize_answer,
    recall_at_k,
    regrad_drift,
    run_evaluation,
    untrained_learner_state,
    write_report,
)
from regrad_hf.evaluation.datasets import parse_range
from regrad_hf.evaluation.drift import option_scores
from regrad_hf.evaluation.methods import ContinualPretraining
from regrad_hf.evaluation.report import render_report
from regrad_hf.prompting import PromptTemplate

from ..conftest import make_tiny_base, make_tiny_model

FIXTURES = Path(__file__).parents[1] / "fixtures"
SQUAD = FIXTURES / "squad_5q.json"
PROBE_FILES = [FIXTURES / "world_facts_4.json", FIXTURES / "real_authors_3.json"]


@pytest.fixture(scope="module")
def probes():
    return {path.stem: load_probes(path) for path in PROBE_FILES}


# ---------------------------------------------------------------- metrics


def test_squad_normalisation_em_and_f1_on_hand_computed_cases():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert exact_match("  the Nile.", ["Nile", "River Nile"]) == 1.0
    assert exact_match("Nile river", ["Nile"]) == 0.0
    # "big cat" vs "cat sat": one common token, precision 1/2, recall 1/2
    assert f1_score("the big cat", ["a cat sat"]) == pytest.approx(0.5)
    # the best of several answers: "cat" vs "cat" is 1.0
    assert f1_score("the big cat", ["a cat sat", "cat"]) == pytest.approx(2 * (1 / 2) * 1 / (1 / 2 + 1))
    assert f1_score("dog", ["cat"]) == 0.0
    # repeated tokens count once per occurrence (Counter intersection): "a a b" -> [b]... articles are dropped
    assert f1_score("x x y", ["x y y"]) == pytest.approx(2 / 3)


def test_f1_beyond_the_question_on_hand_computed_cases():
    question = "What is the profession of Marit Hagen's father?"
    gold = ["Marit Hagen's father is a Registered Nurse by profession."]
    # Words not in the question: gold {registered, nurse, by}; "is" and "father" are in the question.
    assert f1_beyond_question("Marit Hagen's father is a German artist.", gold, question) == 0.0
    assert f1_score("Marit Hagen's father is a German artist.", gold) > 0.3  # what restating earns in plain F1
    assert f1_beyond_question("A Registered Nurse", gold, question) == pytest.approx(0.8)  # P 2/2, R 2/3
    # prediction beyond the question {he, nurse, in, oslo}: overlap 1, P 1/4, R 1/3, F1 2/7
    assert f1_beyond_question("He is a nurse in Oslo", gold, question) == pytest.approx(2 / 7)
    assert f1_beyond_question("Marit Hagen's father", gold, question) == 0.0  # restating only
    # A gold answer all of whose words are in the question is scored on all its words.
    assert f1_beyond_question("red", ["red"], "Is the box red or blue?") == 1.0
    assert f1_beyond_question("blue", ["red"], "Is the box red or blue?") == 0.0
    assert f1_beyond_question("Lake Merrow", ["the Nile", "Lake Merrow"], "Where?") == 1.0  # best over gold answers
    assert f1_beyond_question("", gold, question) == 0.0


def test_answer_contained_on_hand_computed_cases():
    assert answer_contained("It flows into Lake Merrow.", ["Lake Merrow"]) == 1.0
    assert answer_contained("The answer is the Nile", ["the Nile"]) == 1.0  # normalised: articles, case
    assert answer_contained("Merrow", ["Lake Merrow"]) == 0.0  # a part of the answer is not the answer
    assert answer_contained("in 19870 or so", ["1987"]) == 0.0  # whole words only
    assert answer_contained("in 1987, near Tromsø", ["1988", "1987"]) == 1.0  # best over gold answers
    assert answer_contained("anything", ["the"]) == 0.0  # an answer that normalises to nothing is never contained
    assert answer_contained("", ["Nile"]) == 0.0


def test_repetition_on_hand_computed_cases():
    assert has_repetition("Lake Merrow River River River River") == 1.0  # "river river river" twice
    assert has_repetition("Bay village village village") == 0.0  # only one "village village village"
    assert has_repetition("Bay village village village village") == 1.0
    assert has_repetition("x b c x b c") == 1.0 and has_repetition("the b c the b c") == 0.0  # articles dropped
    assert has_repetition("one two three one two four") == 0.0
    assert has_repetition("") == 0.0 and has_repetition("x x") == 0.0


def test_recall_at_k():
    retrieved = ["a", "b", "c"]
    assert recall_at_k(retrieved, ["c"], k=2) == 0.0
    assert recall_at_k(retrieved, ["c"], k=3) == 1.0
    assert recall_at_k(retrieved, ["a", "d"], k=3) == 0.5
    assert recall_at_k(retrieved, ["b"]) == 1.0
    with pytest.raises(ValueError):
        recall_at_k(retrieved, [])


def test_bootstrap_ci_brackets_the_mean_and_repeats_with_its_seed():
    values = [(index * 0.377) % 1.0 for index in range(20)]
    low, high = bootstrap_ci(values, seed=3)
    mean = sum(values) / len(values)
    assert low < mean < high
    assert (low, high) == bootstrap_ci(values, seed=3)
    assert (low, high) != bootstrap_ci(values, seed=4)
    assert bootstrap_ci([0.7] * 5) == pytest.approx((0.7, 0.7))
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert bootstrap_ci([0.25]) == (0.25, 0.25)
    # scipy's percentile bootstrap with the same generator: the interval is scipy's, not a hand-written one
    rng = np.random.default_rng(3)
    scipy = bootstrap((np.asarray(values),), np.mean, n_resamples=1000, method="percentile", rng=rng)
    assert (low, high) == pytest.approx((scipy.confidence_interval.low, scipy.confidence_interval.high))


# ---------------------------------------------------------------- evaluation sets


def test_parse_range():
    assert parse_range("35-39") == [35, 36, 37, 38, 39]
    assert parse_range("1,4-5") == [1, 4, 5]
    with pytest.raises(ValueError, match="35-39"):
        parse_range("a-b")


def test_squad_eval_set_has_the_whole_bank_and_gold_ids():
    eval_set = load_eval_set("squad", SQUAD)
    assert len(eval_set.questions) == 5 and len(eval_set.documents) == 3
    for question in eval_set.questions:
        assert [eval_set.documents[i] for i in question.gold_ids] == list(question.task.documents)
    limited = load_eval_set("squad", SQUAD, limit=2, seed=1)
    assert len(limited.questions) == 2 and len(limited.documents) == 3  # the bank is not limited
    assert [q.task.id for q in limited.questions] == [
        q.task.id for q in load_eval_set("squad", SQUAD, None, 2, 1).questions
    ]


def test_tofu_and_jsonl_eval_sets(tmp_path):
    rows = [
        {"author_idx": author, "question": f"Q{author}{n}?", "answer": f"Answer {author} {n}."}
        for author in (3, 4)
        for n in range(7)
    ]
    tofu = tmp_path / "tofu.jsonl"
    tofu.write_text("\n".join(json.dumps(r) for r in rows))
    eval_set = load_eval_set("tofu", tofu, split="4")
    # documents of 5 whole facts, as in meta-training; each question's gold document holds its answer
    first = " ".join(f"Answer 4 {n}." for n in range(5))
    assert list(eval_set.documents.values()) == [first, "Answer 4 5. Answer 4 6."]
    assert all(q.task.answer in eval_set.documents[q.gold_ids[0]] for q in eval_set.questions)
    assert len(eval_set.questions) == 7 and "5 whole facts" in eval_set.note
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"documents": ["d1", "d2"], "question": "q?", "answer": "a"}))
    assert load_eval_set("jsonl", tasks).questions[0].gold_ids == ("doc-0", "doc-1")


def test_hotpotqa_eval_set_retrieves_within_each_questions_paragraphs(tmp_path):
    record = {
        "_id": "h1",
        "question": "Which is older?",
        "answer": "A",
        "supporting_facts": [["A", 0], ["B", 0]],
        "context": [["A", ["A is old."]], ["B", ["B is new."]], ["C", ["C is other."]]],
    }
    path = tmp_path / "hotpot.jsonl"
    path.write_text(json.dumps(record))
    eval_set = load_eval_set("hotpotqa", path)
    question = eval_set.questions[0]
    assert len(question.candidate_ids) == 3 and len(question.gold_ids) == 2
    assert set(question.gold_ids) < set(question.candidate_ids)


# ---------------------------------------------------------------- methods


def test_base_only_is_the_true_base_model_and_switches_back(tokenizer):
    model = make_tiny_model(tokenizer)  # its LoRA B is non-zero, like a meta-trained learner
    base = make_tiny_base(tokenizer)  # the same base weights, no LoRA
    input_ids = torch.tensor([tokenizer("The capital of Zorbia").input_ids])
    with torch.no_grad():
        expected = base(input_ids=input_ids).logits
        learner = model(input_ids=input_ids).logits
        with base_only(model):
            switched_off = model(input_ids=input_ids).logits
        after = model(input_ids=input_ids).logits
    assert torch.equal(switched_off, expected)
    assert not torch.equal(learner, expected)
    assert torch.equal(after, learner)
    assert all(p.requires_grad for p in model.lora_parameters().values())


def test_untrained_learner_state_is_peft_init_and_leaves_the_model(tokenizer):
    model = make_tiny_model(tokenizer)
    before = {name: t.clone() for name, t in model.learner_state_dict().items()}
    state = untrained_learner_state(model, seed=0)
    assert all(torch.equal(before[name], t) for name, t in model.learner_state_dict().items())
    assert all(state[n].abs().sum() == 0 for n in state if ".lora_B." in n)
    assert all(state[n].abs().sum() > 0 for n in state if ".lora_A." in n)
    assert torch.allclose(state["regrad.step_sizes"].exp(), torch.tensor(model.config.init_step_size))
    again = untrained_learner_state(model, seed=0)
    assert all(torch.equal(state[n], again[n]) for n in state)
    # B = 0: with the untrained state the model is the base model
    input_ids = torch.tensor([tokenizer("Hello there").input_ids])
    with torch.no_grad(), model.swapped_learner(state):
        fresh = model(input_ids=input_ids).logits
    with torch.no_grad(), base_only(model):
        assert torch.equal(fresh, model(input_ids=input_ids).logits)


def test_cpt_trains_a_copy_and_never_the_model(tokenizer):
    model = make_tiny_model(tokenizer)
    snapshot = WeightSnapshot(model)
    state = untrained_learner_state(model, 0)
    for mode in ("full", "lora"):
        cpt = ContinualPretraining(model, CPTConfig(mode=mode, learning_rate=1e-2), state)
        copy_snapshot = WeightSnapshot(cpt.model)
        cpt.train_epochs(["Quentville is the capital of Zorbia.", "Halvorite was found in 1987."])
        change = copy_snapshot.compare(cpt.model)
        assert cpt.steps == 2 and not change["identical"]
        lora_changed = any(not torch.equal(p, state[n]) for n, p in cpt.model.lora_parameters().items() if n in state)
        assert lora_changed == (mode == "lora")
    assert snapshot.compare(model)["identical"]


# ---------------------------------------------------------------- drift


def test_weight_snapshot_detects_a_planted_change_and_nothing_else(tokenizer):
    model = make_tiny_model(tokenizer)
    snapshot = WeightSnapshot(model)
    untouched = snapshot.compare(model)
    assert untouched["identical"] and untouched["changed_elements"] == 0 and untouched["relative_l2"] == 0.0
    weight = model.language_model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(math.inf))  # the smallest possible change
    planted = snapshot.compare(model)
    assert not planted["identical"]
    assert planted["changed_tensors"] == 1 and planted["changed_elements"] == 1
    assert 0 < planted["max_abs_change"] < 1e-6


def test_option_scores_prefer_what_the_model_was_trained_to_say(tokenizer, probes):
    model = make_tiny_model(tokenizer)
    question, options = "Which city?", ("Quentville", "Berlin")
    cpt = ContinualPretraining(model, CPTConfig(mode="full", learning_rate=3e-3), untrained_learner_state(model, 0))
    prompt = PromptTemplate.from_config(model.config).build(tokenizer, question)
    before = option_scores(cpt.model, question, options)
    cpt.train([prompt + "Quentville"] * 10)
    after = option_scores(cpt.model, question, options)
    assert after[0] > before[0] and after[0] > after[1]
    assert len(probes["world_facts_4"]) == 4 and probes["world_facts_4"][0].options[probes["world_facts_4"][0].answer]


def test_drift_regrad_changes_nothing_and_cpt_is_measured(tokenizer, embedder, probes):
    from regrad_hf import GradientBank

    model = make_tiny_model(tokenizer)
    eval_set = load_eval_set("squad", SQUAD)
    ids, texts = list(eval_set.documents), list(eval_set.documents.values())
    model.attach_bank(GradientBank.build(model, texts, ids=ids, embedder_model=embedder, show_progress=False))
    regrad = regrad_drift(model, ids[:2], [1, 3], probes, texts[2:])
    assert regrad["n"] == [0, 1, 3]
    assert all(w["identical"] for w in regrad["weights"])
    assert all(m == regrad["measurements"][0] for m in regrad["measurements"])

    cpt = ContinualPretraining(model, CPTConfig(learning_rate=1e-2), untrained_learner_state(model, 0))
    record = cpt_drift(cpt, texts[:2], [1, 2], probes, texts[2:])
    weights = record["weights"]
    assert weights[0]["identical"] and not weights[-1]["identical"]
    assert weights[2]["relative_l2"] > weights[1]["relative_l2"] > 0
    assert record["measurements"][-1]["heldout_perplexity"] != record["measurements"][0]["heldout_perplexity"]
    with pytest.raises(ValueError, match="N=3"):
        cpt_drift(cpt, texts[:2], [3], probes, texts[2:])


# ---------------------------------------------------------------- the whole run


def test_every_method_runs_and_the_report_is_written(tokenizer, embedder, probes, tmp_path):
    model = make_tiny_model(tokenizer)
    eval_set = load_eval_set("squad", SQUAD, limit=3)
    config = EvalConfig(
        methods=METHODS,
        top_k=2,
        max_new_tokens=3,
        drift_ns=[1, 3],
        drift_heldout=1,
        bootstrap_resamples=50,
        show_progress=False,
    )
    results = run_evaluation(model, eval_set, config, probes, embedder_model=embedder, run_info={"command": "test"})
    assert results["methods"] == list(METHODS)
    assert results["integrity"]["identical"]
    assert len(results["questions"]) == 3
    for record in results["questions"]:
        assert set(record["methods"]) == set(METHODS) and len(record["retrieved_ids"]) == 2
        tokens = {m: a["prompt_tokens"] for m, a in record["methods"].items()}
        assert tokens["rag"] == tokens["learner_icl"] == tokens["regrad_icl"] > tokens["regrad"]
        assert tokens["regrad"] == tokens["closed_book"]
    summary = results["summary"]
    for method in METHODS:
        low, high = summary[method]["answer_nll"]["ci95"]
        assert low <= summary[method]["answer_nll"]["mean"] <= high
    # Methods differ where they should: the learner is not the base, a document step changes the answer NLL.
    nll = {m: summary[m]["answer_nll"]["mean"] for m in METHODS}
    assert nll["no_adaptation"] != nll["closed_book"] and nll["regrad"] != nll["no_adaptation"]
    assert nll["learner_icl"] != nll["rag"] and nll["learner_icl"] != nll["regrad_icl"]  # the start, no step
    assert results["cpt"]["steps"] == results["cpt"]["documents"] and not results["cpt"]["weight_change"]["identical"]

    written = write_report(results, tmp_path / "out")
    for kind in ("f1", "tokens", "drift"):
        assert written[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = written["report"].read_text()
    assert "`test`" in report and "ReGrad + ICL" in report and "identical byte for byte" in report
    for kind in ("f1", "tokens", "drift"):
        assert f"]({written[kind].name})" in report
    assert json.loads(written["results"].read_text())["summary"]["regrad"]["f1"]["n"] == 3


def test_every_method_is_asked_with_the_same_instruction(tokenizer, embedder, tmp_path, monkeypatch):
    model = make_tiny_model(tokenizer)
    template = PromptTemplate(system_prompt="Reply with only the answer, a few words.", answer_repetition_penalty=1.3)
    assert PromptTemplate.from_config(model.config) != template  # the run's template, not the learner's
    prompts = []
    generate = ReGradForCausalLM.generate

    def spy(self, *args, **kwargs):  # the CPT copy is another ReGradForCausalLM: a class-level spy sees it too
        text = tokenizer.decode(kwargs["input_ids"][0])
        prompts.append((text, kwargs["stop_strings"], kwargs["logits_processor"]))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(ReGradForCausalLM, "generate", spy)
    eval_set = load_eval_set("squad", SQUAD, limit=2)
    config = EvalConfig(METHODS, top_k=1, max_new_tokens=2, drift_ns=[], show_progress=False, prompt=template)
    results = run_evaluation(model, eval_set, config, embedder_model=embedder)
    assert len(prompts) == 2 * len(METHODS)
    per_method = iter(prompts)
    for record in results["questions"]:
        asked = {method: next(per_method) for method in METHODS}
        texts = [eval_set.documents[i] for i in record["retrieved_ids"]]
        for method, (prompt, stop, processors) in asked.items():
            documents = texts if method in ("rag", "learner_icl", "regrad_icl") else None
            assert prompt == template.build(tokenizer, record["question"], documents)
            assert "<|im_start|>system\nReply with only the answer, a few words.<|im_end|>" in prompt
            assert stop == ["\n"]  # the end-of-line rule for everyone
            (penalty,) = processors  # the same repetition penalty for everyone, sparing each one's own prompt
            assert penalty.penalty == 1.3 and penalty.prompt_ignore_length == len(tokenizer(prompt)["input_ids"])
        assert len({asked[m][0] for m in ("closed_book", "no_adaptation", "cpt", "raw", "regrad")}) == 1
        assert asked["rag"][0] == asked["learner_icl"][0] == asked["regrad_icl"][0]
    assert results["prompt"]["system_prompt"] == template.system_prompt
    assert all({"contained", "repetition", "f1_beyond_question"} <= set(results["summary"][m]) for m in METHODS)
    report = write_report(results, tmp_path)["report"].read_text()
    assert "Reply with only the answer, a few words." in report and "| contained [95% CI] |" in report
    assert "| F1 beyond the question [95% CI] |" in report
    assert "repetition penalty of 1.3 on each answer's own word tokens" in report


def test_beam_search_width_is_the_same_for_every_method_and_reported(tokenizer, embedder, tmp_path, monkeypatch):
    model = make_tiny_model(tokenizer)
    widths, generate = [], ReGradForCausalLM.generate

    def spy(self, *args, **kwargs):
        widths.append(kwargs["num_beams"])
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(ReGradForCausalLM, "generate", spy)
    prompt = PromptTemplate(answer_repetition_penalty=1.2)  # the stop rule and the penalty work under beams too
    config = EvalConfig(top_k=1, max_new_tokens=3, drift_ns=[], show_progress=False, num_beams=3, prompt=prompt)
    results = run_evaluation(model, load_eval_set("squad", SQUAD, limit=2), config, embedder_model=embedder)
    assert widths == [3] * (2 * len(DEFAULT_METHODS))  # the default methods: all but the sgd diagnostic
    assert results["run"]["num_beams"] == 3
    assert all(isinstance(r["methods"][m]["prediction"], str) for r in results["questions"] for m in DEFAULT_METHODS)
    assert "beam-search (3 beams) answers of at most 3 tokens" in write_report(results, tmp_path)["report"].read_text()


def test_oracle_injects_the_gold_documents(tokenizer, embedder):
    model = make_tiny_model(tokenizer)
    config = EvalConfig(methods=["regrad"], oracle=True, max_new_tokens=2, drift_ns=[], show_progress=False)
    results = run_evaluation(model, load_eval_set("squad", SQUAD), config, embedder_model=embedder)
    assert all(r["retrieved_ids"] == r["gold_ids"] for r in results["questions"])
    assert results["retrieval"]["recall_at_k"]["mean"] == 1.0
    assert "drift" not in results


def test_gradients_only_for_retrieved_documents_and_the_cache_adds_what_it_lacks(tokenizer, embedder, tmp_path):
    model = make_tiny_model(tokenizer)
    eval_set = load_eval_set("squad", SQUAD, limit=1)
    config = EvalConfig(methods=["regrad"], top_k=1, max_new_tokens=2, drift_ns=[], show_progress=False)
    config.bank_cache = str(tmp_path / "bank")
    first = run_evaluation(model, eval_set, config, embedder_model=embedder)
    assert first["timings"]["bank_gradient_documents"] == first["timings"]["bank_computed_documents"] == 1
    assert GradientBank.from_pretrained(tmp_path / "bank", embedder).ids == first["questions"][0]["retrieved_ids"]
    # Retrieval is over the whole bank: the same hits as a bank of every document searched exactly.
    full = GradientBank.build(model, list(eval_set.documents.values()), ids=list(eval_set.documents),
                              embedder_model=embedder, show_progress=False)  # fmt: skip
    assert first["questions"][0]["retrieved_ids"] == [full.search(eval_set.questions[0].task.question, 1)[0].id]
    config.top_k = 3
    second = run_evaluation(model, eval_set, config, embedder_model=embedder)
    assert second["timings"]["bank_gradient_documents"] == 3 and second["timings"]["bank_computed_documents"] == 2
    assert set(GradientBank.from_pretrained(tmp_path / "bank", embedder).ids) == set(eval_set.documents)
    again = run_evaluation(model, eval_set, config, embedder_model=embedder)
    assert again["timings"]["bank_computed_documents"] == 0
    assert again["questions"][0]["methods"]["regrad"]["prediction"] == second["questions"][0]["methods"]["regrad"][
        "prediction"]  # fmt: skip
    assert "0 computed in this run, 3 loaded from the --bank-cache" in render_report(again)
    with pytest.raises(BankMismatchError):
        run_evaluation(make_tiny_model(tokenizer, seed=1), eval_set, config, embedder_model=embedder)
    doc_id = next(iter(eval_set.documents))
    changed = EvalSet("changed", {doc_id: "Another text under the same id."}, [eval_set.questions[0]])
    config.top_k = 1
    with pytest.raises(ValueError, match="other documents"):
        run_evaluation(model, changed, config, embedder_model=embedder)


def test_cli_eval_writes_the_report(tokenizer, embedder, tmp_path, monkeypatch, capsys):
    model = make_tiny_model(tokenizer)
    monkeypatch.setattr(verbs, "load_learner", lambda learner, seed: model)
    monkeypatch.setattr("regrad_hf.bank.index.load_embedder", lambda name=None: embedder)
    argv = ["eval", "--dataset", "squad", "--data", str(SQUAD), "--methods", "closed_book,regrad", "--top-k", "1"]
    argv += ["--limit", "2", "--max-new-tokens", "2", "--drift-n", "none", "--output", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    assert "| ReGrad |" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["methods"] == ["closed_book", "regrad"] and len(results["questions"]) == 2
    assert results["run"]["command"].startswith("regrad ")
    assert (tmp_path / "report.md").is_file()
    assert results["prompt"] == asdict(PromptTemplate.from_config(model.config))  # the learner's by default
    argv += ["--system-prompt", "Be brief.", "--user-template", "{question}\\n\\n{context}", "--answer-stop", "turn"]
    assert cli.main(argv) == 0
    prompt = json.loads((tmp_path / "results.json").read_text())["prompt"]
    assert prompt["system_prompt"] == "Be brief." and prompt["user_template"] == "{question}\n\n{context}"
    assert prompt["answer_stop"] == "turn" and prompt["answer_repetition_penalty"] == 1.0
    assert cli.main([*argv, "--answer-repetition-penalty", "1.2"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["prompt"]["answer_repetition_penalty"] == 1.2
    assert json.loads((tmp_path / "results.json").read_text())["run"]["num_beams"] == 1  # greedy by default
    assert cli.main([*argv, "--num-beams", "2"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["run"]["num_beams"] == 2
    capsys.readouterr()
    assert cli.main([*argv, "--answer-repetition-penalty", "0.5"]) == 2
    assert "error: answer_repetition_penalty must be a number from 1 (off) to 10" in capsys.readouterr().err
    assert cli.main([*argv, "--system-prompt", "none"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["prompt"]["system_prompt"] is None


def test_cli_eval_exits_1_when_the_model_changed(tokenizer, embedder, tmp_path, monkeypatch, capsys):
    model = make_tiny_model(tokenizer)
    monkeypatch.setattr(verbs, "load_learner", lambda learner, seed: model)
    monkeypatch.setattr("regrad_hf.bank.index.load_embedder", lambda name=None: embedder)
    generate = model.generate

    def leaky_generate(*args, **kwargs):  # a method that forgets to restore a weight
        with torch.no_grad():
            model.language_model.get_input_embeddings().weight[0, 0] += 1.0
        return generate(*args, **kwargs)

    argv = ["eval", "--dataset", "squad", "--data", str(SQUAD), "--methods", "closed_book", "--limit", "1"]
    argv += ["--max-new-tokens", "1", "--drift-n", "none", "--no-probe", "--output", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    monkeypatch.setattr(model, "generate", leaky_generate)
    assert cli.main(argv) == 1
    assert json.loads((tmp_path / "results.json").read_text())["integrity"]["identical"] is False
    assert "**changed**" in (tmp_path / "report.md").read_text()


def test_cli_eval_bank_cache_keeps_gradients_between_runs(tokenizer, embedder, tmp_path, monkeypatch):
    model = make_tiny_model(tokenizer)
    monkeypatch.setattr(verbs, "load_learner", lambda learner, seed: model)
    monkeypatch.setattr("regrad_hf.bank.index.load_embedder", lambda name=None: embedder)
    argv = ["eval", "--dataset", "squad", "--data", str(SQUAD), "--methods", "regrad", "--limit", "1", "--top-k", "1"]
    argv += ["--max-new-tokens", "1", "--drift-n", "none", "--no-probe", "--output", str(tmp_path / "out")]
    argv += ["--no-progress", "--bank-cache", str(tmp_path / "cache")]
    computed = []
    for _ in range(2):
        assert cli.main(argv) == 0
        computed.append(
            json.loads((tmp_path / "out" / "results.json").read_text())["timings"]["bank_computed_documents"]
        )
    assert computed == [1, 0]  # the second run loads the gradient the first one cached
    assert len(GradientBank.from_pretrained(tmp_path / "cache", embedder)) == 1


def test_cli_eval_refuses_unknown_methods(tmp_path, capsys):
    argv = ["eval", "--dataset", "squad", "--data", str(SQUAD), "--probes", *map(str, PROBE_FILES)]
    assert cli.main([*argv, "--methods", "magic", "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: unknown methods")


@pytest.mark.slow
def test_cli_eval_with_the_shipped_learner(tmp_path):
    argv = ["eval", "--dataset", "squad", "--data", str(SQUAD), "--limit", "2", "--top-k", "1", "--max-new-tokens"]
    argv += [
        "8",
        "--drift-n",
        "2",
        "--drift-heldout",
        "1",
        "--probes",
        *map(str, PROBE_FILES),
        "--output",
        str(tmp_path),
    ]
    assert cli.main([*argv, "--no-progress"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["integrity"]["identical"] and results["drift"]["regrad"]["weights"][-1]["identical"]
    assert (
        results["summary"]["regrad"]["answer_nll"]["mean"] < results["summary"]["no_adaptation"]["answer_nll"]["mean"]
    )


def test_cli_eval_help_lists_every_method(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--help"])
    assert exit_info.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse may wrap the long list of names anywhere
    assert all(method in text for method in METHODS)
    assert options.METHOD_NAMES == METHODS  # the CLI keeps its own copy so that --help imports no torch
    assert options.DEFAULT_METHOD_NAMES == DEFAULT_METHODS and "sgd" not in DEFAULT_METHODS


def test_a_run_of_the_baselines_alone_computes_no_document_gradients(tokenizer, embedder, monkeypatch):
    model = make_tiny_model(tokenizer)

    def refuse(*args, **kwargs):
        raise AssertionError("no method of this run steps on document gradients")

    monkeypatch.setattr(ReGradForCausalLM, "document_gradients", refuse)
    config = EvalConfig(
        ["closed_book", "rag", "learner_icl"], top_k=2, max_new_tokens=2, drift_ns=[], show_progress=False
    )
    results = run_evaluation(model, load_eval_set("squad", SQUAD, limit=2), config, embedder_model=embedder)
    assert results["timings"]["bank_gradient_documents"] == 0 and results["integrity"]["identical"]
    assert all(len(record["retrieved_ids"]) == 2 for record in results["questions"])  # RAG still retrieves
