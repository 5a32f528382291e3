"""Sharing on the Hub: the real `huggingface_hub` client against a small Hub stand-in on 127.0.0.1 (hub_server.py)."""

from __future__ import annotations

import errno
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers.utils.hub
from huggingface_hub import HfApi, constants
from safetensors.torch import load, load_file
from transformers import AutoModelForCausalLM, pipeline

import regrad_hf
import regrad_hf.bank.index
from regrad_hf import GradientBank, ReGradConfig, ReGradFileError, ReGradForCausalLM, ReGradHubError, ReGradValueError
from regrad_hf.adaptation import deltas
from regrad_hf.cli import main as regrad
from regrad_hf.config import PROMPT_FIELDS
from regrad_hf.hub import pull
from regrad_hf.hub.cards import TEMPLATE_PATH, merge_card
from regrad_hf.prompting import LEGACY_PROMPT, PromptTemplate

from ..conftest import DOCUMENTS, IDS, make_tiny_base, parameter_bytes
from ..hub_server import FakeHub
from ..modeling.test_reliability_30 import mounted_tmpfs

GREEDY = {"max_new_tokens": 6, "do_sample": False}
PROMPT = "What is the capital of Zorbia?"
BASE_REPO, LEARNER_REPO = "tiny/base", "user/learner"


@dataclass
class Published:
    """What the module's Hub holds: a tiny base model, and a learner with its bank in `bank/` (one shard each)."""

    hub: FakeHub
    model: ReGradForCausalLM
    bank: GradientBank
    commit: str


def _point_client_at(patch: pytest.MonkeyPatch, hub: FakeHub, cache: Path) -> None:
    # huggingface_hub reads HF_ENDPOINT and HF_HUB_CACHE at import time, into these constants.
    patch.setenv("HF_ENDPOINT", hub.endpoint)
    patch.setattr(constants, "ENDPOINT", hub.endpoint)
    patch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    patch.setattr(constants, "HF_HUB_CACHE", str(cache))
    patch.setattr(constants, "HF_HUB_OFFLINE", False)
    patch.setattr(transformers.utils.hub, "_hf_api", None)  # transformers keeps one HfApi with its endpoint


def make_learner(tokenizer, seed: int = 0, **config_kwargs) -> ReGradForCausalLM:
    """A learner on the tiny base in the Hub repo BASE_REPO (so loading it fetches the base through the Hub too)."""
    torch.manual_seed(seed)
    config = ReGradConfig(lora_rank=4, init_step_size=0.5, max_document_tokens=64, top_k_docs=1, **config_kwargs)
    model = ReGradForCausalLM.from_base(BASE_REPO, config, tokenizer=tokenizer)
    with torch.no_grad():
        for name, parameter in model.lora_parameters().items():
            if ".lora_B." in name:
                parameter.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def published(tokenizer, embedder, tmp_path_factory) -> Published:
    hub = FakeHub().start()
    with pytest.MonkeyPatch.context() as patch:
        _point_client_at(patch, hub, tmp_path_factory.mktemp("publisher-cache"))
        base_dir = tmp_path_factory.mktemp("tiny-base")
        make_tiny_base(tokenizer).save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        HfApi().create_repo(BASE_REPO)
        HfApi().upload_folder(repo_id=BASE_REPO, folder_path=base_dir)
        model = make_learner(tokenizer)
        bank = GradientBank.build(model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False)
        model.attach_bank(bank)
        model.push_to_hub(LEARNER_REPO, token="hf_test")
        commit = bank.push_to_hub(LEARNER_REPO, subfolder="bank", max_shard_bytes=1, token="hf_test").oid
    yield Published(hub, model, bank, commit)
    hub.stop()


@pytest.fixture
def hub(published, tmp_path, monkeypatch, embedder) -> FakeHub:
    """The module's Hub, seen by a client with an empty cache (tmp_path/cache)."""
    _point_client_at(monkeypatch, published.hub, tmp_path / "cache")
    monkeypatch.setattr(regrad_hf.bank.index, "load_embedder", lambda name=None: embedder)  # the loaded one, not again
    return published.hub


