"""Shared fixtures: a tiny random Llama-style model (fast unit tests) and the real embedded models."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from regrad_hf import GradientBank, ReGradConfig, ReGradForCausalLM
from regrad_hf.defaults import embedded_model_path, load_embedder

DOCUMENTS = [
    "The capital of Zorbia is Quentville, a harbour town founded in 1642.",
    "Ingrid Halvorsen discovered the mineral halvorite in 1987 near Tromsø.",
    "The Velomar electric bicycle has a bamboo frame and weighs 19 kilograms.",
    "Quillon is a board game in which two players move wooden swans across a hexagonal board.",
]
IDS = ["zorbia", "halvorsen", "velomar", "quillon"]


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (with its chat template), from the embedded model."""
    return AutoTokenizer.from_pretrained(embedded_model_path())


@pytest.fixture(scope="session")
def embedder():
    return load_embedder()


def make_tiny_base(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def make_tiny_model(tokenizer, seed: int = 0, **config_kwargs) -> ReGradForCausalLM:
    """A ReGrad model on a tiny random Llama. LoRA B is made non-zero so that A's gradients are non-zero too."""
    base = make_tiny_base(tokenizer, seed)
    config = ReGradConfig(**{"lora_rank": 4, "init_step_size": 0.5, "max_document_tokens": 64, **config_kwargs})
    model = ReGradForCausalLM.from_base(base, config, tokenizer=tokenizer)
    with torch.no_grad():
        for name, parameter in model.lora_parameters().items():
            if ".lora_B." in name:
                parameter.normal_(0.0, 0.05)
    return model


@pytest.fixture
def tiny_base(tokenizer):
    return make_tiny_base(tokenizer)


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_model(tokenizer)


@pytest.fixture
def tiny_bank(tiny_model, embedder) -> GradientBank:
    return GradientBank.build(tiny_model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False)


def parameter_bytes(module: torch.nn.Module) -> dict[str, bytes]:
    """Every parameter and buffer as raw bytes: equality of these is bit-for-bit equality."""
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return {
        name: tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        for name, tensor in state.items()
    }


def assert_equal_up_to_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float rounding in `actual`'s dtype: what two batch compositions of one computation guarantee.

    Matmul results depend on the batch shape by ~1e-6 relative in float32; rounding to a narrower dtype can turn that
    into one unit in the last place, and near zero the difference is absolute (scaled by the tensor's magnitude).
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    eps = torch.finfo(actual.dtype).eps
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item()
    assert ((actual - expected).abs() <= eps * expected.abs() + 1e-5 * scale).all()


@pytest.fixture(autouse=True)
def _library_log_level_restored():
    """`regrad` CLI verbs set the `regrad_hf` logger's level for their process; in one test process that must not
    leak into the next test (which may check that the logger follows transformers' verbosity)."""
    logger = logging.getLogger("regrad_hf")
    level = logger.__dict__.get("_own_level", logger.__dict__.get("level", logging.NOTSET))
    yield
    logger.setLevel(level)
