"""What to retrieve for: the text of a prompt, or only its last user turn when the prompt is a chat; with the
learner's [`PromptTemplate`], only the question inside that turn (not the instruction, labels or documents)."""

from __future__ import annotations

import os
from functools import lru_cache

from ..prompting import PromptTemplate

_SENTINELS = ("\x00regrad-user-1\x00", "\x00regrad-assistant\x00", "\x00regrad-user-2\x00")


def _common_prefix(a: str, b: str) -> str:
    return os.path.commonprefix([a, b])


def _common_suffix(a: str, b: str) -> str:
    return os.path.commonprefix([a[::-1], b[::-1]])[::-1]


@lru_cache(maxsize=32)
def _user_turn_markers(chat_template: str, tokenizer) -> tuple[str, str] | None:
    """The text that opens and closes a user turn in this chat template, found by rendering sentinel messages."""
    first, reply, second = _SENTINELS
    messages = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": second},
    ]
    try:
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False, apply_learner_prompt=False
        )  # the turn markers of the base template, not the learner's layout inside them
    except Exception:  # templates raise on their own terms (e.g. Jinja errors); then we treat prompts as plain text
        return None
    if not all(sentinel in rendered for sentinel in _SENTINELS):
        return None
    before_first, rest = rendered.split(first, 1)
    between_first_and_reply, rest = rest.split(reply, 1)
    between_reply_and_second, after_second = rest.split(second, 1)
    opener = _common_suffix(before_first, between_reply_and_second)
    closer = _common_prefix(between_first_and_reply, after_second)
    if not opener.strip() or not closer.strip():
        return None
    return opener, closer


def prompt_to_query(tokenizer, input_ids, prompt: PromptTemplate | None = None) -> str:
    """The retrieval query for one prompt.

    For a chat-formatted prompt (the tokenizer has a chat template and the prompt contains its user-turn markers)
    this is the content of the last user turn, so that a long system prompt does not drown the retrieval.
    Otherwise it is the whole prompt decoded without special tokens (less `prompt`'s system prompt and the trailing
    `Answer:` its plain-text layout adds). With `prompt`, the text is then narrowed to the question of its
    `user_template` (e.g. `"Question: {question}\nAnswer:"` gives the question alone).

    Args:
        tokenizer: the model's tokenizer.
        input_ids: a 1-D sequence of token ids, padding already removed.
        prompt ([`PromptTemplate`], *optional*): the template the prompt was written with (the learner's).

    Returns:
        `str`: the query text.
    """
    text = _turn_or_text(tokenizer, list(input_ids), prompt)
    return text if prompt is None else prompt.question_from_user_turn(text)


def _turn_or_text(tokenizer, ids: list[int], prompt: PromptTemplate | None) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        markers = _user_turn_markers(template, tokenizer)
        if markers is not None:
            opener, closer = markers
            text = tokenizer.decode(ids, skip_special_tokens=False)
            start = text.rfind(opener)
            if start >= 0:
                turn = text[start + len(opener) :]
                end = turn.find(closer)
                turn = turn if end < 0 else turn[:end]
                # Re-encode and decode so special tokens inside the turn (if any) are dropped like elsewhere.
                return tokenizer.decode(
                    tokenizer.encode(turn, add_special_tokens=False), skip_special_tokens=True
                ).strip()
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    if prompt is not None and not template:  # undo the plain-text layout of `PromptTemplate.build`
        if prompt.system_prompt is not None and text.startswith(prompt.system_prompt):
            text = text[len(prompt.system_prompt) :]
        if text.endswith("\nAnswer:") and not prompt.user_template.rstrip().endswith("Answer:"):
            text = text[: -len("\nAnswer:")]
    return text.strip()
