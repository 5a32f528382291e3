"""The adversarial pass of issue 14, bank side: hostile files, symlinks, damaged or swapped catalogue and index,
unchecked values, full disks, another embedder, lost writes. Each case asserts the typed error and that nothing
changed: the saved bank's files, the damaged copy's files (a reader writes nothing), and the in-memory bank's
documents, search hits and gradient bytes."""

import copy
import errno
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from usearch.index import Index

from regrad_hf import BankMismatchError, GradientBank, ReGradError, ReGradKeyError, ReGradValueError
from regrad_hf.bank.directory import journal_path, lock_path
from regrad_hf.errors import BankNotFoundError, ReGradFileError, ReGradTypeError

from ..conftest import DOCUMENTS, IDS, make_tiny_model, parameter_bytes
from .test_bad_inputs import SHARD, Context, files_of, state_of

CHECKSUM_KEYS = {"documents.jsonl": "documents_sha256", "index.usearch": "index_sha256"}


def fix_checksum(c, name):
    """Records a catalogue file's new checksum, so that the check behind the checksum has to catch the damage."""
    path = c.directory / "bank_config.json"
    config = json.loads(path.read_text())
    config[CHECKSUM_KEYS[name]] = hashlib.sha256((c.directory / name).read_bytes()).hexdigest()
    path.write_text(json.dumps(config))


def write(name, data, checksum=False):
    def prepare(c):
        (c.directory / name).write_bytes(data(c) if callable(data) else data)
        if checksum:
            fix_checksum(c, name)

    return prepare


def edit_records(edit, checksum=False):
    def prepare(c):
        path = c.directory / "documents.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        edit(records)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        if checksum:
            fix_checksum(c, "documents.jsonl")

    return prepare


def swap_rows(records):
    records[0]["row"], records[1]["row"] = records[1]["row"], records[0]["row"]


def link_outside(relative):
    """Moves a bank file (or folder) out of the bank and puts a symlink to it in its place: same bytes."""

    def prepare(c):
        inside = c.directory / relative
        outside = c.directory.parent / f"outside-{inside.name}"
        inside.rename(outside)
        inside.symlink_to(outside)

    return prepare


def self_link(relative):
    def prepare(c):
        (c.directory / relative).unlink()
        (c.directory / relative).symlink_to(c.directory / relative)

    return prepare


def foreign_index(metric="cos", dtype="f32", ndim=384, keys=4):
    def data(c):
        index = Index(ndim=ndim, metric=metric, dtype=dtype)
        vectors = np.random.default_rng(0).standard_normal((keys, ndim)).astype(np.float32)
        if dtype == "b1":  # bit vectors go in packed
            vectors = np.packbits(vectors > 0, axis=1)
        index.add(np.arange(keys, dtype=np.uint64), vectors)
        return bytes(index.save())

    return data


def edit_config(**fields):
    def prepare(c):
        path = c.directory / "bank_config.json"
        config = json.loads(path.read_text())
        config.update(fields)
        path.write_text(json.dumps(config))

    return prepare


def deep(depth):
    return "[" * depth + "]" * depth


def edit_config_text(edit):
    def prepare(c):
        path = c.directory / "bank_config.json"
        path.write_text(edit(path.read_text()))

    return prepare


def flipped(offset):
    def data(c):
        raw = bytearray((c.directory / "index.usearch").read_bytes())
        raw[offset] ^= 0x01
        return bytes(raw)

    return data


def load(c):
    return c.load()


def load_and_gather(c):
    return c.load().gather(IDS)


def save_into_copy(c):
    c.bank.save_pretrained(c.directory)


def failing(target, error):
    """Makes `target` (a dotted name) raise `error` during the call."""

    def act(c):
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(target, lambda *args, **kwargs: (_ for _ in ()).throw(error))
            c.bank.save_pretrained(c.directory)

    return act


