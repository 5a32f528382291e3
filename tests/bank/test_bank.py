import hashlib
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from regrad_hf import BankMismatchError, GradientBank, ReGradKeyError, ReGradValueError
from regrad_hf.errors import BankNotFoundError
from regrad_hf.files import DIRECTORY_MODE, FILE_MODE

from ..conftest import DOCUMENTS, IDS, assert_equal_up_to_rounding, make_tiny_model


def snapshot(bank):
    return len(bank), bank.ids, {i: bank.document(i).text for i in bank.ids}


def test_search_ranks_the_relevant_document_first(tiny_bank):
    hits = tiny_bank.search("Which mineral did Halvorsen discover?", k=2)
    assert [hit.id for hit in hits][0] == "halvorsen"
    assert hits[0].score > hits[1].score
    assert hits[0].text == DOCUMENTS[1]
    batch = tiny_bank.search(["capital of Zorbia", "bicycle frame material"], k=1)
    assert [hits[0].id for hits in batch] == ["zorbia", "velomar"]


def test_search_is_exact_up_to_the_limit_and_approximate_above(tiny_model, embedder, monkeypatch):
    documents = [f"Note {i}: the {c} lantern of street {i % 7} burns {i % 5} hours a night." for i, c in
                 enumerate(["red", "blue", "green", "amber", "violet", "white"] * 20)]  # fmt: skip
    bank = GradientBank.build(tiny_model, documents, embedder_model=embedder, show_progress=False)
    queries = ["a violet lantern on street 3", "lanterns that burn four hours", "Note 77"]
    vectors = embedder.encode(documents, normalize_embeddings=True)
    asked = embedder.encode(queries, normalize_embeddings=True)
    true_top = [[str(i) for i in (-(vectors @ q)).argsort(kind="stable")[:10]] for q in asked]
    assert [[hit.id for hit in hits] for hits in bank.search(queries, k=10)] == true_top
    calls = []
    search = bank.index._index.search
    monkeypatch.setattr(bank.index._index, "search", lambda *a, **kw: calls.append(kw["exact"]) or search(*a, **kw))
    bank.search(queries[0], k=3)
    monkeypatch.setattr("regrad_hf.bank.index.EXACT_SEARCH_MAX_DOCUMENTS", len(bank) - 1)
    bank.search(queries[0], k=3)
    bank.search(queries[0], k=3, exact=True)
    assert calls == [True, False, True]


def test_gather_returns_the_stored_gradients(tiny_model, tiny_bank):
    gathered = tiny_bank.gather(["velomar", "zorbia"])
    # The build computed the four documents in one call; the same call gives the same bits. In another batch a
    # document's gradient differs by float rounding (see test_deltas), which bf16 rounding can make visible.
    expected = tiny_model.document_gradients(DOCUMENTS)
    assert set(gathered) == set(tiny_model.lora_parameters())
    for name, tensor in gathered.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[name][[2, 0]].to(torch.bfloat16))
    alone = tiny_model.document_gradients([DOCUMENTS[2], DOCUMENTS[0]])
    for name, tensor in gathered.items():
        assert_equal_up_to_rounding(tensor, alone[name].to(torch.bfloat16))


def test_bank_dtype_follows_the_config(tokenizer, embedder):
    model = make_tiny_model(tokenizer, bank_dtype="float32")
    bank = GradientBank.build(model, DOCUMENTS[:1], embedder_model=embedder, show_progress=False)
    assert bank.dtype == "float32"
    assert next(iter(bank.gather(["0"]).values())).dtype == torch.float32


