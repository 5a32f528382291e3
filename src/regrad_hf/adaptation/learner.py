"""The trainable part of ReGrad: LoRA tensors on chosen linear modules, and the step sizes `alpha_t`."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import ReGradConfig
from ..errors import ReGradValueError

# MLP projections of the common decoder families, tried in order when `target_modules` is None:
# Llama/Qwen/Mistral/Gemma, GPT-2 (Conv1D), Phi, GPT-NeoX/Falcon, GPT-J, OPT (fc1/fc2 in the layer itself, no `mlp`).
MLP_TARGET_FAMILIES: tuple[tuple[str, ...], ...] = (
    ("gate_proj", "up_proj", "down_proj"),
    ("mlp.c_fc", "mlp.c_proj"),
    ("mlp.fc1", "mlp.fc2"),
    ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    ("mlp.fc_in", "mlp.fc_out"),
    ("fc1", "fc2"),
)

ADAPTER_NAME = "default"


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _decoder_layers(model: nn.Module) -> tuple[str, int]:
    """Finds the `nn.ModuleList` of decoder layers.

    Returns:
        `tuple[str, int]`: the qualified name of the list and its length.
    """
    text_config = model.config.get_text_config() if hasattr(model, "config") else None
    expected = getattr(text_config, "num_hidden_layers", None)
    lists = [(name, len(m)) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    matching = [item for item in lists if item[1] == expected] or sorted(lists, key=lambda item: -item[1])
    if not matching:
        raise ReGradValueError(f"{type(model).__name__} has no list of decoder layers (no nn.ModuleList found)")
    return matching[0]


def _suffix_matches(name: str, suffixes: Iterable[str]) -> bool:
    return any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)


def find_target_modules(
    model: nn.Module, target_modules: Sequence[str] | None = None, target_layers: Sequence[int] | None = None
) -> list[str]:
    """Resolves which linear modules of `model` carry LoRA tensors.

    Args:
        model (`nn.Module`):
            A causal LM (any transformers decoder).
        target_modules (`Sequence[str]`, *optional*):
            Module-name suffixes to match. `None` tries the MLP projections of the known decoder families.
        target_layers (`Sequence[int]`, *optional*):
            Decoder layer indices to adapt. `None` means the upper half of the layers.

    Returns:
        `list[str]`: the qualified names of the matched modules, in the model's order.

    Raises:
        [`ReGradValueError`]: when nothing matches (the message lists the model's linear module names) or a layer
        index is out of range.
    """
    layers_name, num_layers = _decoder_layers(model)
    layers = list(range(num_layers // 2, num_layers)) if target_layers is None else list(target_layers)
    out_of_range = [index for index in layers if not 0 <= index < num_layers]
    if out_of_range:
        raise ReGradValueError(f"target_layers {out_of_range} out of range: the model has {num_layers} layers")
    prefixes = tuple(f"{layers_name}.{index}." for index in layers)

    linear_names = [name for name, module in model.named_modules() if _is_linear(module)]
    in_layers = [name for name in linear_names if name.startswith(prefixes)]
    families = [tuple(target_modules)] if target_modules is not None else MLP_TARGET_FAMILIES
    for suffixes in families:
        names = [name for name in in_layers if _suffix_matches(name, suffixes)]
        if names:
            return names
    # Name the module paths relative to a layer, so the user sees what to put in `target_modules`.
    relative = sorted({name.split(".", len(layers_name.split(".")) + 1)[-1] for name in in_layers})
    wanted = list(target_modules) if target_modules is not None else [s for f in MLP_TARGET_FAMILIES for s in f]
    raise ReGradValueError(
        f"No linear module of {type(model).__name__} in layers {layers[0]}..{layers[-1]} matches {wanted}. "
        f"Its linear modules per layer are: {relative}. Set ReGradConfig.target_modules to some of them."
    )


def inject_lora(model: nn.Module, config: ReGradConfig) -> list[str]:
    """Adds LoRA adapters to `model` in place (peft) and freezes every other weight.

    Returns:
        `list[str]`: the adapted module names.
    """
    names = find_target_modules(model, config.target_modules, config.target_layers)
    uses_conv1d = any(isinstance(model.get_submodule(name), Conv1D) for name in names)
    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=names,
        fan_in_fan_out=uses_conv1d,
    )
    inject_adapter_in_model(lora_config, model, adapter_name=ADAPTER_NAME)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_lora_parameter_name(name))
    return names


def remove_lora(model: nn.Module, requires_grad: Mapping[str, bool], peft_config: object = None) -> None:
    """Undoes [`inject_lora`]: each LoRA layer is replaced by the layer it wraps, every weight gets back its
    `requires_grad` flag (parameter name to flag, taken before the injection), and the model's `peft_config`
    attribute, which peft sets, gets back its earlier value (`None`: it had none).

    The caller's base model then leaves a failed `from_pretrained(..., base_model=model)` as it came in."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            model.set_submodule(name, module.get_base_layer())
    for name, parameter in model.named_parameters():
        if name in requires_grad:
            parameter.requires_grad_(requires_grad[name])
    if peft_config is not None:
        model.peft_config = peft_config
    elif "peft_config" in vars(model):
        del model.peft_config


# Config fields that hold how many positions a decoder family was built for, in the order they are looked up.
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def position_limit(model: nn.Module) -> int | None:
    """How many token positions the language model was built for (its config's `max_position_embeddings` or the
    family's name for it), or `None` when its config says nothing."""
    config = getattr(model, "config", None)
    for field in POSITION_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_document_tokens(config: ReGradConfig, model: nn.Module) -> None:
    """Refuses a `max_document_tokens` beyond the base model's positions: a document gradient is one forward pass
    over the document, which such a base cannot take (and whose memory would grow with the setting, not the text).

    Raises:
        [`ReGradValueError`]: `config.max_document_tokens` is larger than [`position_limit`].
    """
    limit = position_limit(model)
    if limit is not None and config.max_document_tokens > limit:
        raise ReGradValueError(
            f"max_document_tokens={config.max_document_tokens} is more than the {limit} positions of the base model; "
            f"set it to at most {limit}"
        )


def is_lora_parameter_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA tensors of `model`, by qualified name, in registration order."""
    parameters = {name: p for name, p in model.named_parameters() if is_lora_parameter_name(name)}
    if not parameters:
        raise ReGradValueError(f"{type(model).__name__} has no LoRA tensors; wrap it with ReGradForCausalLM.from_base")
    return parameters


class StepSizes(nn.Module):
    """Learned step sizes `alpha_t`: one per LoRA tensor (`tie`), one per row of each LoRA tensor (`row`), one per
    element (`full`, Meta-SGD), one for all (`same`), or fixed (`fix`).

    In `row` mode the step of row `j` of tensor `t` is `alpha_{t,j} * g_{t,j}`: `lora_B` (out x rank) gets a step
    size per output feature, `lora_A` (rank x in) one per rank component.

    Args:
        shapes (`Mapping[str, Sequence[int]]`): the LoRA tensors' shapes by name, in a fixed order.
        mode (`str`): `"tie"`, `"row"`, `"same"` or `"fix"`.
        parametrization (`str`): `"log"` stores `log(alpha)`, `"linear"` stores `alpha`.
        init (`float`): the initial step size.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], mode: str, parametrization: str, init: float):
        super().__init__()
        self.names = list(shapes)
        self._shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self.mode = mode
        self.parametrization = parametrization
        # Each tensor's step sizes are the slice [start, start + count) of `raw`, viewed in `self._views[name]`'s
        # shape so that they broadcast against the tensor.
        self._slices: dict[str, tuple[int, int, tuple[int, ...]]] = {}
        count = 0
        for index, (name, shape) in enumerate(shapes.items()):
            if mode == "row":
                view = (shape[0], *[1] * (len(shape) - 1))
                self._slices[name] = (count, shape[0], view)
                count += shape[0]
            elif mode == "full":
                self._slices[name] = (count, math.prod(shape), tuple(shape))
                count += math.prod(shape)
            else:
                self._slices[name] = (index if mode == "tie" else 0, 1, ())
        count = count if mode in ("row", "full") else len(self.names) if mode == "tie" else 1
        raw = torch.full((count,), math.log(init) if parametrization == "log" else init, dtype=torch.float32)
        if mode == "fix":
            self.register_buffer("raw", raw)
        else:
            self.raw = nn.Parameter(raw)

    def values(self) -> torch.Tensor:
        """The step sizes as a vector (differentiable w.r.t. `raw`)."""
        return self.raw.exp() if self.parametrization == "log" else self.raw

    @torch.no_grad()
    def copy_from(self, other: StepSizes) -> None:
        """Takes the step sizes of a learner with another layout of the same LoRA tensors: each row or element gets
        its tensor's or row's step size (`tie`/`same` -> `row`/`full`, `row` -> `full`), a coarser layout the mean of
        the finer one's (`row`/`full` -> `tie`, `full` -> `row`), all the mean of all (`-> same`/`fix`).

        Raises:
            [`ReGradValueError`]: when `other` is for other LoRA tensors.
        """
        if other.names != self.names:
            raise ReGradValueError("the step sizes are for other LoRA tensors: the learners' layouts differ")
        theirs = other()
        values = torch.empty_like(self.raw)
        if self.mode in ("same", "fix"):
            values.fill_(torch.cat([value.reshape(-1) for value in theirs.values()]).mean())
        for name, (start, count, view) in self._slices.items():
            if self.mode == "full":
                values[start : start + count] = theirs[name].expand(view).reshape(-1)
            elif self.mode == "row":
                own = theirs[name]
                if own.numel() == math.prod(self._shapes[name]) > count:  # per element: each row's mean
                    own = own.reshape(count, -1).mean(-1)
                values[start : start + count] = own.reshape(-1).expand(count)
            elif self.mode == "tie":
                values[start] = theirs[name].mean()
        self.raw.copy_(values.log() if self.parametrization == "log" else values)

    def forward(self) -> dict[str, torch.Tensor]:
        """Returns the step sizes of every LoRA tensor, by name: a scalar, or (`row`) a `(rows, 1)` column."""
        alpha = self.values()
        return {name: alpha[start : start + count].reshape(view) for name, (start, count, view) in self._slices.items()}


