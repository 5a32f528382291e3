"""The base of the benchmarks' stand-in `GradientSource`s: the real learner's config, identity and LoRA tensors, so
a bank built from one attaches to the real model; subclasses decide which gradients a document gets."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from regrad_hf import ReGradForCausalLM


class LearnerGradients:
    """Delegates `config`, `learner_identity` and `lora_parameters` to `model`; subclasses add `document_gradients`."""

    def __init__(self, model: ReGradForCausalLM):
        self.model, self.config = model, model.config

    def learner_identity(self) -> dict[str, str]:
        return self.model.learner_identity()

    def lora_parameters(self) -> Mapping[str, torch.Tensor]:
        return self.model.lora_parameters()
