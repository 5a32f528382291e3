"""`ReGradForCausalLM`: any causal LM plus a ReGrad learner (LoRA tensors and step sizes) and a gradient bank."""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..adaptation import deltas, objective
from ..adaptation.learner import (
    base_identity,
    check_document_tokens,
    fingerprint_of,
    inject_lora,
    is_lora_parameter_name,
    learner_identity,
    lora_parameters,
    remove_lora,
)
from ..adaptation.restore import ExactRestore
from ..bank import EAGER_FILES as BANK_EAGER_FILES
from ..bank import GradientBank
from ..config import ReGradConfig
from ..defaults import EMBEDDED_MODEL_ID, embedded_model_revision, load_base_model
from ..errors import ReGradError, ReGradTypeError, ReGradValueError
from ..files import atomic_save_safetensors, atomic_write_text
from ..hub.publishing import LearnerPublishingMixin
from ..hub.repos import HubOptions, locate
from .injection import KnowledgeInjectionMixin
from .learner_files import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    LEARNER_FILE,
    learner_file,
    read_learner,
    refuse_symlinked_folder,
    write_learner,
)
from .learner_files import save_directory as checked_save_directory
from .learner_state import LearnerStateMixin, learner_modules
from .peft_conventions import PeftConventionsMixin
from .served import install_chat_template, learner_generation_config, served_as_learner

BANK_SUBFOLDER = "bank"
# What transformers' Auto classes and pipelines pass to `from_pretrained` and a ReGrad learner has no use for. A learner
# repo holds no code, so `trust_remote_code` is moot; it never reaches the base, whose code runs only with
# `trust_base_remote_code=True` (the base is named by the learner's config: data, maybe hostile).
_IGNORED_KWARGS = ("_from_auto", "_from_pipeline", "_commit_hash", "adapter_kwargs", "trust_remote_code", "proxies")