def other_embedder(c):
    embedder = copy.deepcopy(c.embedder)
    with torch.no_grad():
        next(embedder.parameters()).view(-1)[0] += 1.0  # another model of the same dimension
    return GradientBank.from_pretrained(c.directory, embedder_model=embedder)


def case(kind, name, prepare, act, error, match):
    return pytest.param(prepare, act, error, match, id=f"{kind}/{name}")


CASES = [
    # security: symlinks inside a bank are never followed, even to identical bytes
    case("symlink", "shard", link_outside(SHARD), load, ReGradFileError, "shard-00000.safetensors is a symlink"),
    case("symlink", "gradients-folder", link_outside("gradients"), load, ReGradFileError, "gradients is a symlink"),
    case("symlink", "config", link_outside("bank_config.json"), load, ReGradFileError, "bank_config.json is a symlink"),
    case("symlink", "documents", link_outside("documents.jsonl"), load, ReGradFileError,
         "documents.jsonl is a symlink"),
    case("symlink", "index", link_outside("index.usearch"), load, ReGradFileError, "index.usearch is a symlink"),
    case("symlink", "self-link-config", self_link("bank_config.json"), load, ReGradFileError, "is a symlink"),
    case("symlink", "self-link-shard", self_link(SHARD), load, ReGradFileError, "is a symlink"),
    case("symlink", "foreign-file-on-save", lambda c: (c.directory / "notes.txt").symlink_to("/etc/hostname"),
         save_into_copy, ReGradFileError, "notes.txt is a symlink"),
    case("symlink", "foreign-self-link-on-save", lambda c: (c.directory / "loop").symlink_to(c.directory / "loop"),
         save_into_copy, ReGradFileError, "loop is a symlink"),
    case("symlink", "link-inside-foreign-folder-on-save",
         lambda c: (c.directory / "extra").mkdir() or (c.directory / "extra" / "passwd").symlink_to("/etc/passwd"),
         save_into_copy, ReGradFileError, "passwd is a symlink"),
    # integrity: the catalogue and the index are checksummed, the index's header checked against the config
    case("integrity", "swapped-rows", edit_records(swap_rows), load, ReGradValueError,
         "documents.jsonl does not match its checksum"),
    case("integrity", "edited-text", edit_records(lambda r: r[0].update(text="The capital of Zorbia is Paris.")),
         load, ReGradValueError, "documents.jsonl does not match its checksum"),
    case("integrity", "index-of-another-bank", write("index.usearch", foreign_index()), load, ReGradValueError,
         "index.usearch does not match its checksum"),
    *[case("integrity", f"index-byte-flip-{offset}", write("index.usearch", flipped(offset)), load, ReGradValueError,
           "index.usearch does not match its checksum") for offset in (0, 7, 40, 64, 100, 1000, 3000, -1)],
    case("integrity", "index-metric-l2sq", write("index.usearch", foreign_index(metric="l2sq"), checksum=True), load,
         ReGradValueError, "kind_metric is MetricKind.L2sq"),
    case("integrity", "index-dtype-i8", write("index.usearch", foreign_index(dtype="i8"), checksum=True), load,
         ReGradValueError, "kind_scalar is ScalarKind.I8"),
    case("integrity", "index-dtype-b1", write("index.usearch", foreign_index(metric="hamming", dtype="b1"),
                                              checksum=True), load, ReGradValueError, "index.usearch"),
    case("integrity", "index-dimension", write("index.usearch", foreign_index(ndim=128), checksum=True), load,
         ReGradValueError, "dimensions is 128"),
    case("integrity", "index-missing-a-key", write("index.usearch", foreign_index(keys=3), checksum=True), load,
         ReGradValueError, "vectors that do not match"),
    case("integrity", "edited-documents-checksum", edit_config(documents_sha256="0" * 64), load, ReGradValueError,
         "documents.jsonl does not match its checksum"),
    case("integrity", "edited-index-checksum", edit_config(index_sha256="f" * 64), load, ReGradValueError,
         "index.usearch does not match its checksum"),
    case("integrity", "no-documents-checksum", edit_config(documents_sha256=None), load, ReGradValueError,
         "field 'documents_sha256' must be a non-empty string"),
    # hostile JSON: nesting, integers, encodings
    case("json", "deep-config", write("bank_config.json", deep(100_000).encode()), load, ReGradValueError,
         "nests JSON deeper than the limit"),
    case("json", "deep-line-in-documents", write("documents.jsonl", (deep(50_000) + "\n").encode(), checksum=True),
         load, ReGradValueError, "nests JSON deeper than the limit"),
    case("json", "nested-metadata-past-the-cap", edit_records(
        lambda r: r[0].update(metadata={"x": json.loads(deep(80))}), checksum=True), load, ReGradValueError,
         "nests JSON deeper than the limit of 64"),
    case("json", "5000-digit-int-in-config", edit_config_text(
        lambda t: t.replace('"num_documents": 4', '"num_documents": ' + "9" * 5000)),
         load, ReGradValueError, "integer of 5000 digits"),
    case("json", "5000-digit-int-in-documents", write("documents.jsonl", lambda c: (c.directory / "documents.jsonl")
         .read_bytes().replace(b'"key": 0', b'"key": ' + b"1" * 5000, 1), checksum=True), load, ReGradValueError,
         "integer of 5000 digits"),
    case("json", "invalid-utf8-in-documents", write("documents.jsonl", lambda c: b"\xff\xfe" + (
        c.directory / "documents.jsonl").read_bytes(), checksum=True), load, ReGradValueError, "is not valid UTF-8"),
    case("json", "invalid-utf8-in-config", write("bank_config.json", lambda c: (c.directory / "bank_config.json")
         .read_bytes().replace(b'"embedder": "', b'"embedder": "\xc3(', 1)), load, ReGradValueError,
         "is not valid UTF-8"),
    case("json", "lone-surrogate-escape-in-metadata-in-file", edit_records(
        lambda r: r[0].update(metadata={"note": "\udcff"}), checksum=True), load, ReGradValueError,
         "not valid Unicode"),
    # values refused up front, before anything changes
    case("values", "lone-surrogate-id", None, lambda c: c.bank.add(c.model, ["A new fact."], ids=["bad\udcff"],
                                                                    show_progress=False),
         ReGradValueError, "not valid Unicode"),
    case("values", "lone-surrogate-metadata", None, lambda c: c.bank.add(
        c.model, ["A new fact."], metadata=[{"note": "\ud800"}], show_progress=False), ReGradValueError,
         "not valid Unicode"),
    case("values", "lone-surrogate-metadata-key", None, lambda c: c.bank.add(
        c.model, ["A new fact."], metadata=[{"\ud800": 1}], show_progress=False), ReGradValueError,
         "not valid Unicode"),
    case("values", "deep-metadata", None, lambda c: c.bank.add(
        c.model, ["A new fact."], metadata=[{"x": json.loads(deep(80))}], show_progress=False), ReGradValueError,
         "nests JSON deeper than the limit"),
    case("values", "huge-int-metadata", None, lambda c: c.bank.add(
        c.model, ["A new fact."], metadata=[{"x": 10**100}], show_progress=False), ReGradValueError,
         "more than 64 digits"),
    case("values", "5000-digit-int-metadata", None, lambda c: c.bank.add(
        c.model, ["A new fact."], metadata=[{"x": 10**4999}], show_progress=False), ReGradValueError, "metadata"),
    case("values", "non-string-metadata-key", None, lambda c: c.bank.add(
        c.model, ["A new fact."], metadata=[{"x": {1: 2}}], show_progress=False), ReGradValueError,
         "not a string"),
    case("values", "remove-repeated-id", None, lambda c: c.bank.remove(["zorbia", "zorbia"]), ReGradValueError,
         "more than once; nothing was removed"),
    case("values", "remove-known-and-repeated", None, lambda c: c.bank.remove(["velomar", "quillon", "velomar"]),
         ReGradValueError, "more than once"),
    case("types", "gather-none", None, lambda c: c.bank.gather(None), ReGradTypeError, "got NoneType"),
    case("types", "gather-int", None, lambda c: c.bank.gather(3), ReGradTypeError, "got int"),
    case("types", "gather-list-of-ints", None, lambda c: c.bank.gather([0, 1]), ReGradTypeError, "must be strings"),
    case("types", "search-none", None, lambda c: c.bank.search(None), ReGradTypeError, "got NoneType"),
    case("types", "search-bytes", None, lambda c: c.bank.search(b"query"), ReGradTypeError, "got bytes"),
    case("types", "search-k-bool", None, lambda c: c.bank.search("query", k=True), ReGradValueError, "k must be"),
    case("types", "remove-int", None, lambda c: c.bank.remove(0), ReGradTypeError, "got int"),
    case("types", "remove-none", None, lambda c: c.bank.remove(None), ReGradTypeError, "got NoneType"),
    case("types", "document-int", None, lambda c: c.bank.document(0), ReGradTypeError, "must be strings"),
    case("types", "ids-a-string", None, lambda c: c.bank.add(c.model, ["A new fact."], ids="n", show_progress=False),
         ReGradTypeError, "ids must be a sequence"),
    case("types", "unknown-id", None, lambda c: c.bank.gather(["nope"]), ReGradKeyError, "unknown document ids"),
    # full disks and damaged files: library errors wrapped, the directory as it was
    case("disk", "enospc-in-shard-write", None, failing("regrad_hf.files.save_file",
                                                          OSError(errno.ENOSPC, "No space left on device")),
         ReGradFileError, "the disk is full"),
    case("disk", "safetensors-error", None, failing("regrad_hf.files.save_file", SafetensorError(
        "I/O error: No space left on device (os error 28)")), ReGradFileError, "cannot write the bank into"),
    case("disk", "enospc-in-catalogue-write", None, failing("regrad_hf.bank.persistence.atomic_write_bytes",
                                                              OSError(errno.ENOSPC, "No space left on device")),
         ReGradFileError, "the disk is full"),
    case("disk", "usearch-runtime-error", None, failing("usearch.index.Index.save", RuntimeError("out of memory")),
         ReGradFileError, "cannot serialise the bank's index"),
    case("disk", "documents-is-a-folder", lambda c: (c.directory / "documents.jsonl").unlink() or
         (c.directory / "documents.jsonl").mkdir(), load, ReGradFileError, "not a regular file"),
    case("disk", "shard-is-a-folder", lambda c: (c.directory / SHARD).unlink() or (c.directory / SHARD).mkdir(),
         load, ReGradFileError, "not a regular file"),
    # another embedder
    case("embedder", "same-dimension-other-model", None, other_embedder, BankMismatchError,
         "not the one the bank's index was built with"),
    case("embedder", "recorded-identity-of-another-embedder", edit_config(embedder_sha256="0" * 64), load,
         BankMismatchError, "not the one the bank's index was built with"),
    case("embedder", "malformed-embedder-identity", edit_config(embedder_sha256="xyz"), load, ReGradValueError,
         "field 'embedder_sha256' must match"),
    # arguments of the wrong type or value: typed errors before anything is computed, written or locked
    *[case("arguments", f"documents-{name}", None, lambda c, documents=documents: c.bank.add(
        c.model, documents, show_progress=False), ReGradTypeError, "documents must be a list of strings")
      for name, documents in [("none", None), ("int", 5), ("generator", (d for d in ["A new fact."])),
                              ("mapping", {"A new fact.": 1}), ("set", {"A new fact."})]],
    case("arguments", "metadata-int", None, lambda c: c.bank.add(c.model, ["A new fact."], metadata=5,
                                                                 show_progress=False), ReGradTypeError,
         "metadata must be a sequence"),
    case("arguments", "metadata-a-mapping", None, lambda c: c.bank.add(c.model, ["A new fact."], metadata={"a": 1},
                                                                       show_progress=False), ReGradTypeError,
         "metadata must be a sequence"),
    case("arguments", "nan-metadata", None, lambda c: c.bank.add(c.model, ["A new fact."], metadata=[
        {"x": float("nan")}], show_progress=False), ReGradValueError, "JSON cannot represent"),
    case("arguments", "inf-metadata-in-file", edit_records(lambda r: r[0].update(metadata={"x": float("inf")}),
                                                          checksum=True), load, ReGradValueError,
         "JSON cannot represent"),
    case("arguments", "batch-size-bool", None, lambda c: c.bank.add(c.model, ["A new fact."], batch_size=True,
                                                                    show_progress=False), ReGradValueError,
         "batch_size must be a positive integer"),
    case("arguments", "add-model-none", None, lambda c: c.bank.add(None, ["A new fact."], show_progress=False),
         ReGradTypeError, "model must be a ReGradForCausalLM"),
    case("arguments", "build-model-a-string", None, lambda c: GradientBank.build(
        "model", ["A new fact."], embedder_model=c.embedder, show_progress=False), ReGradTypeError,
         "model must be a ReGradForCausalLM"),
    case("arguments", "search-exact-a-string", None, lambda c: c.bank.search("capital", k=1, exact="yes"),
         ReGradTypeError, "exact must be True, False or None"),
    case("arguments", "search-lone-surrogate", None, lambda c: c.bank.search("bad \udcff", k=1), ReGradValueError,
         "not valid Unicode"),
    case("arguments", "search-lone-surrogate-in-a-list", None, lambda c: c.bank.search(["fine", "\ud800"], k=1),
         ReGradValueError, "query 1 is not valid Unicode"),
    *[case("arguments", f"save-max-shard-bytes-{value!r}", None, lambda c, value=value: c.bank.save_pretrained(
        c.directory, max_shard_bytes=value), ReGradValueError, "max_shard_bytes must be a non-negative integer")
      for value in (-1, "1", None, True, 1.5)],
    case("arguments", "save-into-none", None, lambda c: c.bank.save_pretrained(None), ReGradTypeError,
         "save_directory must be a directory path"),
    case("arguments", "save-into-empty-path", None, lambda c: c.bank.save_pretrained(""), ReGradValueError,
         "empty path"),
    case("arguments", "load-int", None, lambda c: GradientBank.from_pretrained(3), ReGradTypeError,
         "must be a directory path"),
    case("arguments", "load-subfolder-traversal", None, lambda c: GradientBank.from_pretrained(
        c.directory / "gradients", subfolder="..", embedder_model=c.embedder), ReGradValueError,
         "leaves the directory or repo"),
    case("arguments", "load-subfolder-int", None, lambda c: GradientBank.from_pretrained(c.directory, subfolder=1),
         ReGradTypeError, "subfolder must be a string"),
    case("arguments", "build-into-int", None, lambda c: GradientBank.build(
        c.model, ["A new fact."], embedder_model=c.embedder, show_progress=False, output_dir=7), ReGradTypeError,
         "output_dir must be a directory path"),
    case("embedder", "unloadable-embedder-named-in-the-config", edit_config(embedder="/nonexistent/embedder"),
         lambda c: GradientBank.from_pretrained(c.directory).search("capital", k=1), ReGradError,
         "cannot load the embedder '/nonexistent/embedder'"),
    # lost banks
    case("loss", "deleted-with-a-backup-next-to-it", lambda c: shutil.copytree(
        c.directory, c.directory.with_name(".bank.old-00000000")) and shutil.rmtree(c.directory), load,
         BankNotFoundError, "there is no bank at"),
]  # fmt: skip