def generate(model, tokenizer, **kwargs) -> torch.Tensor:
    return model.generate(**tokenizer(PROMPT, return_tensors="pt"), **GREEDY, **kwargs)


def assert_same_tensors(data: bytes, path: Path) -> None:
    # safetensors may order its metadata differently from one save to the next: compare tensors, not bytes
    expected = load_file(str(path))
    found = load(data)
    assert found.keys() == expected.keys() and all(torch.equal(found[name], expected[name]) for name in expected)


def downloaded(hub: FakeHub, since: int, part: str) -> list[str]:
    return [path for method, path in hub.requests[since:] if method == "GET" and part in path]


def test_push_uploads_learner_tokenizer_card_and_bank_never_base_weights(published, tmp_path):
    files = published.hub.files(LEARNER_REPO)
    learner_files = {"config.json", "learner.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json"}
    assert learner_files <= set(files)
    bank_files = ["bank_config.json", "documents.jsonl", "index.usearch", "README.md"]
    shards = [f"gradients/shard-{i:05d}.safetensors" for i in range(4)]
    assert {f"bank/{name}" for name in bank_files + shards} <= set(files)
    assert not any(name.endswith(("model.safetensors", ".bin")) for name in files)
    published.model.save_pretrained(tmp_path)  # the same tensors as a local save
    assert_same_tensors(files["learner.safetensors"], tmp_path / "learner.safetensors")
    config = json.loads(files["config.json"])
    assert config["model_type"] == "regrad" and config["base_model_name_or_path"] == BASE_REPO
    card = files["README.md"].decode()
    assert "library_name: regrad-hf" in card and f"base_model: {BASE_REPO}" in card
    assert published.model.fingerprint() in card
    bank_card = files["bank/README.md"].decode()
    assert "gradient-bank" in bank_card and "4 documents" in bank_card and published.bank.fingerprint in bank_card


def test_from_pretrained_through_the_hub_generates_like_the_local_model(published, hub, tokenizer):
    start = len(hub.requests)
    loaded = ReGradForCausalLM.from_pretrained(LEARNER_REPO)
    assert parameter_bytes(loaded) == parameter_bytes(published.model)
    assert loaded.bank is not None and loaded.bank.ids == IDS  # bank/ of the repo, attached
    assert downloaded(hub, start, "/gradients/") == []  # shards are downloaded on first use only
    assert torch.equal(generate(loaded, tokenizer), generate(published.model, tokenizer))
    zorbia_shard = f"bank/gradients/shard-{IDS.index('zorbia'):05d}.safetensors"
    assert [path.rsplit("/", 4)[-3:] for path in downloaded(hub, start, "/gradients/")] == [zorbia_shard.split("/")]
    with loaded.retrieved(PROMPT) as hits:
        assert [hit.id for hit in hits] == ["zorbia"]
    assert downloaded(hub, start, "tiny/base/resolve") != []  # the base came through the Hub too


def test_a_trained_gradient_transform_round_trips_through_the_hub_with_its_bank(hub, tokenizer, embedder, tmp_path):
    model = make_learner(tokenizer, seed=1, gradient_transform_rank=2)
    bank = GradientBank.build(model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False)
    with torch.no_grad():  # trained after the bank was built: the bank still fits (raw gradients, see transform.py)
        model.gradient_transform.raw.add_(0.3 * torch.randn(model.gradient_transform.raw.shape))
    model.attach_bank(bank)
    model.push_to_hub("user/transformed", token="hf_test")
    bank.push_to_hub("user/transformed", subfolder="bank", token="hf_test")
    loaded = ReGradForCausalLM.from_pretrained("user/transformed")  # attaches bank/: its identity check passes
    assert loaded.config.gradient_transform_rank == 2 and loaded.bank.ids == IDS
    assert parameter_bytes(loaded) == parameter_bytes(model)
    assert torch.equal(generate(loaded, tokenizer), generate(model, tokenizer))
    steps = [deltas.combine(m.bank.gather(IDS[:2]), m.step_sizes(), 1.0, m.gradient_transform) for m in (model, loaded)]
    assert all(torch.equal(steps[0][name], steps[1][name]) for name in steps[0])
    assert regrad(["pull", "user/transformed", str(tmp_path / "pulled")]) == 0
    pulled = ReGradForCausalLM.from_pretrained(tmp_path / "pulled")
    assert parameter_bytes(pulled) == parameter_bytes(model) and pulled.bank.ids == IDS
    assert torch.equal(generate(pulled, tokenizer), generate(model, tokenizer))


