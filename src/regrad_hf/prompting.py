"""The prompt a learner is asked with: system instruction, user turn layout and where an answer stops.

A learner is meta-trained on answers that follow one prompt, so it must be served with that prompt. The template
lives in [`ReGradConfig`] (`system_prompt`, `user_template`, `document_template`, `answer_stop`,
`answer_repetition_penalty`) and travels with the learner (config.json, the Hub). [`PromptTemplate`] builds the
prompt of a (question, documents) pair through the tokenizer's chat template, and exposes how `generate` decodes
the answer (stop rule, repetition penalty) and the answer cut that goes with the stop rule. A learner is served with
them without being asked: see [`regrad_hf.modeling.served`] (its generation config and chat template).
"""

from __future__ import annotations

import re
import string
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from .errors import ReGradValueError

# The spirit of the paper's instruction; a 135M model still answers in sentences at times, hence the stop rule.
CONCISE_SYSTEM_PROMPT = "Answer the question concisely: a short phrase or a single word; sentences are not allowed."
DEFAULT_USER_TEMPLATE = "{context}Question: {question}\nAnswer:"
DEFAULT_DOCUMENT_TEMPLATE = "{document}\n\n"
ANSWER_STOPS = ("line", "turn")
MAX_REPETITION_PENALTY = 10.0
# The longest system prompt or template: far above any real one, low enough that the fields of a config.json stay
# well under the size a learner's config may be when loaded (16 MiB, even with every character escaped as \uXXXX).
MAX_TEMPLATE_CHARS = 1 << 18

_QUESTION_SENTINEL = "\x00regrad-question\x00"
_PLACEHOLDER = re.compile(r"(\{context\}|\{question\})")


def check_template(
    user_template: str, document_template: str, answer_stop: str, answer_repetition_penalty: float = 1.0
) -> None:
    """Raises [`ReGradValueError`] unless the templates have the placeholders they need and only those, the stop
    rule is known and the repetition penalty is a number from 1 to `MAX_REPETITION_PENALTY`."""
    if answer_stop not in ANSWER_STOPS:
        raise ReGradValueError(f"answer_stop must be one of {ANSWER_STOPS}, got {answer_stop!r}")
    penalty = answer_repetition_penalty
    if (
        not isinstance(penalty, (int, float))
        or isinstance(penalty, bool)
        or not 1.0 <= penalty <= MAX_REPETITION_PENALTY
    ):
        raise ReGradValueError(
            f"answer_repetition_penalty must be a number from 1 (off) to {MAX_REPETITION_PENALTY:g}, got {penalty!r}"
        )
    for name, template, needed, allowed in (
        ("user_template", user_template, {"question"}, {"question", "context"}),
        ("document_template", document_template, {"document"}, {"document", "index"}),
    ):
        check_text(name, template)
        try:
            parsed = [(f, conversion, spec) for _, f, spec, conversion in string.Formatter().parse(template)]
        except ValueError as error:
            raise ReGradValueError(
                f"{name} {template[:80]!r} is not a format string ({error}); write {{{{ for a brace"
            ) from error
        fields = {f for f, _, _ in parsed if f is not None}
        dressed = next((f for f, conversion, spec in parsed if f is not None and (conversion or spec)), None)
        if dressed is not None:  # `{question!r}`, `{index:s}`, `{question:>99999999999}`: fail or allocate later
            raise ReGradValueError(
                f"{name} {template[:80]!r} gives {{{dressed}}} a conversion or format spec; write the plain "
                f"{{{dressed}}}"
            )
        if not needed <= fields or not fields <= allowed:
            raise ReGradValueError(
                f"{name} {template!r} must contain {{{', '.join(sorted(needed))}}} and no placeholder other than "
                f"{', '.join('{' + f + '}' for f in sorted(allowed))}"
            )


