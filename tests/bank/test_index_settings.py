"""The bank's HNSW settings (connectivity, expansion_add, expansion_search): passed to the usearch index, saved in
bank_config.json, checked on load (hostile values refused with typed errors, nothing written), and absent from
older configs, which load with the settings banks had before (usearch's defaults)."""

import json
import shutil

import pytest

from regrad_hf import GradientBank, ReGradError, ReGradValueError
from regrad_hf.bank.index import DEFAULT_INDEX_SETTINGS, LEGACY_INDEX_SETTINGS, IndexSettings
from regrad_hf.errors import ReGradTypeError

from ..conftest import DOCUMENTS, IDS, make_tiny_model
from .test_adversarial import tree_of
from .test_bad_inputs import files_of, state_of

CUSTOM = {"connectivity": 8, "expansion_add": 40, "expansion_search": 100}


@pytest.fixture(scope="module")
def saved(tokenizer, embedder, tmp_path_factory):
    model = make_tiny_model(tokenizer)
    bank = GradientBank.build(
        model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False, index_settings=CUSTOM
    )
    directory = tmp_path_factory.mktemp("saved") / "bank"
    bank.save_pretrained(directory)
    return model, bank, directory


def test_settings_reach_the_index_and_round_trip_through_save_and_load(saved, embedder):
    _, bank, directory = saved
    assert bank.index_settings == IndexSettings(**CUSTOM)
    assert (bank.index.connectivity, bank.index.expansion_add, bank.index.expansion_search) == (8, 40, 100)
    config = json.loads((directory / "bank_config.json").read_text())
    assert config["index_settings"] == CUSTOM
    loaded = GradientBank.from_pretrained(directory, embedder_model=embedder)
    assert loaded.index_settings == IndexSettings(**CUSTOM)
    # connectivity comes from the index file; the expansions (not in the file) from the config
    assert (loaded.index.connectivity, loaded.index.expansion_add, loaded.index.expansion_search) == (8, 40, 100)
    assert [h.id for h in loaded.search(DOCUMENTS[2], k=2, exact=False)] == [
        h.id for h in bank.search(DOCUMENTS[2], k=2, exact=False)
    ]


def test_a_new_bank_records_the_default_settings(tiny_bank, tmp_path):
    assert tiny_bank.index_settings == DEFAULT_INDEX_SETTINGS
    assert tiny_bank.index.expansion_search == DEFAULT_INDEX_SETTINGS.expansion_search
    tiny_bank.save_pretrained(tmp_path / "bank")
    config = json.loads((tmp_path / "bank" / "bank_config.json").read_text())
    assert config["index_settings"] == DEFAULT_INDEX_SETTINGS.as_dict()


def test_partial_settings_take_the_defaults_for_the_rest():
    settings = IndexSettings.from_mapping({"expansion_search": 7})
    assert settings == IndexSettings(DEFAULT_INDEX_SETTINGS.connectivity, DEFAULT_INDEX_SETTINGS.expansion_add, 7)


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ("fast", ReGradTypeError, "must be a mapping"),
        ([("connectivity", 8)], ReGradTypeError, "must be a mapping"),
        ({"connectivity": "16"}, ReGradTypeError, "connectivity must be an integer"),
        ({"connectivity": True}, ReGradTypeError, "connectivity must be an integer"),
        ({"expansion_add": 64.0}, ReGradTypeError, "expansion_add must be an integer"),
        ({"connectivity": 1}, ReGradValueError, "connectivity must be from 2"),
        ({"connectivity": -4}, ReGradValueError, "connectivity must be from 2"),
        ({"expansion_add": 0}, ReGradValueError, "expansion_add must be from 1"),
        ({"expansion_search": 10**12}, ReGradValueError, "expansion_search must be from 1"),
        ({"ef": 64}, ReGradValueError, "unknown index setting 'ef'"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tiny_model, embedder, tmp_path, settings, error, match):
    with pytest.raises(error, match=match) as raised:
        GradientBank.build(
            tiny_model,
            DOCUMENTS,
            ids=IDS,
            embedder_model=embedder,
            show_progress=False,
            output_dir=tmp_path / "bank",
            index_settings=settings,
        )
    assert isinstance(raised.value, ReGradError)
    assert list(tmp_path.iterdir()) == []  # nothing written: no bank, no build checkpoint
    with pytest.raises(error, match=match):
        GradientBank(learner={"a": "b"}, parameter_shapes={"w": [2]}, embedding_dim=384, index_settings=settings)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("fast", "must be an object with exactly the fields"),
        ([16, 128, 64], "must be an object with exactly the fields"),
        (None, "must be an object with exactly the fields"),
        ({"connectivity": 8, "expansion_add": 40}, "must be an object with exactly the fields"),
        ({**CUSTOM, "ef": 1}, "must be an object with exactly the fields"),
        ({**CUSTOM, "connectivity": "8"}, "'index_settings.connectivity' must be an integer from 2 to"),
        ({**CUSTOM, "connectivity": True}, "'index_settings.connectivity' must be an integer from 2 to"),
        ({**CUSTOM, "expansion_add": -1}, "'index_settings.expansion_add' must be an integer from 1 to"),
        ({**CUSTOM, "expansion_search": 10**30}, "'index_settings.expansion_search' must be an integer from 1 to"),
        ({**CUSTOM, "expansion_search": 1.5}, "'index_settings.expansion_search' must be an integer from 1 to"),
        # valid values that disagree with the graph in index.usearch (built with connectivity 8)
        ({**CUSTOM, "connectivity": 16}, "the index graph has connectivity 8, the bank's config says 16"),
    ],
)
def test_hostile_settings_in_a_config_are_typed_errors_and_change_nothing(saved, embedder, tmp_path, value, match):
    model, bank, original = saved
    directory = tmp_path / "bank"
    shutil.copytree(original, directory)
    path = directory / "bank_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "index_settings": value}))
    before, saved_files, copy_tree = state_of(bank, model), files_of(original), tree_of(directory)
    with pytest.raises(ReGradValueError, match=match):
        GradientBank.from_pretrained(directory, embedder_model=embedder)
    assert state_of(bank, model) == before
    assert files_of(original) == saved_files
    assert tree_of(directory) == copy_tree


def test_a_config_without_settings_loads_with_the_previous_defaults(tiny_model, embedder, tmp_path):
    # a bank whose index was built as every bank's was before the settings existed (usearch's defaults)
    old = GradientBank.build(
        tiny_model,
        DOCUMENTS,
        ids=IDS,
        embedder_model=embedder,
        show_progress=False,
        index_settings=LEGACY_INDEX_SETTINGS,
    )
    old.save_pretrained(tmp_path / "bank")
    path = tmp_path / "bank" / "bank_config.json"
    config = json.loads(path.read_text())
    del config["index_settings"]
    path.write_text(json.dumps(config))
    loaded = GradientBank.from_pretrained(tmp_path / "bank", embedder_model=embedder)
    assert loaded.index_settings == LEGACY_INDEX_SETTINGS == IndexSettings(16, 128, 64)  # usearch's defaults
    assert (loaded.index.connectivity, loaded.index.expansion_search) == (16, 64)
    assert loaded.ids == IDS
    loaded.save_pretrained(tmp_path / "again")  # saving writes the settings it loaded with
    again = json.loads((tmp_path / "again" / "bank_config.json").read_text())
    assert again["index_settings"] == LEGACY_INDEX_SETTINGS.as_dict()
