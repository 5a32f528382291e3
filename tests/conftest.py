"""Shared fixtures: a tiny random Llama-style model (fast unit tests) and the real embedded models; and the guards of
the whole run: caches in a temporary folder, no network but loopback, Hypothesis writing nothing into the checkout.

The environment is set before anything imports huggingface_hub, datasets or transformers (they read it at import):

- `HF_HOME`, `HF_HUB_CACHE` and `HF_DATASETS_CACHE` point into one temporary folder of the run, removed at its end;
- `REGRAD_HF_CACHE` keeps the dequantised embedded SmolLM2 where it was (`$HF_HOME/regrad_hf` of the caller's
  environment), so that the suite converts it once per machine rather than once per run: the one cache a run
  leaves behind (tests of the conversion itself set their own `REGRAD_HF_CACHE`);
- `HF_HUB_OFFLINE=1`: the tests that use the loopback Hub of tests/hub_server.py turn it off for themselves
  (`huggingface_hub.constants.HF_HUB_OFFLINE`), with their own endpoint;
- `HYPOTHESIS_STORAGE_DIRECTORY` in the temporary folder, and a Hypothesis profile without an example database.
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path


def _isolate_environment() -> Path:
    """Sets the variables of the module docstring (the caller's `REGRAD_HF_CACHE` wins); returns the run's folder."""
    caller_hf_home = os.path.expanduser(
        os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    )
    os.environ.setdefault("REGRAD_HF_CACHE", os.path.join(caller_hf_home, "regrad_hf"))
    run_dir = Path(tempfile.mkdtemp(prefix="regrad-tests-"))
    atexit.register(shutil.rmtree, run_dir, ignore_errors=True)
    for name in ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE", "HF_TOKEN_PATH"):
        os.environ.pop(name, None)  # would point back into the caller's caches
    os.environ["HF_HOME"] = str(run_dir / "hf_home")
    os.environ["HF_HUB_CACHE"] = str(run_dir / "hf_home" / "hub")
    os.environ["HF_DATASETS_CACHE"] = str(run_dir / "hf_home" / "datasets")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = str(run_dir / "hypothesis")
    return run_dir


# A helper script of a test may import this module for its factories after those libraries (tests/bank/
# test_bank_build.py's BUILDER): it runs in the environment of the test that started it, and is left as it is. In the
# pytest process they come after this module; tests/test_suite_guards.py fails if they did not.
_EARLY = [name for name in ("huggingface_hub", "datasets", "transformers") if name in sys.modules]
RUN_DIR: Path | None = None if _EARLY else _isolate_environment()

import pytest
import torch
from hypothesis import settings
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from regrad_hf import GradientBank, ReGradConfig, ReGradForCausalLM
from regrad_hf.defaults import embedded_model_path, load_embedder

settings.register_profile("regrad", database=None)  # no example database (it would live in .hypothesis/)
settings.load_profile("regrad")


class NetworkBlockedError(RuntimeError):
    """A test tried to connect to a host other than this machine (a RuntimeError: no library retries or hides it)."""


def _is_loopback(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths, abstract sockets: local by nature
        return True
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:  # a host name: connect() is given addresses once they are resolved
        return False


_blocked: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def _network_guard():
    """Every socket of the run may connect to loopback only (tests/hub_server.py's Hub is on 127.0.0.1)."""
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(sock: socket.socket, address) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
            _blocked.append(repr(address))
            raise NetworkBlockedError(f"the test suite reaches no network but loopback: connect to {address!r}")

    def guarded_connect(sock, address):
        check(sock, address)
        return connect(sock, address)

    def guarded_connect_ex(sock, address):
        check(sock, address)
        return connect_ex(sock, address)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", guarded_connect)
        patch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
        yield


@pytest.fixture(autouse=True)
def _no_blocked_connection():
    """Fails a test that tried to go online, even when a library caught the error (and fell back to a cache)."""
    _blocked.clear()
    yield
    assert not _blocked, f"the test tried to connect to {_blocked} (no network but loopback in tests)"


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


@pytest.fixture(autouse=True)
def _tokenizer_padding_side_restored(request):
    """Tests set the session tokenizer's `padding_side` (left, to batch generation): each test gets it back as it
    was, so that no result depends on the order the tests run in."""
    if "tokenizer" not in request.fixturenames:  # every fixture the test uses, directly or not
        yield
        return
    tokenizer = request.getfixturevalue("tokenizer")
    side = tokenizer.padding_side
    yield
    tokenizer.padding_side = side


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


def make_tiny_model(tokenizer, seed: int = 0, served: bool = False, **config_kwargs) -> ReGradForCausalLM:
    """A ReGrad model on a tiny random Llama. LoRA B is made non-zero so that A's gradients are non-zero too.

    Unless `served`, its `generate` decodes as its base model does (no stop string, prompts as given), so that tests
    of retrieval and injection compare it with `language_model.generate` under the same step; `served=True` keeps
    the learner's serving defaults (tests/modeling/test_served.py).
    """
    base = make_tiny_base(tokenizer, seed)
    config = ReGradConfig(**{"lora_rank": 4, "init_step_size": 0.5, "max_document_tokens": 64, **config_kwargs})
    model = ReGradForCausalLM.from_base(base, config, tokenizer=tokenizer)
    if not served:
        model.generation_config.update(stop_strings=None, apply_learner_prompt=False, answer_repetition_penalty=1.0)
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
