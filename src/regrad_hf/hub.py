"""What [`ReGradForCausalLM`] and [`GradientBank`] share for Hub I/O: finding their files (a local directory or a
Hub repo, through the cache), pushing a folder to a repo, and their model cards.

Only `huggingface_hub`'s public API is used (`snapshot_download`, `hf_hub_download`, `HfApi.create_repo`,
`HfApi.create_commit`, `ModelCard`), with the keyword names of `transformers` (`revision`, `token`, `cache_dir`,
`local_files_only`, `force_download`, `subfolder`). Downloads are restricted to named data files (never code or
pickles), and `HfApi` is created per call so that the endpoint is read when the call is made.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)
from huggingface_hub.utils import filter_repo_objects

from .defaults import DEFAULT_EMBEDDER_ID
from .errors import ReGradHubError, ReGradValueError

LIBRARY_NAME = "regrad-hf"
README_FILE = "README.md"
TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "MODEL_CARD_TEMPLATE.md"
CARD_BEGIN = "<!-- regrad-hf:begin -->"
CARD_END = "<!-- regrad-hf:end -->"
_CARD_SECTION = re.compile(re.escape(CARD_BEGIN) + r".*?" + re.escape(CARD_END), re.DOTALL)
# What `regrad pull` downloads: data files only. Code (*.py) and pickles (*.bin, *.pt, *.pkl) are never fetched.
DATA_FILE_PATTERNS = ("*.json", "*.jsonl", "*.safetensors", "*.usearch", "*.md", "*.jinja", "*.txt")


@dataclass(frozen=True)
class HubOptions:
    """How to reach a repo's files; the keyword names and meanings of `transformers.from_pretrained`.

    Args:
        revision (`str`, *optional*): branch, tag or commit of the repo (default: its main branch).
        token (`str` or `bool`, *optional*): Hub token; `None` uses the saved login.
        cache_dir (`str` or `os.PathLike`, *optional*): the Hub cache (default: `HF_HUB_CACHE`).
        local_files_only (`bool`, defaults to `False`): never contact the Hub, read the cache only (as does
            `HF_HUB_OFFLINE=1`).
        force_download (`bool`, defaults to `False`): download again even when cached.
    """

    revision: str | None = None
    token: str | bool | None = None
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool = False
    force_download: bool = False

    @property
    def offline(self) -> bool:
        return self.local_files_only or constants.HF_HUB_OFFLINE


@dataclass(frozen=True)
class Location:
    """Where the files of a learner or a bank are: a local directory, or a Hub repo at a fixed commit.

    `directory` holds the files fetched so far; [`Location.fetch`] gets one more (downloading it on first use for a
    repo, so that large files such as gradient shards are only downloaded when needed).
    """

    directory: Path
    repo_id: str | None = None
    commit: str | None = None
    subfolder: str = ""
    options: HubOptions = field(default_factory=HubOptions)

    @property
    def is_remote(self) -> bool:
        return self.repo_id is not None

    def describe(self, relative: str = "") -> str:
        """A human-readable name of a file: its local path, or `repo@commit:path` for a repo."""
        if not self.is_remote:
            return str(self.directory / relative) if relative else str(self.directory)
        path = str(PurePosixPath(self.subfolder, relative)) if relative else self.subfolder
        return f"{self.repo_id}@{self.commit[:12]}" + (f":{path}" if path else "")

    def fetch(self, relative: str) -> Path:
        """The local path of one file, downloaded first for a repo (pinned to this location's commit).

        Raises:
            [`ReGradValueError`]: the repo has no such file. [`ReGradHubError`]: it is not cached and the Hub
            cannot be used (offline).
        """
        if not self.is_remote:
            return self.directory / relative
        filename = str(PurePosixPath(self.subfolder, relative))
        try:
            return Path(
                hf_hub_download(
                    self.repo_id,
                    filename,
                    revision=self.commit,
                    token=self.options.token,
                    cache_dir=self.options.cache_dir,
                    local_files_only=self.options.local_files_only,
                    force_download=self.options.force_download,
                )
            )
        except RemoteEntryNotFoundError as error:
            raise ReGradValueError(f"bank file {self.describe(relative)} is missing from the repo") from error
        except LocalEntryNotFoundError as error:
            raise _offline_error(self.repo_id, self.commit, [filename], self.options) from error


def locate(
    name_or_path: str | os.PathLike,
    files: Sequence[str],
    *,
    subfolder: str | None = None,
    options: HubOptions | None = None,
) -> Location:
    """Finds a learner or a bank: a local directory as it is, or a Hub repo whose `files` are downloaded now.

    The revision is resolved to a commit once, and every later download of the same [`Location`] uses that commit,
    so that a push in the meantime cannot mix files of two versions.

    Args:
        name_or_path (`str` or `os.PathLike`): a local directory or a Hub repo id.
        files (`Sequence[str]`): names (or glob patterns) of the files to download now, relative to `subfolder`.
        subfolder (`str`, *optional*): a folder inside the directory or repo, e.g. `"bank"`.
        options ([`HubOptions`], *optional*): revision, token, cache and offline settings.

    Returns:
        [`Location`]

    Raises:
        [`ReGradValueError`]: not a directory nor a valid repo id, or an unknown revision.
        [`ReGradHubError`]: the repo does not exist (or is private), or it is not in the cache while offline.
    """
    options = options or HubOptions()
    subfolder = (subfolder or "").strip("/")
    local = Path(name_or_path)
    if local.is_dir():
        return Location(local / subfolder, subfolder=subfolder, options=options)
    repo_id = str(name_or_path)
    patterns = [str(PurePosixPath(subfolder, name)) for name in files]
    api = HfApi(token=options.token)
    try:
        revision = api.resolve_revision(
            repo_id, revision=options.revision, cache_dir=options.cache_dir, local_files_only=options.offline
        )
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            token=options.token,
            cache_dir=options.cache_dir,
            local_files_only=options.local_files_only,
            force_download=options.force_download,
        )
    except HFValidationError as error:
        raise ReGradValueError(f"{name_or_path} is neither a local directory nor a Hub repo id") from error
    except RevisionNotFoundError as error:
        raise ReGradValueError(f"{repo_id} has no revision {options.revision!r}") from error
    except RepositoryNotFoundError as error:
        raise ReGradHubError(
            f"{repo_id} is not a local directory, and no repo of that name is on {constants.ENDPOINT} (or it is "
            "private: pass token=)"
        ) from error
    except (RevisionResolutionError, LocalEntryNotFoundError) as error:
        raise _offline_error(repo_id, options.revision, patterns, options) from error
    directory = Path(snapshot)
    return Location(
        directory / subfolder,
        repo_id=repo_id,
        commit=revision.resolved,
        subfolder=subfolder,
        options=options,
    )


def _offline_error(repo_id: str, revision: str | None, files: Sequence[str], options: HubOptions) -> ReGradHubError:
    cache = options.cache_dir or constants.HF_HUB_CACHE
    why = (
        "local_files_only=True"
        if options.local_files_only
        else "HF_HUB_OFFLINE=1"
        if constants.HF_HUB_OFFLINE
        else f"{constants.ENDPOINT} cannot be reached"
    )
    return ReGradHubError(
        f"{repo_id} (revision {revision or 'main'}) is not in the local cache {cache}: missing {', '.join(files)}, "
        f"and it cannot be downloaded ({why}). Load it once online (or `regrad pull {repo_id} DIR` and load DIR)."
    )


# ---------------------------------------------------------------------------------------------------------- pushing


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    path_in_repo: str = "",
    commit_message: str,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    delete_patterns: Sequence[str] = (),
    card: str | None = None,
):
    """Uploads the files of `folder` to `repo_id` (created if needed) in one commit, with a model card.

    The card updates the README rather than overwriting it (see [`merge_card`]): the README of `folder` if it has
    one, else the one already in the repo, else none. Hidden files and folders are not uploaded.

    Args:
        folder (`str` or `os.PathLike`): what to upload.
        repo_id (`str`): the target repo, created (as `private` if given) when it does not exist.
        path_in_repo (`str`, defaults to the repo root): where the files go in the repo, e.g. `"bank"`.
        commit_message, commit_description, token, revision, create_pr: as in `HfApi.create_commit`; a `revision`
            that is not a branch yet is created from the main branch.
        delete_patterns (`Sequence[str]`): repo files under `path_in_repo` matching these patterns and absent from
            `folder` are deleted in the same commit (e.g. gradient shards of an earlier, larger bank).
        card (`str`, *optional*): a rendered card ([`render_model_card`], [`render_bank_card`]) for `README.md`.

    Returns:
        `huggingface_hub.CommitInfo`: with the commit sha as `.oid` (and the PR URL as `.pr_url`).
    """
    folder = Path(folder)
    prefix = path_in_repo.strip("/")
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not create_pr and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)

    local = {
        path.relative_to(folder).as_posix(): path
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    }
    readme = str(PurePosixPath(prefix, README_FILE))  # PurePosixPath("", name) is name
    operations: list = [
        CommitOperationAdd(path_in_repo=str(PurePosixPath(prefix, relative)), path_or_fileobj=str(path))
        for relative, path in local.items()
        if not (card is not None and relative == README_FILE)
    ]
    if card is not None:
        existing = (
            local[README_FILE].read_text(encoding="utf-8")
            if README_FILE in local
            else _remote_text(api, repo_id, readme, revision)
        )
        operations.append(CommitOperationAdd(path_in_repo=readme, path_or_fileobj=merge_card(existing, card).encode()))
    if delete_patterns:
        remote_files = api.list_repo_files(repo_id, revision=revision)
        under = [name[len(prefix) + 1 :] if prefix else name for name in remote_files if _is_under(name, prefix)]
        for relative in filter_repo_objects(under, allow_patterns=list(delete_patterns)):
            if relative not in local:
                operations.append(CommitOperationDelete(path_in_repo=str(PurePosixPath(prefix, relative))))
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message,
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )


def pull(
    repo_id: str, local_dir: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
) -> Path:
    """Downloads the data files of a repo (learner, tokenizer, bank, cards: [`DATA_FILE_PATTERNS`], never code or
    pickles) into `local_dir`, which can then be loaded, edited or pushed like any saved learner or bank.

    Returns:
        `Path`: `local_dir`.
    """
    try:
        folder = snapshot_download(
            repo_id, revision=revision, token=token, local_dir=local_dir, allow_patterns=list(DATA_FILE_PATTERNS)
        )
    except HFValidationError as error:
        raise ReGradValueError(f"{repo_id} is not a Hub repo id") from error
    except RepositoryNotFoundError as error:
        raise ReGradHubError(f"no repo {repo_id} on {constants.ENDPOINT} (or it is private: pass a token)") from error
    except RevisionNotFoundError as error:
        raise ReGradValueError(f"{repo_id} has no revision {revision!r}") from error
    return Path(folder)


def _is_under(name: str, prefix: str) -> bool:
    return not prefix or name.startswith(prefix + "/")


def _remote_text(api: HfApi, repo_id: str, filename: str, revision: str | None) -> str | None:
    """A text file of the repo, or None if it has none (a new repo, a new branch)."""
    try:
        path = hf_hub_download(repo_id, filename, revision=revision, token=api.token)
    except (EntryNotFoundError, RemoteEntryNotFoundError, RevisionNotFoundError):
        return None
    return Path(path).read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------------ model cards


def _hub_id_or_none(name: str | None) -> str | None:
    """`name` if it can be a Hub repo id (card metadata may only name those), else None."""
    if not name or ":" in name or Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None
    return name


def _card_data(base_model: str | None, tags: Sequence[str], extra: Mapping[str, Any] | None) -> ModelCardData:
    extra = dict(extra or {})
    tags = list(dict.fromkeys([*tags, *extra.pop("tags", [])]))
    return ModelCardData(base_model=_hub_id_or_none(base_model), library_name=LIBRARY_NAME, tags=tags, **extra)


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
        evaluation (`Mapping[str, float]`, *optional*): metric name -> value, rendered as a table (the evaluation
            dataset is the first of `card_data["datasets"]` when given).

    Returns:
        `str`: the card (YAML metadata and markdown).
    """
    extra = dict(card_data or {})
    title = extra.pop("title", None)
    data = _card_data(config.base_model_name_or_path, ("regrad", "retrievable-gradients", "lora"), extra)
    if evaluation and not data.metrics:
        data.metrics = list(evaluation)
    card = ModelCard.from_template(
        data,
        template_path=str(TEMPLATE_PATH),
        kind="model",
        title=title,
        repo_id=repo_id or "<this repo or directory>",
        base_model_id=config.base_model_name_or_path,
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
    learner = bank_config["learner"]
    data = _card_data(learner.get("base_model"), ("regrad", "retrievable-gradients", "gradient-bank"), extra)
    card = ModelCard.from_template(
        data,
        template_path=str(TEMPLATE_PATH),
        kind="bank",
        title=title,
        repo_id=repo_id or "<this repo or directory>",
        subfolder=subfolder,
        num_documents=bank_config["num_documents"],
        num_shards=len(bank_config["shards"]),
        base_model_id=learner.get("base_model"),
        base_model_revision=learner.get("base_model_revision"),
        fingerprint=bank_config["fingerprint"],
        dtype=bank_config["dtype"],
        embedder=bank_config["embedder"],
        embedding_dim=bank_config["embedding_dim"],
        format_version=bank_config["format_version"],
    )
    return str(card)


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