# Bumped when the way gradients are computed changes, so banks of an older computation are not mixed in.
GRADIENT_FORMAT_VERSION = "1"

# Base config keys that say how a model was loaded or is run, not what it computes: left out of its identity, so a
# model loaded from another path, with another attention kernel, or with `use_cache` off (Trainer) is the same base.
# The dtype is left out here because the weights' hash covers it.
_RUNTIME_CONFIG_KEYS = frozenset(
    {
        "_name_or_path", "name_or_path", "_commit_hash", "transformers_version", "architectures", "auto_map",
        "dtype", "torch_dtype", "quantization_config", "use_cache", "return_dict", "output_attentions",
        "output_hidden_states", "attn_implementation", "_attn_implementation", "_attn_implementation_internal",
        "experts_implementation", "_experts_implementation", "id2label", "label2id", "problem_type",
        "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id", "tokenizer_class",
        "task_specific_params", "finetuning_task", "prefix", "custom_pipelines",
    }
)  # fmt: skip
# Values read from each base tensor for its hash, at evenly spaced positions (all of them in smaller tensors).
BASE_SAMPLE_VALUES = 1024


def _without_runtime_keys(value):
    if isinstance(value, dict):
        return {key: _without_runtime_keys(item) for key, item in value.items() if key not in _RUNTIME_CONFIG_KEYS}
    return value


