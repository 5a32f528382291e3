import json

import pytest

from regrad_hf import ReGradConfig, ReGradValueError


def test_json_round_trip(tmp_path):
    config = ReGradConfig(lora_rank=8, target_modules=["up_proj"], target_layers=[1, 2], gamma=2.0, top_k_docs=5)
    config.save_pretrained(tmp_path)
    loaded = ReGradConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "regrad"


def test_unknown_keys_warn_and_are_dropped():
    with pytest.warns(UserWarning, match="unknown keys: not_a_key"):
        config = ReGradConfig(not_a_key=1)
    assert not hasattr(config, "not_a_key")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"step_size_mode": "bogus"},
        {"step_size_parametrization": "cubic"},
        {"bank_dtype": "int16"},
        {"lora_rank": 0},
        {"top_k_docs": 0},
        {"max_document_tokens": 1},
        {"init_step_size": 0.0},
        {"target_modules": []},
        {"target_layers": []},
    ],
)
def test_invalid_values_raise(kwargs):
    with pytest.raises(ReGradValueError):
        ReGradConfig(**kwargs)


def test_top_k_does_not_leak_into_generation_config():
    # `top_k` is a sampling parameter of generation configs; the retrieval depth must not be mistaken for it.
    config = ReGradConfig(top_k_docs=7)
    assert "top_k" not in config.to_dict()