class ReGradForCausalLM(
    LearnerStateMixin,
    LearnerPublishingMixin,
    PeftConventionsMixin,
    KnowledgeInjectionMixin,
    PreTrainedModel,
    GenerationMixin,
):
    """A causal LM that answers with knowledge injected as retrieved gradients.

    It wraps any `AutoModelForCausalLM` (the *language model*), adds LoRA tensors (peft) and learned step sizes
    (the *learner*), and owns a [`GradientBank`]. [`~ReGradForCausalLM.generate`] retrieves the documents relevant
    to the prompt, applies `theta' = theta - gamma * alpha_t * sum_i g_i` to the LoRA tensors, generates, and
    restores the LoRA tensors bit for bit. The base weights are never written.

    Create one with [`~ReGradForCausalLM.from_base`] or [`~ReGradForCausalLM.from_pretrained`]. peft's conventions
    hold too (see [`PeftConventionsMixin`]): `disable_adapter()` for the plain base model,
    `print_trainable_parameters()`, and `export_adapter()` to write the learner, or the learner with documents baked
    in, as a standard peft adapter.

    Threads: one model may serve many threads. Every operation that reads or writes the learner's tensors holds the
    model's re-entrant lock and sees the *un-adapted* learner, whatever other threads are doing:

    - adaptations: the `knowledge`/`retrieved`/`injected` contexts, and `generate` when all rows retrieve the same
      documents, write one delta into the shared LoRA tensors and hold the lock until they are restored, so threads
      adapting the model run one after the other, each seeing only its own delta;
    - reads: [`save_pretrained`], [`learner_state_dict`], [`learner_identity`]/[`fingerprint`] (so [`attach_bank`]
      and a bank's checks) and [`document_gradients`] (a [`GradientBank`] build, `knowledge`) wait for other threads'
      adaptations to end. Inside the calling thread's own adaptation they still see the un-adapted learner: saves
      and fingerprints read the values kept by the swap, and document gradients are taken at the un-adapted
      tensors (as a bank's are), so a `knowledge` block nested in another adds its documents' step to the outer one;
    - writes: [`load_learner_state`] and [`swapped_learner`] hold the lock; they refuse to run inside an adaptation;
    - a batch whose rows retrieve different documents holds the lock only to retrieve and copy the LoRA tensors it
      adapts per row; its generation writes nothing shared and runs alongside other threads; the per-row hooks and
      a gradient capture's hooks act only on forwards of the thread that installed them.

    Direct `forward` calls, `language_model` accessed from another thread, and copies (`copy.deepcopy`, pickling)
    are not guarded: inside another thread's adaptation they see its delta. Training (`ReGradTrainer`) writes the
    tensors unguarded; do not serve a model while training it.
    """

    config_class = ReGradConfig
    base_model_prefix = "language_model"
    main_input_name = "input_ids"

    def __init__(self, config: ReGradConfig, language_model: PreTrainedModel, tokenizer=None):
        super().__init__(config)
        check_document_tokens(config, language_model)
        self.language_model = language_model
        self.bank: GradientBank | None = None
        # Per thread, whether `generate` searches the bank by default inside `knowledge` blocks (innermost last).
        self._bank_default_in_block: dict[int, list[bool]] = {}
        self._adapted_generations: dict[int, list] = {}  # per thread, the frames of its adapted `generate` calls
        self._plain_base_depth = 0  # > 0 inside `disable_adapter` (whose thread holds the lock)
        self._adaptation_lock = threading.RLock()
        self._base_identity: tuple[tuple, dict[str, str]] | None = None  # (what it was computed for, value)
        # The learner's decoding and chat template; the wrapped model keeps its own generation config.
        self.generation_config, self.tokenizer = served_as_learner(config, language_model.generation_config, tokenizer)
        self._lora = lora_parameters(language_model)
        self._restore = ExactRestore(self._lora)
        self.step_sizes, self.gradient_transform = learner_modules(config, self._lora)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_base(
        cls,
        model_or_name: PreTrainedModel | str | os.PathLike = EMBEDDED_MODEL_ID,
        config: ReGradConfig | None = None,
        tokenizer=None,
        revision: str | None = None,
        **model_kwargs,
    ) -> ReGradForCausalLM:
        """Wraps a causal LM with a fresh learner (peft LoRA, step sizes at `config.init_step_size`).

        Args:
            model_or_name (`PreTrainedModel`, `str` or `os.PathLike`, defaults to the embedded SmolLM2-135M):
                a loaded causal LM (modified in place: LoRA layers are injected), a local checkpoint or a Hub id.
            config ([`ReGradConfig`], *optional*): the learner configuration; defaults to `ReGradConfig()`.
            tokenizer (*optional*): the model's tokenizer; loaded from the same name when omitted. The model keeps a
                copy with the learner's chat template (see [`served.learner_chat_template`]) when it has one.
            revision (`str`, *optional*): revision of the model to load.
            model_kwargs: passed to `AutoModelForCausalLM.from_pretrained` when loading by name. Only safetensors
                weights are loaded, and a model that names its own code (`auto_map`) is refused unless
                `trust_remote_code=True` (then that code runs; transformers is never left to ask on stdin).

        Returns:
            [`ReGradForCausalLM`]: in eval mode when loaded by name (as transformers loads models), else in the given
            model's mode; the whole model, LoRA layers included, is in that one mode.
        """
        config = copy.deepcopy(config) if config is not None else ReGradConfig()
        if isinstance(model_or_name, (str, os.PathLike)):
            name = str(model_or_name)
            model, tokenizer = load_base_model(name, revision, tokenizer, **model_kwargs)
            config.base_model_name_or_path = name
            config.base_model_revision = embedded_model_revision() if name == EMBEDDED_MODEL_ID else revision
        else:
            model = model_or_name
            if any(".lora_" in name for name, _ in model.named_parameters()):
                raise ReGradValueError("the model already carries LoRA layers; pass the plain base model")
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = model.name_or_path or None
            if tokenizer is None and model.name_or_path:
                try:
                    tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, trust_remote_code=False)
                except (OSError, ValueError):
                    tokenizer = None  # retrieval then needs `query=`; document gradients need a tokenizer
        was_training = model.training
        check_document_tokens(config, model)  # before the caller's model is modified
        inject_lora(model, config)
        # Like transformers: a model loaded by name is in eval mode; a given model keeps its mode. Either way the whole
        # tree (the new LoRA layers and the wrapper included) is in that one mode.
        return cls(config, model, tokenizer).train(was_training)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        base_model: PreTrainedModel | None = None,
        tokenizer=None,
        bank: GradientBank | str | os.PathLike | bool | None = None,
        config: ReGradConfig | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        trust_base_remote_code: bool = False,
        **model_kwargs,
    ) -> ReGradForCausalLM:
        """Loads a learner saved with [`~ReGradForCausalLM.save_pretrained`] or pushed with
        [`~ReGradForCausalLM.push_to_hub`], and the base model its config names (at the recorded revision).

        Also what `AutoModelForCausalLM.from_pretrained` and `pipeline(model=...)` call once `regrad_hf` is imported.
        From a Hub repo only data files are downloaded (`config.json`, `learner.safetensors`, and a `bank/` folder's
        eager files); nothing from the repo is executed or unpickled.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a local directory or a Hub repo id.
            base_model (`PreTrainedModel`, *optional*): an already loaded base model (else loaded from the name and
                revision recorded in the config).
            tokenizer (*optional*): the base model's tokenizer.
            bank ([`GradientBank`], `str`, `os.PathLike` or `bool`, *optional*): the bank to attach: a bank, or a
                directory or repo id to load one from. `None` (default) attaches the `bank/` folder of the learner's
                directory or repo when there is one; `True` requires it; `False` attaches nothing.
            config ([`ReGradConfig`], *optional*): use this configuration instead of the saved one.
            subfolder (`str`, *optional*): the learner's folder inside the directory or repo.
            revision, token, cache_dir, local_files_only, force_download: as in `transformers`, for the learner repo
                (and its bank); all but `revision` also apply to the base model's repo.
            trust_base_remote_code (`bool`, defaults to `False`): run the code of the base model that the learner's
                config names, if its `config.json` has an `auto_map`; without it such a base is refused. Read that
                code first. `trust_remote_code` (which `pipeline` and the Auto classes pass for the learner repo)
                never does this.
            model_kwargs: passed to `AutoModelForCausalLM.from_pretrained` for the base model (e.g. `dtype`).

        Returns:
            [`ReGradForCausalLM`]: in eval mode, with its `generation_config.json` (see [`served`]) when there is one.

        Raises:
            [`ReGradValueError`]: not a learner (missing files), a bad argument, or a base model that cannot be
                loaded (pickled weights; its own code without `trust_base_remote_code=True`).
            [`ReGradHubError`]: the repo cannot be found, or is not cached while offline.
        """
        if not isinstance(trust_base_remote_code, bool):
            raise ReGradTypeError(f"trust_base_remote_code must be True or False, got {trust_base_remote_code!r:.40}")
        for key in _IGNORED_KWARGS:
            model_kwargs.pop(key, None)
        options = HubOptions(revision, token, cache_dir, local_files_only, force_download)
        files = [CONFIG_FILE, LEARNER_FILE, GENERATION_CONFIG_FILE]
        if bank is None or bank is True:
            files += [f"{BANK_SUBFOLDER}/{name}" for name in BANK_EAGER_FILES]
        location = locate(pretrained_model_name_or_path, files, subfolder=subfolder, options=options)
        directory, local = location.directory, not location.is_remote
        if local:  # a learner directory never follows a symlink (a Hub cache snapshot is made of them)
            refuse_symlinked_folder(Path(pretrained_model_name_or_path), location.subfolder)
        for name in (CONFIG_FILE, LEARNER_FILE):
            if not learner_file(directory, name, local=local).is_file():
                raise ReGradValueError(f"{location.describe()} has no {name}: it is not a ReGrad learner")
        if config is not None and not isinstance(config, ReGradConfig):
            raise ReGradValueError(f"config must be a ReGradConfig, got {type(config).__name__}")
        saved_config, tensors, learner_path, generation = read_learner(
            directory, local=local, read_config_file=config is None
        )
        config = config if config is not None else saved_config
        # Everything that can fail on the files is read before a base model is touched.
        saved_bank = _saved_bank(bank, location, local, options)
        if base_model is None:
            if config.base_model_name_or_path is None:
                raise ReGradValueError(f"{location.describe(CONFIG_FILE)} names no base model; pass base_model=")
            base_revision = None if config.base_model_name_or_path == EMBEDDED_MODEL_ID else config.base_model_revision
            shared = dict(token=token, cache_dir=cache_dir, local_files_only=local_files_only)
            shared.update(force_download=force_download, trust_remote_code=trust_base_remote_code)
            name = config.base_model_name_or_path
            try:
                model = cls.from_base(name, config, tokenizer, base_revision, **shared, **model_kwargs)
            except ReGradError as error:  # the field that named it: a learner's config is data, maybe hostile
                field = f"{location.describe(CONFIG_FILE)} field base_model_name_or_path={name!r:.200}"
                raise type(error)(f"{field}: {error}") from error
        else:
            requires_grad = {name: parameter.requires_grad for name, parameter in base_model.named_parameters()}
            peft_config = vars(base_model).get("peft_config")
            model = cls.from_base(base_model, config, tokenizer)
        try:
            model.load_learner_state(tensors, source=str(learner_path))
            if saved_bank is not None:
                model.attach_bank(saved_bank)
        except BaseException:
            if base_model is not None:  # the caller's model leaves a failed load as it came in
                remove_lora(base_model, requires_grad, peft_config)
            raise
        if generation is not None:  # learners saved before it was written have none; older ones lack its decoding
            model.generation_config = learner_generation_config(
                model.generation_config, model.prompt_template, generation
            )
        return model.eval()  # as `PreTrainedModel.from_pretrained` returns its models

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Writes `config.json`, `learner.safetensors` (LoRA tensors and step sizes), `generation_config.json` and the
        tokenizer's files (so that `AutoTokenizer` and `pipeline` find them), never the base weights.

        The save is all or nothing, and saves of one directory (threads, processes) wait for each other (see
        [`regrad_hf.modeling.learner_files`]): a failed or killed save leaves a learner that loads. Other files are
        kept.

        Raises:
            [`ReGradTypeError`] or [`ReGradValueError`]: `save_directory` is not a path, or is empty.
            [`ReGradFileError`]: it is a file, or a file cannot be written (the previous learner is then kept).
        """
        directory = checked_save_directory(save_directory)
        config = copy.deepcopy(self.config)
        config.architectures = [type(self).__name__]
        with self._adaptation_lock:  # the tensors and their fingerprint, un-adapted (see the class docstring)
            tensors = {name: tensor.cpu() for name, tensor in self.learner_state_dict().items()}
            # one metadata key: safetensors writes several in a per-process random order, and a learner saved twice
            # should be the same file (bank builds by one process or several compare byte for byte)
            metadata = {"fingerprint": self.fingerprint()}
        generation = self.generation_config.to_json_string()
        if self.tokenizer is not None:  # the saved chat template lays out the saved config's prompt
            install_chat_template(self.tokenizer, self.prompt_template)

        def write(staging: Path) -> None:
            atomic_save_safetensors(tensors, staging / LEARNER_FILE, metadata=metadata)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(staging)
            atomic_write_text(staging / GENERATION_CONFIG_FILE, generation)
            atomic_write_text(staging / CONFIG_FILE, config.to_json_string())

        write_learner(directory, write)

    # ------------------------------------------------------------------ the learner

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """The LoRA tensors by name (names as in the wrapped language model)."""
        return dict(self._lora)

    def learner_identity(self) -> dict[str, str]:
        """What this learner's document gradients depend on, field by field (see [`learner_identity`]), for the
        un-adapted learner: base model name and revision, base config and weights, LoRA layout and values."""
        config = self.config
        with self._adaptation_lock:
            return learner_identity(
                config.base_model_name_or_path,
                config.base_model_revision,
                self._restore.unadapted_values() if self._restore.active else self._lora,
                self._base_weights_identity(),
            )

    def _base_weights_identity(self) -> dict[str, str]:
        """[`base_identity`] of the language model, computed once and again only when a base tensor was replaced,
        cast, moved or written in place since (its storage, dtype or version counter changed)."""
        base = [p for name, p in self.language_model.named_parameters() if not is_lora_parameter_name(name)]
        # inference tensors (a model built under torch.inference_mode()) have no version counter
        versions = ((p.data_ptr(), p.dtype, -1 if p.is_inference() else p._version) for p in base)
        key = (self.language_model.config.to_json_string(), *versions)
        if self._base_identity is None or self._base_identity[0] != key:
            self._base_identity = (key, base_identity(self.language_model))
        return self._base_identity[1]

    def fingerprint(self) -> str:
        """Identifies the learner a bank's gradients belong to: a hash of [`learner_identity`]."""
        return fingerprint_of(self.learner_identity())

    def document_gradients(self, documents: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per-document gradients of the mean token NLL w.r.t. the LoRA tensors, stacked on a first axis.

        Taken at the un-adapted LoRA tensors, under the model's lock (see the class docstring).
        """
        if self.tokenizer is None:
            raise ReGradError("document gradients need a tokenizer: pass tokenizer= to from_base/from_pretrained")
        if not self.adapters_enabled():
            raise ReGradError("document gradients need the LoRA layers: call enable_adapters() first")
        check_document_tokens(self.config, self.language_model)  # the config may have been edited since
        with self._adaptation_lock, self._restore.unadapted():
            return deltas.document_gradients(
                self.language_model, self.tokenizer, self._lora, documents, self.config.max_document_tokens
            )

    def forward(self, *args, meta_tasks: Sequence[Mapping[str, torch.Tensor]] | None = None, **kwargs):
        """The wrapped language model's forward, with the LoRA tensors as they currently are.

        With `meta_tasks` (tasks encoded by [`TaskCollator`]; `first_order=`, `locality_weight=`, `first_token_weight=`,
        `summed_gradients=`, `distillation_weight=` may be passed too), the meta-learning loss instead (see
        [`regrad_hf.adaptation.objective`]), as a `CausalLMOutputWithPast` with only `loss` set: [`ReGradTrainer`]
        computes its loss through this forward so that a DDP wrapper synchronises the gradients.
        """
        if self._restore.needs_repair():  # an interrupt cut a block's restore: the tensors are put back first
            with self._adaptation_lock:
                self._restore.repair()
        if meta_tasks is not None:
            loss = objective.meta_loss(
                self,
                meta_tasks,
                first_order=kwargs.pop("first_order", False),
                locality_weight=kwargs.pop("locality_weight", 0.0),
                first_token_weight=kwargs.pop("first_token_weight", 1.0),
                summed_gradients=kwargs.pop("summed_gradients", None),
                distillation_weight=kwargs.pop("distillation_weight", 0.0),
            )
            if args or kwargs:
                raise ReGradValueError(f"meta_tasks takes no other inputs, got {sorted(kwargs) or 'positional ones'}")
            return CausalLMOutputWithPast(loss=loss)
        return self.language_model(*args, **kwargs)

    def __getstate__(self):
        # Locks cannot be copied or pickled; a copy gets its own (copy.deepcopy, multiprocessing).
        state = super().__getstate__()
        state = dict(state) if state is not None else dict(self.__dict__)
        state.pop("_adaptation_lock", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._adaptation_lock = threading.RLock()


def _saved_bank(bank, location, local: bool, options: HubOptions) -> GradientBank | None:
    """The bank `from_pretrained(..., bank=bank)` attaches, loaded (see its `bank` argument), or `None`."""
    if bank is False or isinstance(bank, GradientBank):
        return bank if isinstance(bank, GradientBank) else None
    hub = dict(token=options.token, cache_dir=options.cache_dir, local_files_only=options.local_files_only)
    if isinstance(bank, (str, os.PathLike)):
        return GradientBank.from_pretrained(bank, **hub)
    if local:
        refuse_symlinked_folder(location.directory, BANK_SUBFOLDER)
    if (location.directory / BANK_SUBFOLDER).is_dir():
        source = location.repo_id or location.directory
        return GradientBank.from_pretrained(source, subfolder=BANK_SUBFOLDER, revision=location.commit, **hub)
    if bank is True:
        raise ReGradValueError(f"{location.describe()} has no {BANK_SUBFOLDER}/ folder to attach a bank from")
    return None
