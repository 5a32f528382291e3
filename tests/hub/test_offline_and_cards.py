"""Hub conventions without a Hub: offline pushes and pulls fail with one typed error, an unreachable Hub fails at
once, and the cards carry the metadata the Hub reads (`pipeline_tag`, `base_model`, model-index)."""

from __future__ import annotations

import json
import socket

import pytest
import transformers
from huggingface_hub import ModelCard, constants

from regrad_hf import ReGradForCausalLM, ReGradHubError
from regrad_hf.cli import main as regrad
from regrad_hf.defaults import EMBEDDED_MODEL_ID
from regrad_hf.hub import pull
from regrad_hf.hub.cards import render_bank_card


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_push_and_pull_offline_raise_one_hub_error(offline, tiny_bank, tiny_model, tmp_path):
    for push in (lambda: tiny_model.push_to_hub("user/x"), lambda: tiny_bank.push_to_hub("user/x")):
        with pytest.raises(ReGradHubError, match="HF_HUB_OFFLINE=1 is set"):
            push()
    with pytest.raises(ReGradHubError, match="cannot pull user/x: HF_HUB_OFFLINE=1 is set"):
        pull("user/x", tmp_path / "pulled")


def test_cli_pull_offline_prints_one_line(offline, tmp_path, capsys):
    assert regrad(["pull", "user/x", str(tmp_path / "pulled")]) != 0
    printed = capsys.readouterr()
    assert "HF_HUB_OFFLINE=1 is set" in printed.err and "OfflineModeIsEnabled" not in printed.err + printed.out
    assert len(printed.err.strip().splitlines()) == 1


def test_an_unreachable_hub_fails_at_once_naming_the_ways_out(tokenizer, monkeypatch):
    with socket.socket() as probe:  # a loopback port with nothing listening: every connection is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")

    def retrying(*args, **kwargs):  # transformers would retry 5 times with backoff (~40 s) before failing
        raise AssertionError("transformers was asked to download from an unreachable Hub")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", retrying)
    with pytest.raises(ReGradHubError, match=r"cannot reach the Hub .*HF_HUB_OFFLINE=1.*local path"):
        ReGradForCausalLM.from_base("HuggingFaceTB/SmolLM2-360M-Instruct", tokenizer=tokenizer)


def test_offline_and_not_cached_names_offline_mode(offline, tokenizer):
    with pytest.raises(ReGradHubError, match="HF_HUB_OFFLINE=1: only local paths and the Hub cache"):
        ReGradForCausalLM.from_base("someone/not-cached", tokenizer=tokenizer)


def test_the_learner_card_has_pipeline_tag_base_model_and_model_index(tiny_model):
    tiny_model.config.base_model_name_or_path = "someone/base"
    card = ModelCard(
        tiny_model.model_card("user/learner", {"datasets": ["rajpurkar/squad"]}, evaluation={"f1": 0.25, "em": 0.125})
    )
    assert card.data.pipeline_tag == "text-generation" and card.data.base_model == "someone/base"
    results = {(r.task_type, r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {
        ("question-answering", "rajpurkar/squad", "f1"): 0.25,
        ("question-answering", "rajpurkar/squad", "em"): 0.125,
    }
    assert ModelCard(tiny_model.model_card()).data.eval_results is None  # no results, no model-index


def test_cards_of_a_fresh_or_embedded_learner_show_no_none_revision(tiny_model, tiny_bank, tmp_path):
    assert tiny_model.config.base_model_revision is None  # a fresh learner of an in-memory base
    tiny_bank.save_pretrained(tmp_path / "bank")
    bank_config = json.loads((tmp_path / "bank" / "bank_config.json").read_text())
    for text in (tiny_model.model_card(), render_bank_card(bank_config)):
        assert "None" not in text and ModelCard(text).data.pipeline_tag == "text-generation"
    tiny_model.config.base_model_name_or_path, tiny_model.config.base_model_revision = EMBEDDED_MODEL_ID, "pkg==1"
    card = ModelCard(tiny_model.model_card())
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and "revision `pkg==1`" in card.text
    bank_config["learner"].update(base_model=EMBEDDED_MODEL_ID, base_revision="pkg==1")  # as a learner identity has it
    bank_card = ModelCard(render_bank_card(bank_config))
    assert bank_card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and "revision `pkg==1`" in bank_card.text