def test_auto_model_and_pipeline_load_a_regrad_repo(published, hub, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(LEARNER_REPO)
    assert isinstance(model, ReGradForCausalLM) and model.bank is not None
    assert parameter_bytes(model) == parameter_bytes(published.model)

    generator = pipeline("text-generation", model=LEARNER_REPO)  # tokenizer found in the learner repo
    assert isinstance(generator.model, ReGradForCausalLM) and generator.model.bank is not None
    text = generator(PROMPT, **GREEDY)[0]["generated_text"]
    expected = tokenizer.decode(generate(published.model, tokenizer)[0], skip_special_tokens=True)
    assert text == expected


def test_the_prompt_template_travels_through_the_hub(published, hub, tokenizer):
    learner = make_learner(tokenizer, seed=4)
    learner.config.system_prompt = "Reply with only the answer."
    learner.config.user_template = "Question: {question}\n\n{context}"
    learner.config.answer_stop = "turn"
    learner.config.answer_repetition_penalty = 1.25
    repo = "user/prompted"
    learner.push_to_hub(repo)
    loaded = ReGradForCausalLM.from_pretrained("user/prompted")
    assert PromptTemplate.from_config(loaded.config) == PromptTemplate.from_config(learner.config)
    assert PromptTemplate.from_config(loaded.config).system_prompt == "Reply with only the answer."
    assert loaded.config.answer_repetition_penalty == 1.25
    # A repo whose config.json predates the prompt fields loads with the prompt such learners were trained with.
    config = {k: v for k, v in json.loads(hub.files("user/prompted")["config.json"]).items() if k not in PROMPT_FIELDS}
    HfApi().upload_file(
        path_or_fileobj=json.dumps(config).encode(), path_in_repo="config.json", repo_id="user/prompted"
    )
    assert PromptTemplate.from_config(ReGradForCausalLM.from_pretrained("user/prompted").config) == LEGACY_PROMPT


def test_revision_pinning_and_pull_requests(published, hub, tokenizer):
    first = make_learner(tokenizer, seed=1)
    first_commit = first.push_to_hub("user/pinned").oid
    second = make_learner(tokenizer, seed=2)
    second.push_to_hub("user/pinned")
    assert parameter_bytes(ReGradForCausalLM.from_pretrained("user/pinned")) == parameter_bytes(second)
    pinned = ReGradForCausalLM.from_pretrained("user/pinned", revision=first_commit)
    assert parameter_bytes(pinned) == parameter_bytes(first)

    main_before = hub.files("user/pinned")
    proposal = make_learner(tokenizer, seed=3).push_to_hub("user/pinned", create_pr=True)
    assert proposal.pr_url is not None and hub.files("user/pinned") == main_before
    assert hub.files("user/pinned", "refs/pr/1") != main_before


def test_offline_loads_from_the_cache_and_says_what_is_missing(published, hub, tokenizer, monkeypatch, tmp_path):
    online = ReGradForCausalLM.from_pretrained(LEARNER_REPO)
    generate(online, tokenizer)  # downloads zorbia's shard only
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = len(hub.requests)
    offline = ReGradForCausalLM.from_pretrained(LEARNER_REPO)
    assert torch.equal(generate(offline, tokenizer), generate(published.model, tokenizer))
    assert hub.requests[start:] == []  # nothing asked of the Hub
    with pytest.raises(ReGradHubError, match=r"not in the local cache.*shard-00001\.safetensors.*HF_HUB_OFFLINE=1"):
        offline.bank.gather(["halvorsen"])  # never downloaded
    with pytest.raises(ReGradHubError, match=rf"{LEARNER_REPO} .*not in the local cache.*config\.json"):
        ReGradForCausalLM.from_pretrained(LEARNER_REPO, cache_dir=tmp_path / "empty")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ReGradHubError, match="local_files_only=True"):
        GradientBank.from_pretrained(
            LEARNER_REPO, subfolder="bank", cache_dir=tmp_path / "empty", local_files_only=True
        )
    with pytest.raises(ReGradHubError, match="no repo of that name"):
        ReGradForCausalLM.from_pretrained("user/does-not-exist")