def base_identity(model: nn.Module) -> dict[str, str]:
    """What identifies a base model's weights, hashed: its config without loading/runtime keys (`base_config`), and
    the names, shapes, dtypes and a fixed sample of the values of its non-LoRA parameters (`base_weights`).

    The sample takes [`BASE_SAMPLE_VALUES`] values at evenly spaced positions of every tensor, so it costs
    milliseconds whatever the model's size, is the same in every process, and changes when the base is another
    checkpoint, a fine-tuned copy, or cast to another dtype. It is not a checksum of every weight: a base edited
    in a few values may keep its hash.
    """
    config = getattr(model, "config", None)
    described = _without_runtime_keys(config.to_dict()) if config is not None else {}
    config_hash = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()
    weights = hashlib.sha256()
    named = {
        name.replace(".base_layer.", "."): parameter  # the same base with LoRA on other modules names them alike
        for name, parameter in model.named_parameters()
        if not is_lora_parameter_name(name)
    }
    for name in sorted(named):
        tensor = named[name].detach()
        weights.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        flat = tensor.reshape(-1)
        if flat.numel() > BASE_SAMPLE_VALUES:
            positions = torch.arange(BASE_SAMPLE_VALUES, device=flat.device) * (flat.numel() - 1)
            flat = flat[positions // (BASE_SAMPLE_VALUES - 1)]
        weights.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return {"base_config": config_hash, "base_weights": weights.hexdigest()}


def learner_identity(
    base_model: str | None,
    base_revision: str | None,
    parameters: Mapping[str, torch.Tensor],
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """What a document gradient depends on, field by field: base model name and revision, LoRA layout (names and
    shapes), LoRA values, the gradient format version, and the base model's config and weights (`base`, from
    [`base_identity`]). Step sizes are left out on purpose: they scale gradients at use time and do not change them.
    """
    layout, values = hashlib.sha256(), hashlib.sha256()
    for name in sorted(parameters):
        tensor = parameters[name].detach().to("cpu", torch.float32).contiguous()
        layout.update(f"{name}:{tuple(tensor.shape)}\n".encode())
        values.update(tensor.numpy().tobytes())
    return {
        "base_model": str(base_model),
        "base_revision": str(base_revision),
        "lora_layout": layout.hexdigest(),
        "lora_values": values.hexdigest(),
        "gradient_format": GRADIENT_FORMAT_VERSION,
        **(base or {}),
    }


def fingerprint_of(identity: Mapping[str, str]) -> str:
    """One hash of a [`learner_identity`]."""
    return hashlib.sha256(json.dumps(dict(identity), sort_keys=True).encode()).hexdigest()
