"""What a peft user expects of a model carrying LoRA layers: the plain base model on demand, parameter counts, the
adapter methods transformers' `PeftAdapterMixin` offers, and the learner as a standard peft LoRA adapter.

[`PeftConventionsMixin`] is mixed into [`ReGradForCausalLM`]; [`write_peft_adapter`] is the file format alone.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel, TaskType, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..adaptation import deltas
from ..adaptation.learner import ADAPTER_NAME
from ..config import check_gamma
from ..defaults import loadable_base
from ..errors import ReGradError, ReGradValueError
from ..files import atomic_save_safetensors, atomic_write_text, output_directory
from ..hub.cards import render_adapter_card

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CARD_FILE = "README.md"
# How PeftModel names its parameters: the base model sits under `base_model.model` (PeftModel -> LoraModel -> model).
_PEFT_MODEL_PREFIX = "base_model.model."
_ONE_ADAPTER = (
    "a ReGradForCausalLM carries exactly one adapter, its learner (named 'default'): load another learner with "
    "ReGradForCausalLM.from_pretrained or model.load_learner, write this one as a peft adapter with "
    "model.export_adapter, and load peft adapters on the base model with peft.PeftModel.from_pretrained"
)


def write_peft_adapter(
    model: nn.Module,
    lora_tensors: Mapping[str, torch.Tensor],
    save_directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    revision: str | None = None,
    card: str | None = None,
) -> Path:
    """Writes LoRA tensors as a standard peft adapter: `adapter_config.json` and `adapter_model.safetensors`, the files
    `PeftModel.save_pretrained` writes, loadable with `PeftModel.from_pretrained(base_model, save_directory)`.

    Args:
        model (`nn.Module`): the model the LoRA layers were injected into (it carries their `LoraConfig`).
        lora_tensors (`Mapping[str, torch.Tensor]`): the values to write, by parameter name in `model`.
        save_directory (`str` or `os.PathLike`): created if needed; existing adapter files are replaced.
        base_model_name_or_path, revision (`str`, *optional*): recorded in the config for `AutoPeftModelForCausalLM`.
        card (`str`, *optional*): the adapter's `README.md` (as peft's `save_pretrained` writes one).

    Raises:
        [`ReGradTypeError`] or [`ReGradValueError`]: `save_directory` is not a path, or is empty.
        [`ReGradFileError`]: it is a file or under one, or a file cannot be written (a full disk).

    Returns:
        `Path`: the directory.
    """
    config = copy.deepcopy(model.peft_config[ADAPTER_NAME])
    config.base_model_name_or_path = base_model_name_or_path
    config.revision = revision
    config.inference_mode = True
    config.task_type = TaskType.CAUSAL_LM
    # peft names the tensors of a PeftModel (adapter name dropped); its save path then prefixes the base model's path.
    state = get_peft_model_state_dict(
        model, state_dict=dict(lora_tensors), adapter_name=ADAPTER_NAME, save_embedding_layers=False
    )
    tensors = {_PEFT_MODEL_PREFIX + name: tensor.detach().cpu() for name, tensor in sorted(state.items())}
    settings = config.to_dict()
    settings["target_modules"] = sorted(settings["target_modules"])  # a set: sorted so that exports repeat exactly
    directory = output_directory(save_directory, "save_directory")
    atomic_save_safetensors(tensors, directory / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    atomic_write_text(directory / ADAPTER_CONFIG_FILE, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    if card is not None:
        atomic_write_text(directory / ADAPTER_CARD_FILE, card)
    return directory


class PeftConventionsMixin:
    """peft's names on [`ReGradForCausalLM`]: `disable_adapter()`, `print_trainable_parameters()`,
    `get_nb_trainable_parameters()`, `export_adapter()`, and transformers' `PeftAdapterMixin` methods made to work on
    the one adapter a ReGrad model has (the others raise a [`ReGradError`] that says what to do instead).

    The host class provides `language_model`, `_lora`, `_restore`, `_adaptation_lock`, `_bank_default`,
    `_plain_base_depth`, `learner_state_dict`, `step_sizes`, `gradient_transform`, `_require_bank`,
    `document_gradients` and `config`.
    """

    # ------------------------------------------------------------------ the plain base model

    def _tuner_layers(self) -> list[BaseTunerLayer]:
        return [module for module in self.language_model.modules() if isinstance(module, BaseTunerLayer)]

    def adapters_enabled(self) -> bool:
        """Whether the LoRA layers are in use: `False` after [`disable_adapters`], until [`enable_adapters`]."""
        return not any(layer.disable_adapters for layer in self._tuner_layers())

    def _enable_lora_layers(self, enabled: bool) -> None:
        # peft's toggle also sets the LoRA tensors' requires_grad; a ReGrad learner keeps its own setting.
        requires_grad = {name: parameter.requires_grad for name, parameter in self._lora.items()}
        for layer in self._tuner_layers():
            layer.enable_adapters(enabled)
        for name, parameter in self._lora.items():
            parameter.requires_grad_(requires_grad[name])

    @contextmanager
    def disable_adapter(self) -> Iterator[PeftConventionsMixin]:
        """The plain base model for the duration of the block, as peft's `PeftModel.disable_adapter()`: `generate`,
        `forward` and pipelines give exactly the base model's outputs, and `generate` does not retrieve.

        It is one more adaptation, under the model's lock: every LoRA B tensor is set to zero (so each LoRA layer
        adds exactly 0) and restored bit for bit after, also on error. So it follows the thread contract of the other
        contexts (other threads wait; a heterogeneous batch already generating elsewhere, which reads its own copies,
        is unaffected), where peft's switch would bypass the LoRA layers for every thread. Injecting documents inside
        the block (`knowledge`, `injected`, `retrieved`, `generate` with `use_bank=True` or `query=`) raises: the
        result would not be the base model.

        Example:
            ```python
            with model.disable_adapter():
                closed_book = model.generate(**inputs)  # what the base model alone generates
            ```
        """
        with self._adaptation_lock:
            # B + (-B) is exactly zero in every float format, and a zero B makes the LoRA term exactly zero.
            zero_b = {name: -parameter.detach().float() for name, parameter in self._lora.items() if ".lora_B." in name}
            with self._restore.applied(zero_b), self._bank_default(False):
                self._plain_base_depth += 1
                try:
                    yield self
                finally:
                    self._plain_base_depth -= 1

    def _refuse_inside_plain_base(self) -> None:
        """Raises inside [`disable_adapter`] (call it holding the model's lock: only its owner can be inside)."""
        if self._plain_base_depth:
            raise ReGradError(
                "cannot inject documents inside disable_adapter(): the block is the plain base model; inject outside it"
            )

    def disable_adapters(self) -> None:
        """Bypasses the LoRA layers until [`enable_adapters`] (transformers' `PeftAdapterMixin` name), with peft's
        switch: for every thread, a heterogeneous batch already generating included. Prefer the [`disable_adapter`]
        context, which cannot leave them off and follows the thread contract."""
        with self._adaptation_lock:
            self._enable_lora_layers(False)

    def enable_adapters(self) -> None:
        """Uses the LoRA layers again after [`disable_adapters`]."""
        with self._adaptation_lock:
            self._enable_lora_layers(True)

    def active_adapters(self) -> list[str]:
        """The names of the active adapters, as in transformers: always the learner, `["default"]`."""
        return [ADAPTER_NAME]

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Accepts only the learner's own name, `"default"` (there is no other adapter to switch to)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if names != [ADAPTER_NAME]:
            raise ReGradError(f"cannot set adapter {adapter_name!r}: {_ONE_ADAPTER}")

    def add_adapter(self, *args, **kwargs) -> None:
        """Not supported: raises [`ReGradError`] (see the message for what to do instead)."""
        raise ReGradError(f"cannot add an adapter: {_ONE_ADAPTER}")

    def load_adapter(self, *args, **kwargs) -> None:
        """Not supported: raises [`ReGradError`] (see the message for what to do instead)."""
        raise ReGradError(f"cannot load an adapter: {_ONE_ADAPTER}")

    def delete_adapter(self, *args, **kwargs) -> None:
        """Not supported: raises [`ReGradError`] (see the message for what to do instead)."""
        raise ReGradError(f"cannot delete an adapter: {_ONE_ADAPTER}")

    def enable_peft_hotswap(self, *args, **kwargs) -> None:
        """Not supported: raises [`ReGradError`] (see the message for what to do instead)."""
        raise ReGradError(f"adapter hotswapping does not apply: {_ONE_ADAPTER}")

    def get_adapter_state_dict(self, adapter_name: str | None = None, state_dict=None) -> dict[str, torch.Tensor]:
        """The learner's LoRA tensors as peft names them (adapter name dropped, e.g.
        `model.layers.15.mlp.up_proj.lora_A.weight`), copied; as transformers' `PeftAdapterMixin` method."""
        self.set_adapter(adapter_name or ADAPTER_NAME)
        with self._adaptation_lock:
            tensors = {name: parameter.detach().clone() for name, parameter in self._lora.items()}
        return get_peft_model_state_dict(
            self.language_model, state_dict=tensors, adapter_name=ADAPTER_NAME, save_embedding_layers=False
        )

    # ------------------------------------------------------------------ parameter counts

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """`(trainable parameters, all parameters)`, counted as peft counts them (4-bit and DeepSpeed ZeRO-3
        parameters included); the trainable ones are the LoRA tensors and the step sizes."""
        return PeftModel.get_nb_trainable_parameters(self)

    def print_trainable_parameters(self) -> None:
        """Prints `trainable params: ... || all params: ... || trainable%: ...`, as peft's models do."""
        PeftModel.print_trainable_parameters(self)

    # ------------------------------------------------------------------ export

    def export_adapter(
        self,
        save_directory: str | os.PathLike,
        ids: Sequence[str] | None = None,
        documents: Sequence[str] | None = None,
        gamma: float | None = None,
    ) -> Path:
        """Writes the learner as a standard peft LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`),
        alone or with the step of some documents baked in, so that any peft-aware server can serve it.

        With `ids` (documents of the attached bank) or `documents` (texts, their gradients computed now), the adapter
        holds `theta' = theta - gamma * alpha_t * sum_i g_i`, computed exactly as inside
        [`~ReGradForCausalLM.injected`] / [`~ReGradForCausalLM.knowledge`]: `PeftModel.from_pretrained(base, dir)`
        then generates what this model generates inside that context (the tensors are bit for bit those inside it).
        The model's tensors are never written. The config records a base that `AutoPeftModelForCausalLM` loads:
        the base model's name and revision, or for the embedded default base (not on the Hub under its name) its
        converted local folder (see [`regrad_hf.defaults.embedded_model_path`]; on another machine, pass that
        machine's folder to `PeftModel.from_pretrained`). A `README.md` names the base model and its revision.

        Args:
            save_directory (`str` or `os.PathLike`): where to write (created if needed).
            ids (`Sequence[str]`, *optional*): ids of documents in the attached bank.
            documents (`Sequence[str]`, *optional*): document texts; not with `ids`.
            gamma (`float`, *optional*): step multiplier; defaults to `config.gamma`.

        Returns:
            `Path`: the directory.

        Raises:
            [`ReGradTypeError`] or [`ReGradValueError`]: `save_directory` is not a path, or is empty.
            [`ReGradFileError`]: it is a file or under one, or a file cannot be written (a full disk).

        Example:
            ```python
            model.export_adapter("zorbia-adapter", ids=["zorbia"])
            served = AutoPeftModelForCausalLM.from_pretrained("zorbia-adapter")  # the base and the adapter
            ```
        """
        output_directory(save_directory, "save_directory", create=False)  # refused before any gradient is computed
        if ids is not None and documents is not None:
            raise ReGradValueError("export_adapter takes ids (from the attached bank) or documents, not both")
        if isinstance(ids, str):
            raise ReGradValueError("ids must be a list of document ids, not a single string")
        with self._adaptation_lock:
            # The un-adapted learner; the step is added out of place, so the model is never written. Adding the same
            # float32 step, cast to each tensor's dtype, is the same operation as the in-place add of an adaptation,
            # so the tensors are bit for bit those inside `injected(ids)` / `knowledge(documents)`.
            state = {name: tensor for name, tensor in self.learner_state_dict().items() if name in self._lora}
            if ids is None and documents is None:
                tensors = {name: tensor.clone() for name, tensor in state.items()}
            else:
                stacked = (
                    self._require_bank().gather(list(ids)) if ids is not None else self.document_gradients(documents)
                )
                gamma = self.config.gamma if gamma is None else check_gamma(gamma)
                delta = deltas.combine(stacked, self.step_sizes(), gamma, self.gradient_transform)
                tensors = {
                    name: tensor + delta[name].to(device=tensor.device, dtype=tensor.dtype)
                    if name in delta
                    else tensor.clone()
                    for name, tensor in state.items()
                }
        name, revision = self.config.base_model_name_or_path, self.config.base_model_revision
        base, base_revision = loadable_base(name, revision)
        return write_peft_adapter(
            self.language_model,
            tensors,
            save_directory,
            base_model_name_or_path=base,
            revision=base_revision,
            card=render_adapter_card(name, revision, base),
        )