def test_loading_never_fetches_or_runs_code_or_pickles(published, hub, tmp_path):
    marker = tmp_path / "code-ran"
    files = hub.files(LEARNER_REPO)
    config = {**json.loads(files["config.json"]), "auto_map": {"AutoModelForCausalLM": "modeling_evil.Evil"}}
    HfApi().create_repo("user/evil")
    hub.edit(
        "user/evil",
        {
            **{name: content for name, content in files.items() if not name.startswith("bank/")},
            "config.json": json.dumps(config).encode(),
            "modeling_evil.py": f"open({str(marker)!r}, 'w').write('ran')\n".encode(),
            "pytorch_model.bin": b"\x80\x04not a real pickle",
        },
    )
    with pytest.warns(UserWarning, match="ignores unknown keys: auto_map"):
        model = ReGradForCausalLM.from_pretrained("user/evil")
    assert parameter_bytes(model) == parameter_bytes(published.model)
    for trust in (None, True):  # ReGradConfig drops the repo's auto_map, so even trust_remote_code=True runs no code
        with pytest.warns(UserWarning, match="ignores unknown keys: auto_map"):
            auto = AutoModelForCausalLM.from_pretrained("user/evil", trust_remote_code=trust)
        assert type(auto) is ReGradForCausalLM
    fetched = {path.rsplit("/", 1)[-1] for method, path in hub.requests if method == "GET" and "user/evil/" in path}
    assert not marker.exists() and not {"modeling_evil.py", "pytorch_model.bin"} & fetched

    hub.edit("user/evil", {"learner.safetensors": None, "learner.bin": b"\x80\x04pickle"})
    with pytest.raises(ReGradValueError, match="has no learner.safetensors"):
        ReGradForCausalLM.from_pretrained("user/evil")


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ({"bank/documents.jsonl": None}, r"documents\.jsonl is missing"),
        ({"bank/bank_config.json": b"{not json"}, r"bank_config\.json is not valid JSON"),
        ({"bank/index.usearch": b"garbage"}, r"index\.usearch does not match its checksum"),
    ],
)
def test_missing_or_malformed_bank_files_in_a_repo_are_named(published, hub, damage, match):
    HfApi().create_repo("user/damaged", exist_ok=True)
    hub.edit("user/damaged", {**hub.files(LEARNER_REPO, published.commit), **damage})
    with pytest.raises(ReGradValueError, match=match):
        GradientBank.from_pretrained("user/damaged", subfolder="bank")


def test_missing_or_corrupted_shards_in_a_repo_are_named_on_first_use(published, hub):
    shard = "bank/gradients/shard-{:05d}.safetensors"
    corrupted = bytearray(hub.files(LEARNER_REPO)[shard.format(1)])
    corrupted[-3] ^= 0x01
    HfApi().create_repo("user/bad-shards", exist_ok=True)
    hub.edit(
        "user/bad-shards",
        {**hub.files(LEARNER_REPO), shard.format(1): bytes(corrupted), shard.format(2): None},
    )
    bank = GradientBank.from_pretrained("user/bad-shards", subfolder="bank")
    bank.gather(["zorbia"])
    with pytest.raises(ReGradValueError, match=r"shard-00001\.safetensors does not match its checksum"):
        bank.gather(["halvorsen"])
    with pytest.raises(ReGradValueError, match=r"shard-00002\.safetensors is missing from the repo"):
        bank.gather(["velomar"])