def test_round_trip_in_a_new_process(tiny_bank, tmp_path):
    tiny_bank.save_pretrained(tmp_path / "bank")
    queries = ["capital of Zorbia", "a game with swans", "mineral found in caves"]
    expected_hits = [[(h.id, round(h.score, 5)) for h in hits] for hits in tiny_bank.search(queries, k=3)]
    expected = tiny_bank.gather(IDS)
    script = textwrap.dedent(
        f"""
        import json, sys
        from safetensors.torch import save_file
        from regrad_hf import GradientBank
        bank = GradientBank.from_pretrained({str(tmp_path / "bank")!r})
        hits = [[(h.id, round(h.score, 5)) for h in hits] for hits in bank.search({queries!r}, k=3)]
        save_file(bank.gather({IDS!r}), {str(tmp_path / "gathered.safetensors")!r})
        print(json.dumps(hits))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [[list(h) for h in hits] for hits in expected_hits]
    from safetensors.torch import load_file

    gathered = load_file(str(tmp_path / "gathered.safetensors"))
    assert all(torch.equal(gathered[name], expected[name]) for name in expected)


def test_layout_on_disk(tiny_bank, tmp_path):
    tiny_bank.save_pretrained(tmp_path / "bank", max_shard_bytes=1)  # one document per shard
    tmp_path = tmp_path / "bank"
    # staged in private temporary files and directories, published with ordinary modes
    assert (tmp_path.stat().st_mode & 0o777) == DIRECTORY_MODE
    assert all((p.stat().st_mode & 0o777) == FILE_MODE for p in tmp_path.rglob("*") if p.is_file())
    config = json.loads((tmp_path / "bank_config.json").read_text())
    assert config["num_documents"] == 4 and config["dtype"] == "bfloat16" and config["embedding_dim"] == 384
    assert [s["file"] for s in config["shards"]] == [f"gradients/shard-{i:05d}.safetensors" for i in range(4)]
    lines = [json.loads(line) for line in (tmp_path / "documents.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == IDS
    assert (tmp_path / "index.usearch").is_file()
    loaded = GradientBank.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.gather(IDS)[n], tiny_bank.gather(IDS)[n]) for n in tiny_bank.parameter_shapes)


def test_remove_add_and_save_again_in_place(tiny_model, tiny_bank, tmp_path, embedder):
    (tmp_path / "README.md").write_text("my notes")
    tiny_bank.save_pretrained(tmp_path)
    bank = GradientBank.from_pretrained(tmp_path, embedder_model=embedder)
    bank.remove("zorbia")
    assert "zorbia" not in bank and len(bank) == 3
    assert all(hit.id != "zorbia" for hit in bank.search("capital of Zorbia", k=3))
    bank.add(tiny_model, ["Fenwick has a stone bridge built in 1811."], ids=["fenwick"], show_progress=False)
    bank.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my notes"
    reloaded = GradientBank.from_pretrained(tmp_path, embedder_model=embedder)
    assert reloaded.ids == ["halvorsen", "velomar", "quillon", "fenwick"]
    assert reloaded.search("old stone bridge", k=1)[0].id == "fenwick"
    assert torch.equal(
        reloaded.gather(["halvorsen"])[next(iter(reloaded.parameter_shapes))],
        tiny_bank.gather(["halvorsen"])[next(iter(tiny_bank.parameter_shapes))],
    )


def test_failed_save_leaves_the_previous_bank(tiny_bank, tmp_path, monkeypatch):
    tiny_bank.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    tiny_bank.remove("quillon")
    monkeypatch.setattr("regrad_hf.files.save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        tiny_bank.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.parent.iterdir() if ".staging-" in p.name]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda b, m: b.add(m, [], show_progress=False), ReGradValueError, "empty"),
        (lambda b, m: b.add(m, [""], show_progress=False), ReGradValueError, "empty"),
        (lambda b, m: b.add(m, ["a b c", "d e f"], ids=["x", "x"], show_progress=False), ReGradValueError, "duplicate"),
        (lambda b, m: b.add(m, ["a b c"], ids=["zorbia"], show_progress=False), ReGradValueError, "already holds"),
        (lambda b, m: b.add(m, ["a b c"], ids=["x", "y"], show_progress=False), ReGradValueError, "2 ids for 1"),
        (lambda b, m: b.add(m, ["a b c"], metadata=[{"f": object()}]), ReGradValueError, "JSON"),
        (lambda b, m: b.gather(["zorbia", "nope"]), ReGradKeyError, "nope"),
        (lambda b, m: b.gather([]), ReGradValueError, "at least one"),
        (lambda b, m: b.remove(["velomar", "nope"]), ReGradKeyError, "nope"),
        (lambda b, m: b.search("anything", k=5), ReGradValueError, "larger than the bank"),
        (lambda b, m: b.search("", k=1), ReGradValueError, "non-empty query"),
        (lambda b, m: b.search("anything", k=0), ReGradValueError, "positive integer"),
        (lambda b, m: b.search("anything", k=-2), ReGradValueError, "positive integer"),
        (lambda b, m: b.add(m, [b"bytes, not text"], show_progress=False), ReGradValueError, "not a string"),
        (lambda b, m: b.add(m, ["broken \udcff text"], show_progress=False), ReGradValueError, "not valid Unicode"),
        (lambda b, m: b.add(m, ["fine text"], ids=[""], show_progress=False), ReGradValueError, "non-empty strings"),
        (lambda b, m: b.add(m, ["fine text"], batch_size=0, show_progress=False), ReGradValueError, "batch_size"),
    ],
)
def test_bad_input_raises_and_changes_nothing(tiny_model, tiny_bank, call, error, match):
    before = snapshot(tiny_bank)
    with pytest.raises(error, match=match):
        call(tiny_bank, tiny_model)
    assert snapshot(tiny_bank) == before


def test_errors_share_a_base_class_and_builtin_types():
    from regrad_hf import ReGradError

    assert issubclass(ReGradValueError, ValueError) and issubclass(ReGradValueError, ReGradError)
    assert issubclass(ReGradKeyError, KeyError) and issubclass(ReGradKeyError, ReGradError)


def test_another_learner_is_refused(tokenizer, tiny_bank):
    other = make_tiny_model(tokenizer, seed=1)
    with pytest.raises(
        BankMismatchError, match=r"differ in base_weights .*, lora_values \(bank [0-9a-f]+, model [0-9a-f]+\)"
    ):
        other.attach_bank(tiny_bank)
    with pytest.raises(BankMismatchError):
        tiny_bank.add(other, ["Some new text here."], show_progress=False)
    other.attach_bank(tiny_bank, force=True)
    assert other.bank is tiny_bank


def _rewrite(directory, name, text):
    """Replaces a catalogue file and fixes its checksum, so that the check behind the checksum has to catch it."""
    (directory / name).write_text(text)
    config = json.loads((directory / "bank_config.json").read_text())
    key = {"documents.jsonl": "documents_sha256", "index.usearch": "index_sha256"}[name]
    config[key] = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    (directory / "bank_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: (d / "bank_config.json").unlink(), "bank_config.json is missing"),
        (lambda d: (d / "bank_config.json").write_text("{not json"), "bank_config.json is not valid JSON"),
        (lambda d: _rewrite(d, "documents.jsonl", '{"id": 1}\n'), "documents.jsonl line 1: field 'id'"),
        (lambda d: (d / "gradients" / "shard-00000.safetensors").unlink(), "shard-00000.safetensors is missing"),
        (lambda d: (d / "index.usearch").write_bytes(b"garbage"), "index.usearch"),
        (lambda d: _truncate(d / "gradients" / "shard-00000.safetensors"), "not a readable safetensors file"),
        (lambda d: _flip_header_byte(d / "gradients" / "shard-00000.safetensors"), "shard-00000.safetensors"),
        (
            lambda d: _rewrite(d, "documents.jsonl", "\n".join((d / "documents.jsonl").read_text().splitlines()[:2])),
            "holds 2 documents",
        ),
    ],
)
def test_damaged_bank_files_are_named_in_the_error(tiny_bank, tmp_path, damage, match):
    tiny_bank.save_pretrained(tmp_path)
    damage(tmp_path)
    with pytest.raises(ReGradValueError, match=match):
        GradientBank.from_pretrained(tmp_path)


def test_another_base_revision_is_refused(tiny_model, tiny_bank):
    tiny_model.config.base_model_revision = "0123abc"
    with pytest.raises(BankMismatchError, match="base_revision"):
        tiny_model.attach_bank(tiny_bank)


def test_non_finite_gradients_are_refused_at_build(tiny_model, tiny_bank, monkeypatch):
    before = snapshot(tiny_bank)
    compute = tiny_model.document_gradients

    def poisoned(documents):
        stacked = compute(documents)
        next(iter(stacked.values()))[-1].view(-1)[0] = float("nan")
        return stacked

    monkeypatch.setattr(tiny_model, "document_gradients", poisoned)
    with pytest.raises(ReGradValueError, match=r"documents \['b'\] contain NaN or inf"):
        tiny_bank.add(tiny_model, ["First new text.", "Second new text."], ids=["a", "b"], show_progress=False)
    assert snapshot(tiny_bank) == before


def test_a_flipped_bit_in_gradient_data_is_caught_by_the_checksum(tiny_bank, tmp_path):
    tiny_bank.save_pretrained(tmp_path, max_shard_bytes=1)  # one document per shard
    shard = tmp_path / "gradients" / "shard-00001.safetensors"  # "halvorsen"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # the lowest bit of one bf16 value: still a finite, plausible number
    shard.write_bytes(bytes(data))
    bank = GradientBank.from_pretrained(tmp_path)
    bank.gather(["zorbia", "velomar"])  # other shards are fine
    with pytest.raises(ReGradValueError, match="shard-00001.safetensors does not match its checksum"):
        bank.gather(["halvorsen"])


def test_non_finite_stored_gradients_are_refused_on_use(tiny_bank, tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_bank.save_pretrained(tmp_path)
    shard = tmp_path / "gradients" / "shard-00000.safetensors"
    tensors = load_file(str(shard))
    name = next(iter(tensors))
    tensors[name][1].view(-1)[3] = float("inf")  # row 1 = "halvorsen"
    save_file(tensors, str(shard))
    # a bank written with the bad value and a matching checksum (e.g. by a buggy writer)
    config = json.loads((tmp_path / "bank_config.json").read_text())
    config["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (tmp_path / "bank_config.json").write_text(json.dumps(config))
    bank = GradientBank.from_pretrained(tmp_path)
    with pytest.raises(ReGradValueError, match=r"\['halvorsen'\] contain NaN or inf .*corrupted"):
        bank.gather(["zorbia", "halvorsen"])


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t, n: {**t, n: t[n].float()}, "is F32"),
        (lambda t, n: {**t, n: t[n][:, :1].contiguous()}, "expected BF16"),
        (lambda t, n: {k: v for k, v in t.items() if k != n}, "other tensors"),
        (lambda t, n: {k: v[:1].contiguous() for k, v in t.items()}, "has 1 rows, bank_config.json says 4"),
    ],
)
def test_shards_that_do_not_fit_the_bank_are_refused_on_load(tiny_bank, tmp_path, edit, match):
    from safetensors.torch import load_file, save_file

    tiny_bank.save_pretrained(tmp_path)
    shard = tmp_path / "gradients" / "shard-00000.safetensors"
    tensors = load_file(str(shard))
    save_file(edit(tensors, next(iter(tensors))), str(shard))
    with pytest.raises(ReGradValueError, match=match):
        GradientBank.from_pretrained(tmp_path)


def test_edited_fingerprint_is_refused(tiny_bank, tmp_path):
    tiny_bank.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "bank_config.json").read_text())
    config["learner"]["lora_values"] = "0" * 64
    (tmp_path / "bank_config.json").write_text(json.dumps(config))
    with pytest.raises(ReGradValueError, match="does not match the learner field"):
        GradientBank.from_pretrained(tmp_path)


def _killed_between_the_two_renames(target):
    """What a save killed after "move the old bank aside" and before "move the new bank in" leaves behind."""
    backup = target.with_name(f".{target.name}.old-1234abcd")
    (target.parent / f".{target.name}.swap").write_text(json.dumps({"backup": backup.name}))
    target.rename(backup)
    return backup


def _listing(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_a_save_killed_between_the_two_renames_is_read_by_readers_and_repaired_by_the_next_writer(tiny_bank, tmp_path):
    tiny_bank.save_pretrained(tmp_path / "bank")
    backup = _killed_between_the_two_renames(tmp_path / "bank")
    before = _listing(tmp_path)
    with pytest.warns(UserWarning, match="a save into it was interrupted; read the previous bank from"):
        bank = GradientBank.from_pretrained(tmp_path / "bank")
    assert bank.ids == IDS and _listing(tmp_path) == before  # the reader renamed nothing
    bank.remove("quillon")
    bank.save_pretrained(tmp_path / "bank")  # a writer: puts the backup back, then saves over it
    assert not backup.exists() and not (tmp_path / ".bank.swap").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bank.")] == [".bank.lock"]
    assert GradientBank.from_pretrained(tmp_path / "bank").ids == IDS[:3]


def test_a_deleted_bank_is_never_recreated_from_a_backup(tiny_model, tiny_bank, embedder, tmp_path):
    tiny_bank.save_pretrained(tmp_path / "bank")
    shutil.copytree(tmp_path / "bank", tmp_path / ".bank.old-00000000")  # an old backup, without a journal
    shutil.copytree(tmp_path / "bank", tmp_path / ".bank.staging-x1")  # and a killed save's staging
    shutil.rmtree(tmp_path / "bank")  # deleted on purpose
    with pytest.raises(BankNotFoundError, match="there is no bank at"):
        GradientBank.from_pretrained(tmp_path / "bank")
    assert not (tmp_path / "bank").exists()
    other = GradientBank.build(tiny_model, DOCUMENTS[:1], ids=["only"], embedder_model=embedder, show_progress=False)
    other.save_pretrained(tmp_path / "bank")  # a new bank, not the old one back; the leftovers are gone
    assert GradientBank.from_pretrained(tmp_path / "bank").ids == ["only"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bank.lock", "bank"]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_header_byte(path):
    data = bytearray(path.read_bytes())
    data[12] ^= 0xFF  # inside the JSON header
    path.write_bytes(bytes(data))


def test_a_very_long_document_is_truncated_with_a_warning(tiny_model, tiny_bank):
    long_text = "word " * 100_000
    with pytest.warns(UserWarning, match="truncated to max_document_tokens=64"):
        tiny_bank.add(tiny_model, [long_text], ids=["long"], show_progress=False)
    assert "long" in tiny_bank
