"""A learner is served the way it was evaluated where its user builds neither the prompt nor the decoding: its
GenerationConfig (greedy, stop_strings, answer repetition penalty, plain prompts asked as questions), its
tokenizer's chat template, `pipeline`, and saved learner directories old and new."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig, pipeline

from regrad_hf import ReGradForCausalLM, ReGradValueError
from regrad_hf.modeling.served import base_chat_template
from regrad_hf.prompting import AnswerRepetitionPenalty, PromptTemplate

from ..conftest import make_tiny_base, make_tiny_model

QUESTION = "What is the capital of Zorbia?"
SETTINGS = {"max_new_tokens": 8}


def encode(tokenizer, text):
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)


def new_text(tokenizer, output, inputs):
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_the_generation_config_holds_the_learners_decoding(tokenizer):
    model = make_tiny_model(tokenizer, served=True, answer_repetition_penalty=1.3)
    config = model.generation_config
    assert config.do_sample is False and config.stop_strings == ["\n"]
    assert config.answer_repetition_penalty == 1.3 and config.apply_learner_prompt is True
    assert make_tiny_model(tokenizer, served=True, answer_stop="turn").generation_config.stop_strings is None
    # the wrapped model keeps the base model's own: its generate is the plain base model's
    assert model.language_model.generation_config.stop_strings is None


def test_the_penalty_of_the_generation_config_is_the_learners_logits_processor(tokenizer):
    model = make_tiny_model(tokenizer, served=True)
    inputs = encode(tokenizer, model.prompt_template.build(tokenizer, QUESTION))
    width = inputs["input_ids"].shape[1]
    penalty = AnswerRepetitionPenalty(10.0, width, tokenizer)
    settings = {**SETTINGS, "max_new_tokens": 16, "stop_strings": None}
    explicit = model.generate(**inputs, **settings, logits_processor=[penalty], use_bank=False)
    model.generation_config.answer_repetition_penalty = 10.0
    assert torch.equal(model.generate(**inputs, **settings, use_bank=False), explicit)
    off = model.generate(**inputs, **settings, use_bank=False, answer_repetition_penalty=1.0)  # per call
    assert not torch.equal(off, explicit)
    with pytest.raises(ReGradValueError, match="answer_repetition_penalty must be a number from 1"):
        model.generate(**inputs, **settings, answer_repetition_penalty=0.5)


@pytest.mark.parametrize("positional", [False, True])
def test_a_given_generation_config_is_completed_by_the_learners(tokenizer, positional):
    model = make_tiny_model(tokenizer, served=True)
    model.generation_config.answer_repetition_penalty = 10.0
    inputs = encode(tokenizer, model.prompt_template.build(tokenizer, QUESTION))
    penalty = AnswerRepetitionPenalty(10.0, inputs["input_ids"].shape[1], tokenizer)
    decoding = {"logits_processor": [penalty], "stop_strings": ["\n"], "tokenizer": tokenizer}
    expected = model.language_model.generate(**inputs, max_new_tokens=16, **decoding)
    given = GenerationConfig(max_new_tokens=16)  # no stop string, no penalty: the learner's fill them in
    args = (inputs["input_ids"], given) if positional else ()
    kwargs = {"attention_mask": inputs["attention_mask"]} | (
        {} if positional else {**inputs, "generation_config": given}
    )
    assert torch.equal(model.generate(*args, **kwargs, use_bank=False), expected)


def test_the_chat_template_lays_out_a_chat_as_the_learners_prompt(tokenizer):
    model = make_tiny_model(tokenizer, served=True, system_prompt="Be brief.")
    chat = [{"role": "user", "content": QUESTION}]
    rendered = model.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == model.prompt_template.build(tokenizer, QUESTION)
    assert "Be brief." in rendered and f"Question: {QUESTION}\nAnswer:" in rendered
    own = model.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Mine."}, *chat], tokenize=False, add_generation_prompt=True
    )
    assert "Mine." in own and "Be brief." not in own and f"Question: {QUESTION}" in own  # a given system turn wins
    raw = model.tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True, apply_learner_prompt=False
    )
    assert raw == tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )  # the caller's: as it was
    assert "Question:" not in raw and "Be brief." not in raw
    other = make_tiny_model(model.tokenizer, served=True, system_prompt="Other.")  # a learner's tokenizer, given again
    again = other.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert again == rendered.replace("Be brief.", "Other.")  # the layout replaced, never nested
    assert base_chat_template(other.tokenizer.chat_template) == tokenizer.chat_template


def test_a_plain_text_prompt_is_asked_as_the_question_of_the_learners_prompt(tokenizer):
    model = make_tiny_model(tokenizer, served=True)
    built = encode(tokenizer, model.prompt_template.build(tokenizer, QUESTION))
    plain = encode(tokenizer, QUESTION)
    expected = model.generate(**built, **SETTINGS, use_bank=False)
    output = model.generate(**plain, **SETTINGS, use_bank=False)
    # the caller's prompt, then the answer to the learner's prompt
    assert torch.equal(output[0, : plain["input_ids"].shape[1]], plain["input_ids"][0])
    assert torch.equal(output[0, plain["input_ids"].shape[1] :], expected[0, built["input_ids"].shape[1] :])
    raw = model.generate(**plain, **SETTINGS, use_bank=False, apply_learner_prompt=False)
    assert torch.equal(
        raw, model.language_model.generate(**plain, **SETTINGS, stop_strings=["\n"], tokenizer=tokenizer)
    )


def test_a_batch_of_plain_and_chat_rows_answers_each_as_alone(tokenizer):
    model = make_tiny_model(tokenizer, served=True)
    tokenizer = model.tokenizer
    tokenizer.padding_side = "right"  # either side: the learner's prompts are re-padded on the left
    texts = [QUESTION, model.prompt_template.build(tokenizer, "Who founded Quentville?")]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    output = model.generate(**batch, **SETTINGS, use_bank=False)
    assert torch.equal(output[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    for row, text in enumerate(texts):
        alone = encode(tokenizer, text)
        expected = new_text(tokenizer, model.generate(**alone, **SETTINGS, use_bank=False), alone)
        assert tokenizer.decode(output[row, batch["input_ids"].shape[1] :], skip_special_tokens=True) == expected


def test_pipeline_answers_a_plain_string_and_a_chat_message_like_generate(tokenizer, tiny_bank):
    model = make_tiny_model(tokenizer, served=True)
    model.attach_bank(tiny_bank)
    built = encode(tokenizer, model.prompt_template.build(tokenizer, QUESTION))
    expected = new_text(tokenizer, model.generate(**built, **SETTINGS), built)
    generator = pipeline("text-generation", model=model, tokenizer=model.tokenizer)
    plain = generator(QUESTION, return_full_text=False, **SETTINGS)[0]["generated_text"]
    chat = generator([{"role": "user", "content": QUESTION}], **SETTINGS)[0]["generated_text"][-1]["content"]
    again = generator(QUESTION, return_full_text=False, **SETTINGS)[0]["generated_text"]
    assert plain == chat == again == expected  # greedy: the pipeline's sampling defaults are not used


def test_the_learners_decoding_and_chat_template_round_trip(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer, served=True, system_prompt="Be brief.")
    model.generation_config.answer_repetition_penalty = 1.5
    model.generation_config.stop_strings = None
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["do_sample"] is False and saved["answer_repetition_penalty"] == 1.5
    loaded = ReGradForCausalLM.from_pretrained(tmp_path, base_model=make_tiny_base(tokenizer))
    assert loaded.generation_config.answer_repetition_penalty == 1.5 and loaded.generation_config.stop_strings is None
    reloaded = AutoTokenizer.from_pretrained(tmp_path)  # what pipeline(model=<the directory>) reads
    chat = reloaded.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    assert chat == PromptTemplate(system_prompt="Be brief.").build(tokenizer, QUESTION)


@pytest.mark.parametrize("old", ["bos, eos and pad", "no file"])
def test_a_learner_saved_without_its_decoding_loads_with_it(tokenizer, tmp_path, old):
    model = make_tiny_model(tokenizer, served=True, answer_repetition_penalty=1.2)
    model.save_pretrained(tmp_path)
    path = tmp_path / "generation_config.json"
    if old == "no file":
        path.unlink()
    else:
        path.write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "max_new_tokens": 9}))
    loaded = ReGradForCausalLM.from_pretrained(tmp_path, base_model=make_tiny_base(tokenizer))
    config = loaded.generation_config
    assert config.do_sample is False and config.stop_strings == ["\n"] and config.answer_repetition_penalty == 1.2
    assert config.max_new_tokens == (9 if old != "no file" else None)  # what the old file held is kept
