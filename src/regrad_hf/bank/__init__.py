"""The gradient bank: documents, their embeddings and their gradients, indexed and stored for one learner.

Modules, one job each (data flows from the facade to its parts):

- `gradient_bank`: the [`GradientBank`] facade that composes the others;
- `catalogue`: ids, texts, metadata, index keys and shard rows (`documents.jsonl`);
- `index`: the embedder and the usearch index, search;
- `shards`: gradient rows in memory and in safetensors shards, checked and checksummed;
- `quantization`: the storage formats (float and int8/4/3/2);
- `directory`: the on-disk layout and publishing a bank into a directory;
- `persistence`: writing a bank's files and reading them back;
- `schema`: checks of every file before it is trusted;
- `building`, `checkpoint`, `distributed`: resumable, multi-process builds;
- `parts`: what building and persistence use of a bank, and what a bank needs of a model.
"""

from .catalogue import Hit
from .directory import CONFIG_FILE, DOCUMENTS_FILE, EAGER_FILES, GRADIENTS_DIR, INDEX_FILE
from .gradient_bank import GradientBank
from .parts import GradientSource
from .persistence import FORMAT_VERSION

__all__ = [
    "CONFIG_FILE",
    "DOCUMENTS_FILE",
    "EAGER_FILES",
    "FORMAT_VERSION",
    "GRADIENTS_DIR",
    "INDEX_FILE",
    "GradientBank",
    "GradientSource",
    "Hit",
]