def check_text(name: str, value: object, optional: bool = False) -> None:
    """Raises [`ReGradValueError`] unless `value` is a string (or `None` when `optional`) of at most
    [`MAX_TEMPLATE_CHARS`] characters that is valid Unicode (no lone surrogate, which no tokenizer can encode)."""
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise ReGradValueError(f"{name} must be a string{' or None' if optional else ''}, got {value!r:.80}")
    if len(value) > MAX_TEMPLATE_CHARS:
        raise ReGradValueError(
            f"{name} has {len(value)} characters, more than a prompt may have ({MAX_TEMPLATE_CHARS})"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ReGradValueError(f"{name} is not valid Unicode ({error.reason} at character {error.start})") from None


@dataclass(frozen=True)
class PromptTemplate:
    """How a question (and, for RAG / ReGrad+ICL, its documents) is put to the model.

    Args:
        system_prompt (`str`, *optional*): the system turn; `None` sends none (the chat template's own default,
            if it has one, then applies).
        user_template (`str`): the user turn; `{question}` is the question, `{context}` the documents (empty when
            the prompt carries none). Whitespace the template leaves at either end is stripped.
        document_template (`str`): how each document is written into `{context}`; `{document}` is its text,
            `{index}` its 1-based rank.
        answer_stop (`str`): `"line"` ends an answer at its first newline or at the end of the turn (see
            [`stop_strings`]); `"turn"` only at the end of the turn (the eos token).
        answer_repetition_penalty (`float`): the CTRL repetition penalty (transformers'
            `RepetitionPenaltyLogitsProcessor`) on the word tokens the answer has already produced: not on the
            prompt's, so that an answer may still copy the question or a document, and not on tokens without a
            letter (digits, punctuation, spaces), so that "1980" or "2,000" are not pushed to other numbers; 1 is
            off. See [`AnswerRepetitionPenalty`].
    """

    system_prompt: str | None = CONCISE_SYSTEM_PROMPT
    user_template: str = DEFAULT_USER_TEMPLATE
    document_template: str = DEFAULT_DOCUMENT_TEMPLATE
    answer_stop: str = "line"
    answer_repetition_penalty: float = 1.0

    def __post_init__(self):
        check_text("system_prompt", self.system_prompt, optional=True)
        check_template(self.user_template, self.document_template, self.answer_stop, self.answer_repetition_penalty)

    @classmethod
    def from_config(cls, config) -> PromptTemplate:
        """The template stored in a [`ReGradConfig`]."""
        return cls(
            config.system_prompt,
            config.user_template,
            config.document_template,
            config.answer_stop,
            config.answer_repetition_penalty,
        )

    def user_content(self, question: str, documents: Sequence[str] | None = None) -> str:
        """The text of the user turn."""
        context = "".join(
            self.document_template.format(document=document, index=index)
            for index, document in enumerate(documents or (), start=1)
        )
        # Format with a sentinel first, so the template's own edge whitespace is stripped but the question's is not.
        rendered = self.user_template.format(context=context, question=_QUESTION_SENTINEL).strip()
        return rendered.replace(_QUESTION_SENTINEL, question)

    def build(self, tokenizer, question: str, documents: Sequence[str] | None = None) -> str:
        """The whole prompt as text, through the tokenizer's chat template when it has one.

        Without a chat template: the system prompt, a blank line, the user turn and `"\\nAnswer:"` (unless the user
        turn already ends with `Answer:`).

        Args:
            tokenizer: the model's tokenizer.
            question (`str`): the question.
            documents (`Sequence[str]`, *optional*): documents to put in the prompt (RAG, ReGrad+ICL).

        Returns:
            `str`: the prompt, ending where the answer starts.
        """
        content = self.user_content(question, documents)
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": content}]
            if self.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            # The messages as built here: a learner's own chat template would lay the user turn out a second time.
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, apply_learner_prompt=False
            )
        text = content if content.rstrip().endswith("Answer:") else f"{content}\nAnswer:"
        return text if self.system_prompt is None else f"{self.system_prompt}\n\n{text}"

    def question_from_user_turn(self, text: str) -> str:
        """The question inside a user turn written with this template (the whole turn when it does not match), so
        that retrieval searches for the question and not for the template's words or the documents."""
        pattern = "".join(
            r"(?P<question>.*?)" if part == "{question}" else r".*?" if part == "{context}" else
            (r"\s*" + re.escape(part.strip()) + r"\s*" if part.strip() else r"\s*")
            for part in _PLACEHOLDER.split(self.user_template)
        )  # fmt: skip
        match = re.fullmatch(r"\s*" + pattern + r"\s*", text, flags=re.DOTALL)
        return (match["question"] if match and match["question"].strip() else text).strip()

    @property
    def stop_strings(self) -> list[str] | None:
        """The stop rule as transformers' `stop_strings` (`generate` then needs `tokenizer=`): `["\\n"]` for `"line"`,
        `None` for `"turn"` (the end of the turn is the eos token, which `generate` stops at anyway).

        `"\\n"` stops at the first token holding a newline. An answer that starts with a blank line therefore stops
        there, and [`cut`] makes it empty; the `EndOfLine` criterion used until 2026-12 went on to the end of the
        first line with text. Otherwise the two stop at the same token.
        """
        return ["\n"] if self.answer_stop == "line" else None

    def logits_processor(self, tokenizer, prompt_length: int) -> LogitsProcessorList:
        """The answer's repetition penalty for `generate(..., logits_processor=...)`; empty when it is off.
        `prompt_length` is the padded prompt length of the batch: tokens before it are not penalised."""
        if self.answer_repetition_penalty == 1.0:
            return LogitsProcessorList()
        penalty = AnswerRepetitionPenalty(float(self.answer_repetition_penalty), prompt_length, tokenizer)
        return LogitsProcessorList([penalty])

    def generation_kwargs(self, tokenizer, prompt_length: int) -> dict:
        """`stop_strings`, `tokenizer` and `logits_processor` for `generate`: how an answer asked with this template
        is decoded (its stop rule and repetition penalty), by any causal LM."""
        return {
            "stop_strings": self.stop_strings,
            "tokenizer": tokenizer,
            "logits_processor": self.logits_processor(tokenizer, prompt_length),
        }

    def cut(self, prediction: str) -> str:
        """A decoded answer cut by the stop rule (generation may overshoot it within the token that ends the line)."""
        text = prediction.strip()
        if self.answer_stop == "line":
            text = text.split("\n", 1)[0].strip()
        return text


