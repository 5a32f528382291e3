"""How a learner is served where its user does not build the prompt or pick the decoding: `model.generate` without
settings, `pipeline("text-generation", model=model, tokenizer=model.tokenizer)`, a saved learner loaded by name.

- Its `GenerationConfig` holds the decoding it was evaluated with: greedy, `stop_strings=["\\n"]` for the `"line"`
  stop rule, and two entries of its own that [`~ReGradForCausalLM.generate`] reads: `answer_repetition_penalty` (an
  [`AnswerRepetitionPenalty`] logits processor) and `apply_learner_prompt` (plain-text prompts asked as questions).
- Its tokenizer's chat template puts the learner's system turn and user-turn layout around the messages of a chat;
  `apply_chat_template(..., apply_learner_prompt=False)` renders them as given (the base model's template).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence

import torch
from transformers import GenerationConfig, LogitsProcessorList

from ..errors import ReGradError
from ..prompting import AnswerRepetitionPenalty, PromptTemplate

# The entries of a learner's GenerationConfig that transformers does not know (it keeps and saves them as they are).
PENALTY_KEY = "answer_repetition_penalty"
PROMPT_KEY = "apply_learner_prompt"
LINE_STOP = ["\n"]
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "typical_p")

_BEGIN = "{# regrad-hf: the learner's prompt around the messages (unless apply_learner_prompt is false) #}"
_END = "{# regrad-hf: the base model's chat template #}"
_QUESTION = "\x00regrad-question\x00"


def learner_generation_config(
    base: GenerationConfig, template: PromptTemplate, saved: GenerationConfig | None = None
) -> GenerationConfig:
    """The generation config a learner is served with.

    Args:
        base (`GenerationConfig`): the base model's (token ids, limits).
        template ([`PromptTemplate`]): the learner's prompt, whose stop rule and repetition penalty it carries.
        saved (`GenerationConfig`, *optional*): the learner's saved one. One written by this version (it has
            `apply_learner_prompt`) is returned as it is; an older one gets the learner's decoding on top.

    Returns:
        `GenerationConfig`: greedy (sampling settings cleared), `stop_strings=["\\n"]` for the `"line"` stop rule
        (`None` for `"turn"`: the eos token ends the answer), `answer_repetition_penalty` and
        `apply_learner_prompt=True`.
    """
    if saved is not None and hasattr(saved, PROMPT_KEY):
        return saved
    config = copy.deepcopy(saved if saved is not None else base)
    # A config made from a model's config.json is loaded back without the entries transformers does not know.
    config._from_model_config = False
    for name in _SAMPLING:
        setattr(config, name, None)
    config.do_sample = False
    config.stop_strings = list(LINE_STOP) if template.answer_stop == "line" else None
    setattr(config, PENALTY_KEY, float(template.answer_repetition_penalty))
    setattr(config, PROMPT_KEY, True)
    return config


def served_as_learner(config, base: GenerationConfig, tokenizer) -> tuple[GenerationConfig, object]:
    """The generation config and tokenizer of a learner built with this [`ReGradConfig`]: its
    [`learner_generation_config`], and a copy of `tokenizer` with its chat template (see [`install_chat_template`]),
    so that the caller's tokenizer keeps its own; a tokenizer without a chat template is returned as it is."""
    template = PromptTemplate.from_config(config)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        tokenizer = copy.copy(tokenizer)
        install_chat_template(tokenizer, template)
    return learner_generation_config(base, template), tokenizer


def effective_config(own: GenerationConfig, given: GenerationConfig | None, kwargs: dict) -> tuple:
    """What a `generate` call decodes with, as transformers merges it: `given` (else the learner's `own`) with the
    unset fields of `own` filled in, then the call's generation kwargs on top.

    Returns:
        `tuple`: the merged `GenerationConfig` and the kwargs it did not take (the model's inputs, processors, ...).
    """
    config = copy.deepcopy(given if given is not None else own)
    if given is not None:
        config.update(**own.to_dict(), defaults_only=True, allow_custom_entries=True)
    return config, config.update(**kwargs)


def learner_processors(config: GenerationConfig, kwargs: dict, tokenizer, prompt_length: int) -> dict:
    """`kwargs` with what `config`'s learner entries ask for: the answer repetition penalty appended to
    `logits_processor` (unless it already holds one: the evaluation passes its own), and the tokenizer that
    `stop_strings` need."""
    penalty = getattr(config, PENALTY_KEY, 1.0) or 1.0
    processors = LogitsProcessorList(kwargs.get("logits_processor") or [])
    if penalty != 1.0 and not any(isinstance(p, AnswerRepetitionPenalty) for p in processors):
        processors.append(AnswerRepetitionPenalty(float(penalty), prompt_length, tokenizer))
        kwargs = {**kwargs, "logits_processor": processors}
    if config.stop_strings and kwargs.get("tokenizer") is None:
        if tokenizer is None:
            raise ReGradError("stop_strings need the model's tokenizer: pass tokenizer= to generate")
        kwargs = {**kwargs, "tokenizer": tokenizer}
    return kwargs


