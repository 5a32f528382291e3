"""A learner's model card and its upload to the Hub, as methods of [`ReGradForCausalLM`]."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence

from .cards import render_model_card
from .repos import push_folder


class LearnerPublishingMixin:
    """[`model_card`] and [`push_to_hub`] of [`ReGradForCausalLM`] (it provides `save_pretrained`, `fingerprint`,
    `config` and `_lora`)."""

    def model_card(
        self,
        repo_id: str | None = None,
        card_data: Mapping[str, object] | None = None,
        evaluation: Mapping[str, float] | None = None,
    ) -> str:
        """The learner's model card (rendered from `MODEL_CARD_TEMPLATE.md`), as [`push_to_hub`] writes it.

        Args:
            repo_id (`str`, *optional*): the repo it is pushed to (for the usage example).
            card_data (`Mapping`, *optional*): more card metadata: `datasets`, `metrics`, `license`, `language`,
                `tags` (added to regrad-hf's) and a `title`.
            evaluation (`Mapping[str, float]`, *optional*): metric name -> value, rendered as a table.
        """
        return render_model_card(
            self.config,
            fingerprint=self.fingerprint(),
            num_lora_tensors=len(self._lora),
            repo_id=repo_id,
            card_data=card_data,
            evaluation=evaluation,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        tags: Sequence[str] | None = None,
        card_data: Mapping[str, object] | None = None,
        evaluation: Mapping[str, float] | None = None,
        **kwargs,
    ):
        """Uploads the learner (what [`save_pretrained`] writes: never the base weights) and its model card to a Hub
        repo, created if needed, in one commit. An existing README in the repo is updated, not overwritten.

        The attached bank is not uploaded: push it with `model.bank.push_to_hub(repo_id, subfolder="bank")` to put
        it where [`from_pretrained`] attaches it, or to a repo of its own.

        Args:
            repo_id (`str`): the repo, e.g. `"user/my-learner"`.
            commit_message, commit_description, private, token, revision, create_pr: as in `transformers`.
            tags (`Sequence[str]`, *optional*): more tags for the card.
            card_data, evaluation: more card contents (see [`model_card`]).

        Returns:
            `huggingface_hub.CommitInfo`: the commit (its sha is `.oid`, a PR's URL `.pr_url`).
        """
        card_data = dict(card_data or {})
        card_data["tags"] = [*card_data.get("tags", []), *(tags or [])]
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return push_folder(
                folder,
                repo_id,
                commit_message=commit_message or "Upload ReGrad learner",
                commit_description=commit_description,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
                card=self.model_card(repo_id, card_data, evaluation),
            )