def template_fields(values: Mapping[str, object]) -> dict[str, object]:
    """The prompt-template fields a command line gives: `None` values (not given) dropped, `\\n` in the text
    fields made a newline, and `system_prompt` `"none"` meaning no system turn.

    Args:
        values (`Mapping[str, object]`): field name (of [`config.PROMPT_FIELDS`]) to the value given or `None`.

    Returns:
        `dict[str, object]`: the fields to set, ready for [`PromptTemplate`] or [`ReGradConfig`].
    """
    fields = {}
    for name, value in values.items():
        if value is None:
            continue
        if name in ("system_prompt", "user_template", "document_template"):
            value = None if name == "system_prompt" and value == "none" else str(value).replace("\\n", "\n")
        fields[name] = value
    return fields


LEGACY_PROMPT = PromptTemplate(system_prompt=None, user_template="{context}{question}", answer_stop="turn")
"""The prompt of learners saved before the template existed (the `smollm2-135m-squad` learner shipped until
2026-12 was meta-trained with it): the question alone in the user turn, the documents before it separated by blank
lines, no system prompt, the answer ending at the end of the turn."""


_LETTERLESS_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def letterless_token_ids(tokenizer) -> torch.Tensor:
    """Ids of the tokens whose text has no letter (digits, punctuation, whitespace), computed once per tokenizer."""
    if tokenizer not in _LETTERLESS_IDS:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        ids = [i for i, text in enumerate(texts) if not any(c.isalpha() for c in text)]
        _LETTERLESS_IDS[tokenizer] = torch.tensor(ids, dtype=torch.long)
    return _LETTERLESS_IDS[tokenizer]


class AnswerRepetitionPenalty(RepetitionPenaltyLogitsProcessor):
    """transformers' repetition penalty over an answer's own word tokens.

    Tokenizers such as SmolLM2's write numbers digit by digit, so a plain per-token penalty turns "1980" into
    "1983" and "2,000" into "2,053" (on HotpotQA test it changed a number in 19 of RAG's 52 answers). Tokens
    without a letter are therefore exempt, and so is the prompt (`prompt_ignore_length`). Byte-level tokens that
    decode to no character alone (pieces of a multi-byte character) count as letterless too.

    Args:
        penalty (`float`): above 1 discourages repeats (CTRL's 1.2 is the usual value).
        prompt_length (`int`): the padded prompt length of the batch; earlier tokens are not penalised.
        tokenizer: tells which tokens have no letter (`None`: no token is exempt).
    """

    def __init__(self, penalty: float, prompt_length: int, tokenizer=None):
        super().__init__(penalty, prompt_ignore_length=prompt_length)
        self.exempt_ids = letterless_token_ids(tokenizer) if tokenizer is not None else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.exempt_ids is None:
            return super().__call__(input_ids, scores)
        if self.exempt_ids.device != scores.device:  # once per generate call, not once per step
            self.exempt_ids = self.exempt_ids.to(scores.device)
        exempt = self.exempt_ids[self.exempt_ids < scores.shape[-1]]
        kept = scores[..., exempt].clone()
        penalised = super().__call__(input_ids, scores)
        penalised[..., exempt] = kept
        return penalised