def is_plain_text(ids: Sequence[int], tokenizer) -> bool:
    """Whether a prompt is plain text: no special token but a leading bos (a chat template writes turn markers)."""
    special = set(tokenizer.all_special_ids)
    start = 1 if ids and ids[0] == tokenizer.bos_token_id else 0
    return not any(token in special for token in ids[start:])


class PlainPrompts:
    """A batch whose plain-text rows are asked as questions in the learner's prompt, and the output put back on the
    rows as given (the caller's prompt, then the new tokens), so that `pipeline` and callers slicing off their own
    prompt see only the answer.

    Args:
        input_ids (`torch.Tensor`): the batch as given (2-D).
        attention_mask (`torch.Tensor`, *optional*): its mask (padding on either side).
        tokenizer: the model's tokenizer; its chat template must be a string.
        template ([`PromptTemplate`]): the learner's prompt.
    """

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, tokenizer, template):
        self.given = input_ids
        rows = [ids if attention_mask is None else ids[attention_mask[i].bool()] for i, ids in enumerate(input_ids)]
        rows = [row.tolist() for row in rows]
        self.wrapped = any(is_plain_text(row, tokenizer) for row in rows)
        if not self.wrapped:
            return
        built = [
            tokenizer(
                template.build(tokenizer, tokenizer.decode(row, skip_special_tokens=True)), add_special_tokens=False
            )["input_ids"]
            if is_plain_text(row, tokenizer)
            else row
            for row in rows
        ]
        width = max(map(len, built))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Left padding, as a decoder-only batch needs whatever side the caller padded on.
        self.input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in built], device=input_ids.device)
        self.attention_mask = torch.tensor(
            [[0] * (width - len(r)) + [1] * len(r) for r in built], device=input_ids.device
        )

    def restore(self, output):
        """`generate`'s output (tensor or `ModelOutput`) with each row's prompt replaced by the one given."""
        if not self.wrapped:
            return output
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        given = self.given.repeat_interleave(sequences.shape[0] // self.given.shape[0], dim=0)  # num_return_sequences
        restored = torch.cat([given.to(sequences.device), sequences[:, self.input_ids.shape[1] :]], dim=1)
        if isinstance(output, torch.Tensor):
            return restored
        output.sequences = restored
        return output


def _literal(text: str) -> str:
    """A Jinja string literal of `text` (Jinja reads backslash escapes as Python does; no brace in it)."""
    return json.dumps(text, ensure_ascii=False).replace("{", "\\u007b").replace("}", "\\u007d")


def base_chat_template(chat_template: str) -> str:
    """The base model's chat template inside a learner's (`chat_template` itself when it is not a learner's)."""
    if chat_template.startswith(_BEGIN) and _END in chat_template:
        return chat_template.split(_END, 1)[1]
    return chat_template


def learner_chat_template(chat_template: str, template: PromptTemplate) -> str:
    """A chat template that renders a chat as the learner was trained to read it, around the base model's.

    Unless the chat opens with a system turn, the learner's system prompt is put first (none when it has none: the
    base template's default then applies, as in [`PromptTemplate.build`]); every user turn whose content is text is
    laid out by the learner's `user_template` without documents (`"Question: {question}\\nAnswer:"`). With
    `apply_learner_prompt=False` passed to `apply_chat_template`, the messages are rendered as given.

    Args:
        chat_template (`str`): the base model's chat template (or a learner's, whose base is then used).
        template ([`PromptTemplate`]): the learner's prompt.
    """
    before, after = template.user_content(_QUESTION).split(_QUESTION)
    system = ""
    if template.system_prompt is not None:
        system = (
            "{%- if not messages or messages[0]['role'] != 'system' -%}"
            f"{{%- set ns.messages = [{{'role': 'system', 'content': {_literal(template.system_prompt)}}}] -%}}"
            "{%- endif -%}"
        )
    return (
        _BEGIN
        + "{%- if apply_learner_prompt is not defined or apply_learner_prompt -%}"
        + "{%- set ns = namespace(messages=[]) -%}"
        + system
        + "{%- for message in messages -%}"
        + "{%- if message['role'] == 'user' and message['content'] is string -%}"
        + "{%- set ns.messages = ns.messages + [{'role': 'user', 'content': "
        + f"{_literal(before)} + message['content'] + {_literal(after)}}}] -%}}"
        + "{%- else -%}{%- set ns.messages = ns.messages + [message] -%}{%- endif -%}"
        + "{%- endfor -%}"
        + "{%- set messages = ns.messages -%}"
        + "{%- endif -%}"
        + _END
        + base_chat_template(chat_template)
    )


def install_chat_template(tokenizer, template: PromptTemplate) -> None:
    """Gives `tokenizer` the learner's chat template (see [`learner_chat_template`]); a tokenizer without a chat
    template (or with several, by name) is left as it is."""
    current = getattr(tokenizer, "chat_template", None)
    if isinstance(current, str):
        tokenizer.chat_template = learner_chat_template(current, template)