@pytest.fixture(scope="module")
def saved(tokenizer, embedder, tmp_path_factory):
    model = make_tiny_model(tokenizer)
    bank = GradientBank.build(model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False)
    directory = tmp_path_factory.mktemp("saved")
    bank.save_pretrained(directory)
    return model, bank, directory


def tree_of(directory):
    """Every entry under `directory`'s parent that belongs to the bank copy: names, link targets and bytes."""
    parent = directory.parent
    entries = {}
    for path in sorted(parent.rglob("*")):
        if path == lock_path(directory):  # created by any writer, and kept
            continue
        key = str(path.relative_to(parent))
        if path.is_symlink():
            entries[key] = ("link", os.readlink(path))
        elif path.is_file():
            entries[key] = path.read_bytes()
        else:
            entries[key] = "dir"
    return entries


@pytest.mark.parametrize(("prepare", "act", "error", "match"), CASES)
def test_adversarial_case_raises_a_typed_error_and_changes_nothing(
    saved, tokenizer, embedder, tmp_path, prepare, act, error, match
):
    model, bank, original = saved
    directory = tmp_path / "bank"
    shutil.copytree(original, directory)
    context = Context(bank, model, directory, tokenizer, embedder)
    if prepare is not None:
        prepare(context)
    before, saved_files, copy_tree = state_of(bank, model), files_of(original), tree_of(directory)
    with pytest.raises(error, match=match) as raised:
        act(context)
    assert isinstance(raised.value, ReGradError)
    assert state_of(bank, model) == before
    assert files_of(original) == saved_files
    assert tree_of(directory) == copy_tree  # nothing written, renamed or left behind (no staging, no backup)


