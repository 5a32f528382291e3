"""A bank directory on disk: its layout, and publishing a finished bank into it whole.

bank_config.json                    format version, learner identity, embedder, dtype, shapes, checksummed shards
documents.jsonl                     one line per document: id, text, metadata, index key, shard, row
index.usearch                       cosine index of the document embeddings, keyed by the index key
gradients/shard-NNNNN.safetensors   per LoRA tensor name, the gradients of the shard's documents stacked
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
import warnings
from pathlib import Path

from .checkpoint import BUILD_FILES

CONFIG_FILE = "bank_config.json"
DOCUMENTS_FILE = "documents.jsonl"
INDEX_FILE = "index.usearch"
GRADIENTS_DIR = "gradients"
BANK_FILES = (CONFIG_FILE, DOCUMENTS_FILE, INDEX_FILE, GRADIENTS_DIR)
EAGER_FILES = (CONFIG_FILE, DOCUMENTS_FILE, INDEX_FILE)  # downloaded when a bank is loaded from a repo; shards later


def sha256_of(handle) -> str:
    """SHA-256 (hex) of an open binary file, read from where it is to its end."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(1 << 22), b""):
        digest.update(chunk)
    return digest.hexdigest()


def recover_interrupted_save(target: Path) -> None:
    """Puts the previous bank back if a save was killed between moving it aside and moving the new one in."""
    if target.exists():
        return
    backups = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if backups and (backups[-1] / CONFIG_FILE).is_file():
        backups[-1].rename(target)
        warnings.warn(f"{target}: a save was interrupted; restored the previous bank", UserWarning, stacklevel=3)


def replace_directory(staging: Path, target: Path) -> None:
    """Puts `staging` in the place of `target`, keeping the files of `target` that are not part of a bank."""
    if not target.exists():
        staging.rename(target)
        return
    for entry in target.iterdir():
        if entry.name not in BANK_FILES + BUILD_FILES and not (staging / entry.name).exists():
            copy = shutil.copytree if entry.is_dir() else shutil.copy2
            partial = staging / f".{entry.name}.copying"  # renamed when complete: a kill never leaves half a copy
            copy(entry, partial)
            partial.rename(staging / entry.name)
    backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(backup)
    try:
        staging.rename(target)
    except BaseException:
        backup.rename(target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
