"""Whether a name given by a user is a local path or can be a Hub repo id, with the standard library alone: the
`regrad` command checks its arguments with it before importing torch (a mistyped path reports at once)."""

from __future__ import annotations

import os
import re
from pathlib import Path

# Suffixes that make a name a file path, never a Hub repo id.
FILE_SUFFIXES = (".json", ".jsonl", ".txt", ".parquet", ".csv", ".arrow", ".gz", ".zst")
# A Hub repo id: "name" or "owner/name" of letters, digits, "-", "_" and "." (huggingface_hub's rule).
_REPO_ID = re.compile(r"^(?:[\w][\w.-]{0,95}/)?[\w][\w.-]{0,95}$")


def looks_like_hub_id(name: str) -> bool:
    """Whether `name` could be a Hub repo id rather than a local path: `owner/name` (or `name`) with at most one
    slash, no leading `.`, `/` or `~`, no `..` or `--`, and no data-file suffix such as `.json`."""
    return (
        bool(_REPO_ID.match(name))
        and ".." not in name
        and "--" not in name
        and not name.endswith(".")
        and not name.lower().endswith(FILE_SUFFIXES)
    )


def missing_path_message(name: str | os.PathLike, kind: str = "file or directory") -> str:
    """The message for a local path that does not exist."""
    return f"no such {kind}: {os.fspath(name)}"


def missing_location(name: str, kind: str = "file or directory") -> str | None:
    """The [`missing_path_message`] of a name that is neither an existing local path nor a possible Hub repo id (a
    typo: the Hub is not asked), else `None`."""
    if Path(name).expanduser().exists() or looks_like_hub_id(name):
        return None
    return missing_path_message(name, kind)