def test_generated_ids_never_replace_existing_ones(tiny_model, embedder, tmp_path):
    bank = GradientBank.build(tiny_model, DOCUMENTS[:2], ids=["1", "2"], embedder_model=embedder, show_progress=False)
    two = bank.gather(["2"])
    added = bank.add(tiny_model, [DOCUMENTS[2], DOCUMENTS[3]], show_progress=False)
    assert set(added).isdisjoint({"1", "2"}) and len(bank) == 4 and len(bank.index) == 4
    assert bank.document("2").text == DOCUMENTS[1]
    assert all(torch.equal(bank.gather(["2"])[n], two[n]) for n in two)
    bank.save_pretrained(tmp_path / "bank")
    loaded = GradientBank.from_pretrained(tmp_path / "bank", embedder_model=embedder)
    assert sorted(loaded.ids) == sorted(["1", "2", *added])
    assert [hit.id for hit in loaded.search(DOCUMENTS[3], k=1)] == [added[1]]


def test_a_version_2_bank_without_checksums_still_loads(tiny_bank, embedder, tmp_path):
    tiny_bank.save_pretrained(tmp_path / "bank")
    path = tmp_path / "bank" / "bank_config.json"
    config = json.loads(path.read_text())
    for key in ("documents_sha256", "index_sha256", "embedder_sha256"):
        del config[key]
    path.write_text(json.dumps({**config, "format_version": 2}))
    loaded = GradientBank.from_pretrained(tmp_path / "bank", embedder_model=embedder)
    assert loaded.ids == IDS and all(
        torch.equal(loaded.gather(IDS)[n], tiny_bank.gather(IDS)[n]) for n in config["parameter_shapes"]
    )
    loaded.save_pretrained(tmp_path / "again")  # written as version 3, with its checksums
    again = json.loads((tmp_path / "again" / "bank_config.json").read_text())
    assert again["format_version"] == 3 and len(again["documents_sha256"]) == len(again["embedder_sha256"]) == 64


