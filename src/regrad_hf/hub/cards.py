"""Model cards of learners and gradient banks, rendered from `MODEL_CARD_TEMPLATE.md` with `huggingface_hub`'s
`ModelCard`, and merged into an existing README instead of overwriting it."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..defaults import DEFAULT_EMBEDDER_ID, EMBEDDED_MODEL_ID, EMBEDDED_MODEL_ORIGIN

LIBRARY_NAME = "regrad-hf"
PIPELINE_TAG = "text-generation"
UNNAMED_BASE = "an unnamed base model"  # a learner of a loaded model with no `name_or_path`
_BASE_KEYS = ("base_model", "base_revision")  # in a bank's learner identity
# The task of a learner's evaluation results in the card's model-index: `regrad eval` answers questions.
EVALUATION_TASK = "question-answering"
TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "templates" / "MODEL_CARD_TEMPLATE.md"
CARD_BEGIN = "<!-- regrad-hf:begin -->"
CARD_END = "<!-- regrad-hf:end -->"
_CARD_SECTION = re.compile(re.escape(CARD_BEGIN) + r".*?" + re.escape(CARD_END), re.DOTALL)


def _hub_id_or_none(name: str | None) -> str | None:
    """`name` if it can be a Hub repo id (card metadata may only name those), else None; the embedded model is
    named by the Hub model it quantises."""
    if name == EMBEDDED_MODEL_ID:
        return EMBEDDED_MODEL_ORIGIN
    if not name or ":" in name or Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None
    return name


def _card_data(base_model: str | None, tags: Sequence[str], extra: Mapping[str, Any] | None) -> ModelCardData:
    extra = dict(extra or {})
    tags = list(dict.fromkeys([*tags, *extra.pop("tags", [])]))
    extra.setdefault("pipeline_tag", PIPELINE_TAG)
    return ModelCardData(base_model=_hub_id_or_none(base_model), library_name=LIBRARY_NAME, tags=tags, **extra)


def _eval_results(evaluation: Mapping[str, float], dataset: str | None) -> list[EvalResult]:
    """The card's model-index entries: one per metric, on the first of the card's `datasets` when given."""
    return [
        EvalResult(
            task_type=EVALUATION_TASK,
            dataset_type=dataset or "custom",
            dataset_name=dataset or "custom",
            metric_type=name,
            metric_value=float(value),
        )
        for name, value in evaluation.items()
    ]


def render_model_card(
    config,
    *,
    fingerprint: str,
    num_lora_tensors: int,
    repo_id: str | None = None,
    card_data: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, float] | None = None,
) -> str:
    """The model card of a learner, from `MODEL_CARD_TEMPLATE.md`.

    Args:
        config ([`ReGradConfig`]): the learner's configuration.
        fingerprint (`str`): the learner's fingerprint (what its banks are tied to).
        num_lora_tensors (`int`): how many LoRA tensors it trains.
        repo_id (`str`, *optional*): the repo it is pushed to (for the usage example).
        card_data (`Mapping`, *optional*): more `ModelCardData` fields, e.g. `datasets`, `metrics`, `license`,
            `language`, `tags` (added to regrad-hf's), and `title`.
        evaluation (`Mapping[str, float]`, *optional*): metric name -> value, rendered as a table and as the card's
            model-index (`huggingface_hub.EvalResult`; the dataset is the first of `card_data["datasets"]` when given).

    Returns:
        `str`: the card (YAML metadata and markdown).
    """
    extra = dict(card_data or {})
    title = extra.pop("title", None)
    data = _card_data(config.base_model_name_or_path, ("regrad", "retrievable-gradients", "lora"), extra)
    if evaluation and not data.metrics:
        data.metrics = list(evaluation)
    if evaluation and not data.eval_results:
        data.eval_results = _eval_results(evaluation, (data.datasets or [None])[0])
        data.model_name = data.model_name or title or repo_id or "regrad-learner"
    card = ModelCard.from_template(
        data,
        template_path=str(TEMPLATE_PATH),
        kind="model",
        title=title,
        repo_id=repo_id or "<this repo or directory>",
        base_model_id=config.base_model_name_or_path or UNNAMED_BASE,
        base_model_revision=config.base_model_revision,
        lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha,
        num_lora_tensors=num_lora_tensors,
        target_modules=", ".join(config.target_modules or ["the MLP projections"])
        + (f" of layers {config.target_layers}" if config.target_layers else " of the upper half of the layers"),
        step_size_mode=config.step_size_mode,
        step_size_parametrization=config.step_size_parametrization,
        gamma=config.gamma,
        top_k_docs=config.top_k_docs,
        fingerprint=fingerprint,
        embedder=config.embedder or DEFAULT_EMBEDDER_ID,
        evaluation={name: f"{value:.4g}" for name, value in (evaluation or {}).items()},
        evaluation_dataset=(data.datasets or [None])[0],
    )
    return str(card)


def render_bank_card(
    bank_config: Mapping[str, Any],
    *,
    repo_id: str | None = None,
    subfolder: str | None = None,
    card_data: Mapping[str, Any] | None = None,
) -> str:
    """The card of a gradient bank, from `MODEL_CARD_TEMPLATE.md` and the bank's `bank_config.json` contents.

    Args:
        bank_config (`Mapping`): the contents of `bank_config.json`.
        repo_id (`str`, *optional*), subfolder (`str`, *optional*): where it is pushed (for the usage example).
        card_data (`Mapping`, *optional*): more `ModelCardData` fields and `title`, as in [`render_model_card`].

    Returns:
        `str`: the card.
    """
    extra = dict(card_data or {})
    title = extra.pop("title", None)
    # The learner identity stores names as strings (`str(None)` for none): it is hashed into the fingerprint.
    base, revision = (None if value == "None" else value for value in map(bank_config["learner"].get, _BASE_KEYS))
    data = _card_data(base, ("regrad", "retrievable-gradients", "gradient-bank"), extra)
    card = ModelCard.from_template(
        data,
        template_path=str(TEMPLATE_PATH),
        kind="bank",
        title=title,
        repo_id=repo_id or "<this repo or directory>",
        subfolder=subfolder,
        num_documents=bank_config["num_documents"],
        num_shards=len(bank_config["shards"]),
        base_model_id=base or UNNAMED_BASE,
        base_model_revision=revision,
        fingerprint=bank_config["fingerprint"],
        dtype=bank_config["dtype"],
        embedder=bank_config["embedder"],
        embedding_dim=bank_config["embedding_dim"],
        format_version=bank_config["format_version"],
    )
    return str(card)


def render_adapter_card(base_model: str | None, base_model_revision: str | None, loadable_base: str | None) -> str:
    """The `README.md` of an exported peft adapter ([`ReGradForCausalLM.export_adapter`]): peft's metadata, and the
    learner's base model with its revision, which the adapter config may not carry (it records a loadable base).

    Args:
        base_model (`str`, *optional*), base_model_revision (`str`, *optional*): the learner's base, as in its config.
        loadable_base (`str`, *optional*): the base recorded in `adapter_config.json` (a Hub id or a local folder).
    """
    revision = f" (revision `{base_model_revision}`)" if base_model_revision else ""
    loads = (
        ""
        if loadable_base == base_model
        else f" `AutoPeftModelForCausalLM` loads it from `{loadable_base}`, a folder of the machine that exported it."
    )
    data = ModelCardData(
        base_model=_hub_id_or_none(base_model),
        library_name="peft",
        pipeline_tag=PIPELINE_TAG,
        tags=["regrad", "lora", "peft"],
    )
    text = (
        f"# LoRA adapter exported from a ReGrad learner\n\nBase model: `{base_model}`{revision}.{loads}\n\n"
        "```python\nfrom peft import AutoPeftModelForCausalLM\n\n"
        'model = AutoPeftModelForCausalLM.from_pretrained("<this directory>")\n```\n'
    )
    return f"---\n{data.to_yaml()}\n---\n\n{text}"


def merge_card(existing: str | None, new: str) -> str:
    """Updates an existing README with a newly rendered card instead of overwriting it.

    Metadata: the existing fields are kept, the new card's fields replace those of the same name (tags are
    united). Text: the regrad-hf section (between `<!-- regrad-hf:begin -->` and `<!-- regrad-hf:end -->`) is
    replaced, or appended when the README has none; everything else is kept.

    Args:
        existing (`str`, *optional*): the current README, if any.
        new (`str`): the rendered card.

    Returns:
        `str`: the README to write.
    """
    if existing is None or not existing.strip():
        return new
    old_card, new_card = ModelCard(existing, ignore_metadata_errors=True), ModelCard(new)
    metadata = old_card.data.to_dict()
    for key, value in new_card.data.to_dict().items():
        if key == "tags" and metadata.get("tags"):
            value = list(dict.fromkeys([*metadata["tags"], *value]))
        metadata[key] = value
    section = _CARD_SECTION.search(new_card.text)
    section_text = section.group(0) if section else new_card.text.strip()
    if _CARD_SECTION.search(old_card.text):
        text = _CARD_SECTION.sub(lambda _: section_text, old_card.text, count=1)
    else:
        text = old_card.text.rstrip() + "\n\n" + section_text + "\n"
    return f"---\n{ModelCardData(**metadata).to_yaml()}\n---\n{text}"