def test_an_existing_readme_is_updated_not_overwritten(published, hub, tokenizer):
    HfApi().create_repo("user/carded")
    notes = "---\nlicense: mit\ntags:\n- mine\n---\n# My learner\n\nKeep this paragraph.\n"
    hub.edit("user/carded", {"README.md": notes.encode()})
    for _ in range(2):  # the second push replaces the regrad-hf section, it does not add another
        published.model.push_to_hub("user/carded", card_data={"datasets": ["rajpurkar/squad"]}, evaluation={"f1": 0.5})
    readme = hub.files("user/carded")["README.md"].decode()
    assert "Keep this paragraph." in readme and "license: mit" in readme and "rajpurkar/squad" in readme
    assert "- mine" in readme and "- regrad" in readme and "library_name: regrad-hf" in readme
    assert readme.count("<!-- regrad-hf:begin -->") == 1 and "| f1 | 0.5 |" in readme


def test_merge_card_keeps_text_and_metadata_outside_its_section():
    old = "---\nlicense: mit\ntags: [mine]\n---\nintro\n<!-- regrad-hf:begin -->old<!-- regrad-hf:end -->\noutro\n"
    new = "---\nlibrary_name: regrad-hf\ntags: [regrad]\n---\n<!-- regrad-hf:begin -->new<!-- regrad-hf:end -->\n"
    merged = merge_card(old, new)
    assert "intro\n<!-- regrad-hf:begin -->new<!-- regrad-hf:end -->\noutro" in merged and "old" not in merged
    assert "license: mit" in merged and "library_name: regrad-hf" in merged and "- mine\n- regrad" in merged
    assert merge_card(None, new) == new
    assert merge_card("plain notes", new).startswith("---\nlibrary_name: regrad-hf")


def test_the_card_template_ships_in_the_package():
    root_template = Path(__file__).resolve().parents[2] / "MODEL_CARD_TEMPLATE.md"
    assert TEMPLATE_PATH.is_file() and TEMPLATE_PATH.parent.parent == Path(regrad_hf.__file__).parent
    assert root_template.resolve() == TEMPLATE_PATH  # the repo root's copy is a link to the packaged one
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"templates/*"' in pyproject


def test_cli_push_and_pull(published, hub, tmp_path, capsys):
    published.model.save_pretrained(tmp_path / "learner")
    (tmp_path / "learner" / "README.md").write_text("# Local notes\n")
    published.bank.save_pretrained(tmp_path / "bank")
    assert regrad(["push", str(tmp_path / "learner"), "user/cli"]) == 0
    assert regrad(["push", str(tmp_path / "bank"), "user/cli", "--subfolder", "bank"]) == 0
    files = hub.files("user/cli")
    assert_same_tensors(files["learner.safetensors"], tmp_path / "learner" / "learner.safetensors")
    assert (
        "# Local notes" in files["README.md"].decode() and published.model.fingerprint() in files["README.md"].decode()
    )
    assert files["bank/bank_config.json"] == (tmp_path / "bank" / "bank_config.json").read_bytes()
    assert regrad(["push", str(tmp_path), "user/cli"]) == 2  # neither a learner nor a bank

    hub.edit("user/cli", {"helper.py": b"raise SystemExit('ran')\n"})
    assert regrad(["pull", "user/cli", str(tmp_path / "pulled")]) == 0
    assert not (tmp_path / "pulled" / "helper.py").exists()
    pulled = ReGradForCausalLM.from_pretrained(tmp_path / "pulled")
    assert parameter_bytes(pulled) == parameter_bytes(published.model) and pulled.bank.ids == IDS
    assert "pulled user/cli" in capsys.readouterr().out