def test_threads_saving_and_loading_one_directory_see_one_complete_bank_each_time(tiny_bank, embedder, tmp_path):
    three = GradientBank.from_pretrained(_saved(tiny_bank, tmp_path / "four"), embedder_model=embedder)
    three.remove("quillon")
    banks = [GradientBank.from_pretrained(tmp_path / "four", embedder_model=embedder), three]
    target = tmp_path / "target"
    banks[0].save_pretrained(target)
    (target / "README.md").write_text("notes")
    loads, errors = [], []

    def writer(bank):
        try:
            for _ in range(8):
                bank.save_pretrained(target)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    def reader():
        try:
            for _ in range(16):
                bank = GradientBank.from_pretrained(target, embedder_model=embedder)
                bank.gather(bank.ids)
                loads.append(tuple(bank.ids))
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(bank,)) for bank in banks] + [threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(loads) == 16
    assert set(loads) <= {tuple(IDS), tuple(IDS[:3])}
    assert (target / "README.md").read_text() == "notes"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".target")) == [".target.lock"]


def test_a_reader_waits_for_a_swap_in_flight_and_renames_nothing(tiny_bank, embedder, tmp_path):
    target = _saved(tiny_bank, tmp_path / "bank")
    staging = tmp_path / ".bank.staging-x"
    shutil.copytree(target, staging)
    result = {}
    with open(lock_path(target), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a writer, between its two renames
        backup = tmp_path / ".bank.old-feedbeef"
        journal_path(target).write_text(json.dumps({"backup": backup.name}))
        target.rename(backup)
        reader = threading.Thread(target=lambda: result.update(bank=GradientBank.from_pretrained(target)))
        reader.start()
        time.sleep(0.3)
        assert reader.is_alive() and backup.is_dir() and not target.exists()  # waiting, nothing renamed
        staging.rename(target)
        journal_path(target).unlink()
    reader.join(timeout=30)
    assert result["bank"].ids == IDS and backup.is_dir()  # the reader read the new bank and left the backup


def _saved(bank, directory):
    bank.save_pretrained(directory)
    return directory


def test_a_full_disk_during_a_build_is_a_typed_error_and_publishes_nothing(tiny_model, embedder, tmp_path):
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(
            "regrad_hf.files.save_file",
            lambda *args, **kwargs: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")),
        )
        with pytest.raises(ReGradFileError, match="the disk is full"):
            GradientBank.build(
                tiny_model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False, output_dir=tmp_path / "b"
            )
    assert not (tmp_path / "b").exists()
    bank = GradientBank.build(
        tiny_model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False, output_dir=tmp_path / "b"
    )  # space again: the build resumes and publishes
    assert bank.ids == IDS


def test_a_reader_that_sees_a_swap_finish_reads_the_new_bank(tiny_bank, embedder, tmp_path, monkeypatch):
    # The window that made a threaded reader fail 1 time in ~8: the reader finds the target gone (a writer is between
    # its two renames), and by the time it reads the journal the writer has finished and removed it.
    from regrad_hf.bank import persistence

    target = _saved(tiny_bank, tmp_path / "bank")
    aside = tmp_path / ".bank.old-x"
    target.rename(aside)

    def writer_finishes_meanwhile(path):
        aside.rename(target)
        return None  # the journal is gone

    monkeypatch.setattr(persistence, "interrupted_backup", writer_finishes_meanwhile)
    assert GradientBank.from_pretrained(target, embedder_model=embedder).ids == tiny_bank.ids


def test_membership_of_any_value_is_an_answer_never_an_error(tiny_bank):
    assert "zorbia" in tiny_bank
    assert ["zorbia"] not in tiny_bank and {"a": 1} not in tiny_bank and None not in tiny_bank and 0 not in tiny_bank


def test_injected_takes_one_id_string_as_one_document(tiny_model, tiny_bank):
    tiny_model.attach_bank(tiny_bank)
    with tiny_model.injected("zorbia"):  # one id, not the ids "z", "o", "r", ...
        one = parameter_bytes(tiny_model)
    with tiny_model.injected(["zorbia"]):
        assert parameter_bytes(tiny_model) == one
