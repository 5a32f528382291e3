"""The guards of the test run (tests/conftest.py): caches in a temporary folder, the embedded model's cache kept,
the Hub offline, no connection but loopback, a per-test timeout, and Hypothesis writing nothing into the checkout."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import datasets
import pytest
from huggingface_hub import constants
from hypothesis import settings
from hypothesis.configuration import storage_directory

from regrad_hf import defaults

from . import conftest
from .conftest import RUN_DIR, NetworkBlockedError

ROOT = Path(__file__).resolve().parents[1]


def test_the_hub_and_datasets_caches_are_in_the_run_folder():
    assert RUN_DIR is not None, f"{conftest._EARLY} were imported before tests/conftest.py set the environment"
    for path in (constants.HF_HOME, constants.HF_HUB_CACHE, datasets.config.HF_DATASETS_CACHE):
        assert Path(path).resolve().is_relative_to(RUN_DIR.resolve()), path
    assert RUN_DIR.name.startswith("regrad-tests-") and not RUN_DIR.resolve().is_relative_to(ROOT)


def test_the_embedded_model_cache_outlives_the_run():
    """The dequantised SmolLM2 stays in the persistent cache, converted once per machine, not once per run."""
    assert defaults.cache_dir() == Path(os.environ["REGRAD_HF_CACHE"])
    assert not defaults.cache_dir().resolve().is_relative_to(RUN_DIR.resolve())
    assert defaults.embedded_model_path().resolve().is_relative_to(defaults.cache_dir().resolve())


def test_the_hub_is_offline_for_tests_without_the_loopback_hub():
    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE


def test_only_loopback_connections_are_allowed():
    for family, address in ((socket.AF_INET, ("192.0.2.1", 443)), (socket.AF_INET6, ("2001:db8::1", 443, 0, 0))):
        with socket.socket(family, socket.SOCK_STREAM) as sock, pytest.raises(NetworkBlockedError, match="loopback"):
            sock.connect(address)  # TEST-NET addresses: never reached even without the guard
        with socket.socket(family, socket.SOCK_STREAM) as sock, pytest.raises(NetworkBlockedError):
            sock.connect_ex(address)
    assert len(conftest._blocked) == 4
    conftest._blocked.clear()  # else this test's teardown fails it, as it should fail any other test

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        accepted = threading.Thread(target=lambda: server.accept()[0].close(), daemon=True)
        accepted.start()
        with socket.create_connection(server.getsockname(), timeout=10):
            pass
        accepted.join(timeout=10)
    assert not conftest._blocked


def test_every_test_has_a_timeout(request):
    assert request.config.pluginmanager.hasplugin("timeout")
    assert float(request.config.getini("timeout")) >= 600


def test_hypothesis_writes_nothing_into_the_checkout():
    assert settings().database is None
    directory = storage_directory("examples")
    directory = Path(getattr(directory, "path", directory))  # a StorageDirectory in recent Hypothesis, else a Path
    assert directory.resolve().is_relative_to(RUN_DIR.resolve())


_PADDING_SIDE: list[str] = []


def test_a_test_may_change_the_session_tokenizers_padding_side(tokenizer):
    _PADDING_SIDE.append(tokenizer.padding_side)
    tokenizer.padding_side = "left" if tokenizer.padding_side == "right" else "right"


def test_the_next_test_gets_the_padding_side_back(tokenizer):
    if not _PADDING_SIDE:
        pytest.skip("runs after the test above (pytest runs a module in order)")
    assert tokenizer.padding_side == _PADDING_SIDE[0]
