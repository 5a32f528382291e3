"""What [`ReGradForCausalLM`] and [`GradientBank`] share for Hub I/O: finding their files (a local directory or a
Hub repo, through the cache) and pushing a folder to a repo, its card merged into the README ([`regrad_hf.hub.cards`]).

Only `huggingface_hub`'s public API is used (`snapshot_download`, `hf_hub_download`, `HfApi.create_repo`,
`HfApi.create_commit`), with the keyword names of `transformers` (`revision`, `token`, `cache_dir`,
`local_files_only`, `force_download`, `subfolder`). Downloads are restricted to named data files (never code or
pickles), and `HfApi` is created per call so that the endpoint is read when the call is made.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
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

from ..errors import ReGradError, ReGradHubError, ReGradTypeError, ReGradValueError
from ..files import is_disk_failure, output_directory, write_error
from .cards import merge_card

try:  # the HTTP client of huggingface_hub: the base of its status errors and of transport failures
    from httpx2 import HTTPError as _HTTPError
except ImportError:  # pragma: no cover - huggingface_hub releases on plain httpx
    from httpx import HTTPError as _HTTPError

README_FILE = "README.md"
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
        except (_HTTPError, OSError) as error:
            raise _failed_request(f"downloading {self.describe(relative)}", error) from error


def check_subfolder(subfolder: object) -> str:
    """`subfolder` as a relative POSIX path inside a directory or repo (`""` for `None`; leading and trailing
    slashes dropped).

    Raises:
        [`ReGradTypeError`]: `subfolder` is not a string.
        [`ReGradValueError`]: it has a `..` component (it would leave the directory or repo: a path traversal).
    """
    if subfolder is None:
        return ""
    if not isinstance(subfolder, str):
        raise ReGradTypeError(f"subfolder must be a string, got {type(subfolder).__name__}")
    stripped = subfolder.strip("/")
    if ".." in PurePosixPath(stripped.replace("\\", "/")).parts:
        raise ReGradValueError(f"subfolder {subfolder!r:.80} leaves the directory or repo ('..'); name a folder inside")
    return stripped


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
        [`ReGradValueError`]: a file, not a directory nor a valid repo id, or an unknown revision.
        [`ReGradHubError`]: the repo does not exist (or is private), or it is not in the cache while offline.
    """
    options = options or HubOptions()
    subfolder = check_subfolder(subfolder)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ReGradTypeError(f"expected a local directory or a Hub repo id, got {type(name_or_path).__name__}")
    local = Path(name_or_path)
    if local.is_dir():
        return Location(local / subfolder, subfolder=subfolder, options=options)
    if local.exists():  # a file (e.g. the learner.safetensors inside the directory): not a repo id either
        raise ReGradValueError(f"{name_or_path} is a file, not a directory: pass the folder that holds it")
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
    except (_HTTPError, OSError) as error:
        raise _failed_request(f"downloading {repo_id}", error) from error
    directory = Path(snapshot)
    return Location(
        directory / subfolder,
        repo_id=repo_id,
        commit=revision.resolved,
        subfolder=subfolder,
        options=options,
    )


def _failed_request(what: str, error: BaseException) -> ReGradHubError:
    """A Hub request that failed on the way (an error status such as 500, a refused connection, a download cut
    short): nothing partial was kept (huggingface_hub renames a download into the cache only once complete)."""
    return ReGradHubError(f"{what} ({constants.ENDPOINT}) failed ({type(error).__name__}: {error}); try again")


@contextmanager
def _hub_requests(what: str) -> Iterator[None]:
    """Re-raises the failures of the Hub requests made inside the block as [`ReGradHubError`]."""
    try:
        yield
    except ReGradError:
        raise
    except _HTTPError as error:
        raise _failed_request(what, error) from error


def refuse_offline(what: str) -> None:
    """Raises [`ReGradHubError`] under `HF_HUB_OFFLINE=1`, before a call that needs the Hub (a push, a pull), where
    huggingface_hub would raise its own `OfflineModeIsEnabled` or fall back to whatever folder is there."""
    if constants.is_offline_mode():
        raise ReGradHubError(
            f"cannot {what}: HF_HUB_OFFLINE=1 is set, so the Hub ({constants.ENDPOINT}) is not contacted; unset it "
            "to use the Hub, or work with local folders (save_pretrained / from_pretrained of a path)"
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

    Raises:
        [`ReGradHubError`]: `HF_HUB_OFFLINE=1` is set, or a request to the Hub fails.
    """
    refuse_offline(f"push to {repo_id}")
    folder = Path(folder)
    prefix = path_in_repo.strip("/")
    with _hub_requests(f"pushing to {repo_id}"):
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
            operations.append(
                CommitOperationAdd(path_in_repo=readme, path_or_fileobj=merge_card(existing, card).encode())
            )
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

    Raises:
        [`ReGradFileError`]: `local_dir` is not a usable folder, or a file cannot be written (a full disk).
        [`ReGradHubError`]: the repo cannot be reached (`HF_HUB_OFFLINE=1` included), or it lists a file outside
            itself (`../x.json`).
    """
    refuse_offline(f"pull {repo_id}")
    local_dir = output_directory(local_dir, "local_dir")
    try:
        # One listing, checked before any download, then downloaded at its commit (a push meanwhile changes nothing).
        info = HfApi(token=token).model_info(repo_id, revision=revision)
        names = [sibling.rfilename for sibling in info.siblings or []]
        wanted = filter_repo_objects(names, allow_patterns=list(DATA_FILE_PATTERNS))
        outside = [name for name in wanted if _leaves_the_folder(name)]
        if outside:
            raise ReGradHubError(
                f"cannot pull {repo_id}: it lists {outside[0]!r:.200}, a file outside the repo's folder; nothing was "
                "downloaded"
            )
        folder = snapshot_download(
            repo_id, revision=info.sha, token=token, local_dir=local_dir, allow_patterns=list(DATA_FILE_PATTERNS)
        )
    except HFValidationError as error:
        raise ReGradValueError(f"{repo_id} is not a Hub repo id") from error
    except RepositoryNotFoundError as error:
        raise ReGradHubError(f"no repo {repo_id} on {constants.ENDPOINT} (or it is private: pass a token)") from error
    except RevisionNotFoundError as error:
        raise ReGradValueError(f"{repo_id} has no revision {revision!r}") from error
    except ReGradError:
        raise
    except (_HTTPError, OSError) as error:  # a full disk is a file error; a cut connection, a failed request
        if is_disk_failure(error):
            raise write_error(error, local_dir) from error
        raise _failed_request(f"downloading {repo_id}", error) from error
    return Path(folder)


def _leaves_the_folder(name: str) -> bool:
    """Whether a repo file name would be written outside the folder it is downloaded into: absolute (`/x`, `C:x`,
    `\\\\host\\x`) or with a `..` component."""
    windows = PureWindowsPath(name)  # splits on both slashes; knows drives and UNC roots
    return name.startswith("/") or bool(windows.drive or windows.root) or ".." in windows.parts


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