def test_a_push_to_a_branch_leaves_main_and_a_smaller_bank_replaces_old_shards(published, hub):
    published.bank.push_to_hub("user/branched", max_shard_bytes=1)  # four shards
    main_files = hub.files("user/branched")
    published.bank.push_to_hub("user/branched", revision="dev")  # one shard, on a new branch
    assert hub.files("user/branched") == main_files
    shards = sorted(name for name in hub.files("user/branched", "dev") if name.startswith("gradients/"))
    assert shards == ["gradients/shard-00000.safetensors"]
    bank = GradientBank.from_pretrained("user/branched", revision="dev")
    assert all(torch.equal(bank.gather(IDS)[n], published.bank.gather(IDS)[n]) for n in bank.parameter_shapes)


def test_pull_onto_a_full_disk_or_into_a_file_raises_a_file_error(published, hub, tmp_path):
    disk = mounted_tmpfs(tmp_path / "disk", size="1m")
    try:
        with pytest.raises(ReGradFileError, match="disk is full"):
            pull(LEARNER_REPO, disk / "pulled")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    (tmp_path / "a-file").write_text("not a folder")
    for local_dir in (tmp_path / "a-file", tmp_path / "a-file" / "below"):
        with pytest.raises(ReGradFileError):
            pull(LEARNER_REPO, local_dir)


@pytest.mark.parametrize(
    ("failure", "error"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), ReGradFileError),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), ReGradFileError),
        (ConnectionError("connection reset by peer"), ReGradHubError),
    ],
)
def test_pull_failures_are_typed(published, hub, tmp_path, monkeypatch, failure, error):
    def failing(*args, **kwargs):
        raise failure

    monkeypatch.setattr(regrad_hf.hub.repos, "snapshot_download", failing)
    with pytest.raises(error):
        pull(LEARNER_REPO, tmp_path / "pulled")


def test_push_to_hub_creates_private_repos_with_the_message_and_tags_given(published, hub):
    published.model.push_to_hub("user/private", private=True, commit_message="learner v2", tags=["zorbia"])
    published.bank.push_to_hub("user/private-bank", private=True, commit_message="bank v2")
    assert hub.private["user/private"] and hub.private["user/private-bank"]
    assert ("user/private", "learner v2") in hub.commit_messages
    assert ("user/private-bank", "bank v2") in hub.commit_messages
    card = hub.files("user/private")["README.md"].decode()
    assert "- zorbia" in card and "- regrad" in card


def test_cli_pull_revision_downloads_that_commit(published, hub, tokenizer, tmp_path):
    first = make_learner(tokenizer, seed=5)
    first_commit = first.push_to_hub("user/revisions").oid
    make_learner(tokenizer, seed=6).push_to_hub("user/revisions")
    assert regrad(["pull", "user/revisions", str(tmp_path / "old"), "--revision", first_commit]) == 0
    assert parameter_bytes(ReGradForCausalLM.from_pretrained(tmp_path / "old")) == parameter_bytes(first)


@pytest.mark.parametrize("outside", ["../../x.json", "/abs/x.json", "bank/../../x.json", "..\\x.json"])
def test_pulling_a_repo_that_lists_a_file_outside_itself_downloads_nothing_and_says_so_in_one_line(
    published, hub, tmp_path, capsys, outside
):
    HfApi().create_repo("user/escaping", exist_ok=True)
    hub.edit("user/escaping", {**hub.files(LEARNER_REPO), outside: b"{}"})
    with pytest.raises(ReGradHubError, match="outside the repo"):
        pull("user/escaping", tmp_path / "pulled" / "here")
    assert not [path for path in (tmp_path / "pulled").rglob("*") if path.is_file()]  # refused before any download
    assert regrad(["pull", "user/escaping", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot pull user/escaping") and "Traceback" not in err and err.count("\n") == 1
