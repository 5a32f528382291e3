"""A hostile reviewer's pass over `GradientBank`: a gradient source or an embedder that returns the wrong thing,
metadata edited by the caller after it was handed over, and threads or processes that change one bank (or one
directory) while others read it. Each case asserts a typed error (or a consistent result) and a bank that is as it
was, still saves and loads."""

from __future__ import annotations

import multiprocessing
import random
import threading
import time

import numpy as np
import pytest
import torch

from regrad_hf import GradientBank, ReGradError, ReGradValueError
from regrad_hf.bank import mapped

from ..conftest import DOCUMENTS, IDS, assert_equal_up_to_rounding


def state(bank: GradientBank):
    """What a failed call must leave as it was: ids, texts, metadata, index size and the gradients' bytes."""
    return (
        bank.ids,
        {i: (bank.document(i).text, bank.document(i).metadata) for i in bank.ids},
        len(bank.index),
        {n: t.view(-1).view(torch.uint8).numpy().tobytes() for n, t in bank.gather(bank.ids).items()},
    )


def assert_saves_and_loads(bank, embedder, directory):
    bank.save_pretrained(directory)
    loaded = GradientBank.from_pretrained(directory, embedder_model=embedder)
    assert loaded.ids == bank.ids
    assert all(torch.equal(loaded.gather(bank.ids)[n], t) for n, t in bank.gather(bank.ids).items())
    return loaded


# ----------------------------------------------------------------------------- what a gradient source returns


class Source:
    """A `GradientSource` that passes the model's identity and edits what its `document_gradients` returns."""

    def __init__(self, model, edit):
        self.model, self.edit, self.config = model, edit, model.config

    def learner_identity(self):
        return self.model.learner_identity()

    def lora_parameters(self):
        return self.model.lora_parameters()

    def document_gradients(self, documents):
        return self.edit(self.model.document_gradients(documents))


def first_edited(edit):
    return lambda g: {n: edit(t) if i == 0 else t for i, (n, t) in enumerate(g.items())}


HOSTILE_GRADIENTS = {
    "wrong-shape": (first_edited(lambda t: t[:, :1]), "has shape"),
    "broadcastable-shape": (first_edited(lambda t: t[:, :1].contiguous()), "has shape"),
    "transposed": (first_edited(lambda t: t.transpose(1, 2)), "has shape"),
    "too-many-rows": (lambda g: {n: torch.cat([t, t]) for n, t in g.items()}, "has shape"),
    "too-few-rows": (lambda g: {n: t[:1] for n, t in g.items()}, "has shape"),
    "missing-tensor": (lambda g: dict(list(g.items())[1:]), "missing"),
    "unexpected-tensor": (lambda g: {**g, "extra.weight": next(iter(g.values()))}, "unexpected"),
    "empty": (lambda g: {}, "other tensors"),
    "a-list": (lambda g: list(g.values()), "must return a dict"),
    "numpy": (lambda g: {n: t.numpy() for n, t in g.items()}, "expected a floating-point tensor"),
    "int64": (lambda g: {n: t.long() for n, t in g.items()}, "torch.int64"),
    "complex": (lambda g: {n: t.to(torch.complex64) for n, t in g.items()}, "torch.complex64"),
    "meta-device": (lambda g: {n: t.to("meta") for n, t in g.items()}, "meta device"),
    "nan": (first_edited(lambda t: t.index_fill(0, torch.tensor([1]), float("nan"))), r"\['b'\] contain NaN"),
}


@pytest.mark.parametrize("dtype", ["bfloat16", "int4"])
@pytest.mark.parametrize("case", list(HOSTILE_GRADIENTS))
def test_gradients_that_do_not_fit_the_bank_are_refused_and_change_nothing(tiny_model, embedder, tmp_path, case, dtype):
    edit, match = HOSTILE_GRADIENTS[case]
    bank = GradientBank.build(tiny_model, DOCUMENTS, ids=IDS, embedder_model=embedder, dtype=dtype,
                              show_progress=False)  # fmt: skip
    before = state(bank)
    with pytest.raises(ReGradValueError, match=match):
        bank.add(Source(tiny_model, edit), ["First new text.", "Second new text."], ids=["a", "b"],
                 show_progress=False)  # fmt: skip
    assert state(bank) == before
    assert_saves_and_loads(bank, embedder, tmp_path / "bank")


def test_gradients_that_require_grad_or_are_strided_are_stored_detached(tiny_model, tiny_bank, embedder, tmp_path):
    def edit(g):
        return {n: t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for n, t in g.items()}

    tiny_bank.add(Source(tiny_model, edit), ["First new text."], ids=["a"], show_progress=False)
    reference = tiny_model.document_gradients(["First new text."])
    gathered = tiny_bank.gather(["a"])
    assert all(not t.requires_grad and torch.equal(t, reference[n].to(t.dtype)) for n, t in gathered.items())
    assert_saves_and_loads(tiny_bank, embedder, tmp_path / "bank")


# ----------------------------------------------------------------------------- what an embedder returns


class Embedder:
    """A sentence-transformers stand-in of the right dimension that edits what the real embedder returns."""

    def __init__(self, real, edit):
        self.real, self.edit = real, edit

    def get_embedding_dimension(self):
        return self.real.get_embedding_dimension()

    def encode(self, texts, **kwargs):
        return self.edit(self.real.encode(texts, **kwargs))


HOSTILE_EMBEDDINGS = {
    "nan": (lambda v: np.full_like(v, np.nan), "NaN, infinite or all-zero"),
    "inf-in-one-row": (lambda v: np.concatenate([v[:1], np.full_like(v[1:], np.inf)]), "NaN, infinite or all-zero"),
    "all-zero": (np.zeros_like, "NaN, infinite or all-zero"),
    "one-vector": (lambda v: v[0], "shape"),
    "fewer-rows": (lambda v: v[:1], "shape"),
    "more-rows": (lambda v: np.concatenate([v, v]), "shape"),
    "none": (lambda v: None, "shape"),
    "strings": (lambda v: np.full(v.shape, "x"), "not an array of vectors"),
}


@pytest.mark.parametrize("case", list(HOSTILE_EMBEDDINGS))
def test_embeddings_that_are_not_one_finite_vector_per_text_are_refused(tiny_model, tiny_bank, embedder, case):
    edit, match = HOSTILE_EMBEDDINGS[case]
    hostile = Embedder(embedder, edit)
    with pytest.raises(ReGradValueError, match=match):
        GradientBank.build(tiny_model, DOCUMENTS, ids=IDS, embedder_model=hostile, show_progress=False)
    before = state(tiny_bank)
    tiny_bank.index._embedder = hostile  # the bank's embedder starts misbehaving
    with pytest.raises(ReGradValueError, match=match):
        tiny_bank.add(tiny_model, ["First new text.", "Second new text."], show_progress=False)
    with pytest.raises(ReGradValueError, match=match):
        tiny_bank.search(["capital of Zorbia", "bicycle frame"], k=2)
    assert state(tiny_bank) == before


# ----------------------------------------------------------------------------- metadata


def test_metadata_is_never_shared_with_the_caller(tiny_model, tiny_bank, embedder, tmp_path):
    given = {"tags": ["harbour"], "source": {"pages": [1, 2]}}
    tiny_bank.add(tiny_model, ["Zorbia exports sardines."], ids=["fish"], metadata=[given], show_progress=False)
    given["tags"].append(object())  # the caller's own object, edited after the add
    given["source"]["pages"].append({1, 2})
    tiny_bank.document("fish").metadata["tags"].append(b"bytes")  # a hit's metadata, edited
    tiny_bank.search("sardines", k=1)[0].metadata["source"]["pages"].clear()
    expected = {"tags": ["harbour"], "source": {"pages": [1, 2]}}
    assert tiny_bank.document("fish").metadata == expected
    loaded = assert_saves_and_loads(tiny_bank, embedder, tmp_path / "bank")
    loaded.document("fish").metadata["tags"].clear()
    assert loaded.document("fish").metadata == expected


# ----------------------------------------------------------------------------- a save that fails after publishing


def test_a_save_that_cannot_reopen_its_shards_leaves_the_bank_reading_the_old_ones(tiny_bank, embedder, tmp_path,
                                                                                    monkeypatch):  # fmt: skip
    tiny_bank.save_pretrained(tmp_path / "a", max_shard_bytes=0)  # one document per shard
    bank = GradientBank.from_pretrained(tmp_path / "a", embedder_model=embedder)
    bank.remove("zorbia")  # every later document moves up one shard in the next save
    before = state(bank)
    opened = []

    def fail_on_the_second(*args, **kwargs):
        opened.append(args)
        if len(opened) == 2:
            raise OSError(24, "Too many open files")
        return real(*args, **kwargs)

    real = mapped.MappedShard
    monkeypatch.setattr("regrad_hf.bank.shards.MappedShard", fail_on_the_second)
    with pytest.raises(ReGradError):
        bank.save_pretrained(tmp_path / "b", max_shard_bytes=0)
    monkeypatch.undo()
    assert state(bank) == before  # each document still reads its own gradients
    assert_saves_and_loads(bank, embedder, tmp_path / "c")


# ----------------------------------------------------------------------------- threads on one bank


def run_during(call, seconds=1.0):
    """Starts `call` in another thread and waits for it at most `seconds` (it waits for the bank's lock if the
    calling thread holds it); returns the thread and a list that gets its exception, if any."""
    errors = []

    def target():
        try:
            call()
        except Exception as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(seconds)
    return thread, errors


def test_a_document_added_while_a_save_writes_is_kept(tiny_model, tiny_bank, embedder, tmp_path, monkeypatch):
    from regrad_hf.bank import persistence

    publish, side = persistence.publish, []

    def publish_while_another_thread_adds(staging, target):
        if not side:
            side.append(run_during(lambda: tiny_bank.add(tiny_model, ["Zorbia exports sardines."], ids=["fish"],
                                                         show_progress=False)))  # fmt: skip
        publish(staging, target)

    monkeypatch.setattr(persistence, "publish", publish_while_another_thread_adds)
    tiny_bank.save_pretrained(tmp_path / "bank")
    thread, errors = side[0]
    thread.join()
    assert errors == [] and tiny_bank.ids == [*IDS, "fish"]
    reference = tiny_model.document_gradients(["Zorbia exports sardines."])
    assert all(torch.equal(t[0], reference[n][0].to(t.dtype)) for n, t in tiny_bank.gather(["fish"]).items())
    monkeypatch.undo()
    assert_saves_and_loads(tiny_bank, embedder, tmp_path / "again")


def test_two_threads_adding_with_generated_ids_get_distinct_ids(tiny_model, tiny_bank, embedder, tmp_path):
    side, added = [], []

    def edit(gradients):  # while this thread computes, another adds
        if not side:
            side.append(run_during(lambda: added.append(tiny_bank.add(tiny_model, ["Second new text."],
                                                                      show_progress=False))))  # fmt: skip
            side[0][0].join()
        return gradients

    first = tiny_bank.add(Source(tiny_model, edit), ["First new text."], show_progress=False)
    assert side[0][1] == []
    second = added[0]
    assert first != second and sorted(tiny_bank.ids) == sorted([*IDS, *first, *second])
    assert len(tiny_bank) == len(tiny_bank.index) == 6
    assert tiny_bank.document(first[0]).text == "First new text."
    assert tiny_bank.document(second[0]).text == "Second new text."
    assert_saves_and_loads(tiny_bank, embedder, tmp_path / "bank")


def test_an_id_added_by_another_thread_meanwhile_is_refused_not_replaced(tiny_model, tiny_bank):
    side = []

    def edit(gradients):
        if not side:
            side.append(run_during(lambda: tiny_bank.add(tiny_model, ["Second new text."], ids=["new"],
                                                         show_progress=False)))  # fmt: skip
            side[0][0].join()
        return gradients

    with pytest.raises(ReGradValueError, match="already holds"):
        tiny_bank.add(Source(tiny_model, edit), ["First new text."], ids=["new"], show_progress=False)
    assert tiny_bank.document("new").text == "Second new text." and len(tiny_bank) == len(tiny_bank.index) == 5


def test_a_document_removed_during_a_search_is_not_half_found(tiny_bank):
    search, side = tiny_bank.index.search, []

    def search_while_another_thread_removes(*args, **kwargs):
        found = search(*args, **kwargs)
        side.append(run_during(lambda: tiny_bank.remove([doc_id for doc_id in IDS if doc_id != "velomar"]), 0.3))
        return found

    tiny_bank.index.search = search_while_another_thread_removes
    hits = tiny_bank.search("capital of Zorbia", k=4)
    side[0][0].join()
    assert side[0][1] == [] and sorted(hit.id for hit in hits) == sorted(IDS)
    assert all(hit.text == DOCUMENTS[IDS.index(hit.id)] for hit in hits) and tiny_bank.ids == ["velomar"]


def test_a_save_during_a_gather_does_not_move_the_rows_it_reads(tiny_model, tiny_bank, tmp_path):
    tiny_bank.add(tiny_model, ["Zorbia exports sardines."], ids=["fish"], show_progress=False)
    expected = tiny_bank.gather(["fish", "zorbia"])
    gather, side = tiny_bank.store.gather, []

    def gather_while_another_thread_saves(placed):
        if threading.current_thread() is threading.main_thread() and not side:  # the save gathers too
            side.append(run_during(lambda: tiny_bank.save_pretrained(tmp_path / "bank"), 1.0))
        return gather(placed)

    tiny_bank.store.gather = gather_while_another_thread_saves
    gathered = tiny_bank.gather(["fish", "zorbia"])
    side[0][0].join()
    assert side[0][1] == [] and all(torch.equal(gathered[n], t) for n, t in expected.items())


def test_threads_mixing_search_add_remove_gather_and_save_keep_the_bank_consistent(tiny_model, embedder, tmp_path):
    bank = GradientBank.build(tiny_model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False)
    texts = dict(zip(IDS, DOCUMENTS, strict=True))
    texts.update({f"n{i}": f"Box number {i} holds a marble." for i in range(6)})
    reference = {doc_id: bank.gather([doc_id]) for doc_id in IDS}
    reference.update({f"n{i}": tiny_model.document_gradients([texts[f"n{i}"]]) for i in range(6)})
    stop, errors, done = time.monotonic() + 4.0, [], []

    def worker(kind, seed):
        rng = random.Random(seed)
        while time.monotonic() < stop:
            try:
                if kind == "add":
                    doc_id = rng.choice([f"n{i}" for i in range(6)])
                    bank.add(tiny_model, [texts[doc_id]], ids=[doc_id], show_progress=False)
                elif kind == "remove":  # keeps a few documents, so that searches and gathers have some
                    ids = bank.ids
                    if len(ids) > 3:
                        bank.remove(rng.choice(ids))
                    else:
                        time.sleep(0.01)
                elif kind == "search":
                    for hit in bank.search("a marble in a box", k=min(2, len(bank))):
                        assert hit.text == texts[hit.id]
                elif kind == "gather":
                    ids = bank.ids
                    ids = rng.sample(ids, min(2, len(ids)))
                    for name, rows in bank.gather(ids).items():
                        for row, doc_id in zip(rows, ids, strict=True):
                            assert_equal_up_to_rounding(row, reference[doc_id][name][0].to(row.dtype))
                else:
                    bank.save_pretrained(tmp_path / "bank", max_shard_bytes=0)
                done.append(kind)
            except ReGradError:  # an id another thread added or removed first: typed, and nothing changed
                pass
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(error)

    kinds = ["add", "add", "remove", "search", "gather", "save"]
    threads = [threading.Thread(target=worker, args=(kind, seed)) for seed, kind in enumerate(kinds)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [], errors[:3]
    assert set(done) == set(kinds)
    assert sorted(bank.ids) == sorted(bank.catalogue.ids_by_key.values()) and len(bank.index) == len(bank)
    loaded = assert_saves_and_loads(bank, embedder, tmp_path / "final")
    assert {doc_id: loaded.document(doc_id).text for doc_id in loaded.ids} == {i: texts[i] for i in bank.ids}


# ----------------------------------------------------------------------------- processes on one directory


def _save_repeatedly(source, target, times):
    from regrad_hf import GradientBank
    from regrad_hf.defaults import load_embedder

    bank = GradientBank.from_pretrained(source, embedder_model=load_embedder())
    for _ in range(times):
        bank.save_pretrained(target)


def test_two_processes_saving_into_one_directory_leave_one_complete_bank(tiny_bank, embedder, tmp_path):
    expected = tiny_bank.gather(IDS)
    tiny_bank.save_pretrained(tmp_path / "four")
    tiny_bank.remove("quillon")
    tiny_bank.save_pretrained(tmp_path / "three")
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_save_repeatedly, args=(tmp_path / name, tmp_path / "target", 4))
        for name in ("four", "three")
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [process.exitcode for process in processes] == [0, 0]
    bank = GradientBank.from_pretrained(tmp_path / "target", embedder_model=embedder)
    assert bank.ids in (IDS, IDS[:3])
    assert all(torch.equal(t, expected[n][: len(bank)]) for n, t in bank.gather(bank.ids).items())
    assert sorted(p.name for p in tmp_path.iterdir()) == [".four.lock", ".target.lock", ".three.lock", "four",
                                                          "target", "three"]  # fmt: skip


# ----------------------------------------------------------------------------- paths no filesystem can hold

HOSTILE_PATHS = {
    "save-nul": (lambda c: c.bank.save_pretrained(c.tmp / "a\x00b"), ReGradValueError, "NUL"),
    "build-into-nul": (lambda c: GradientBank.build(c.model, DOCUMENTS, output_dir=str(c.tmp) + "/x\x00",
                                                    embedder_model=c.embedder, show_progress=False),
                       ReGradValueError, "NUL"),
    "load-subfolder-nul": (lambda c: GradientBank.from_pretrained(c.tmp, subfolder="bank\x00"), ReGradValueError,
                           "NUL"),
    "load-name-too-long": (lambda c: GradientBank.from_pretrained(c.tmp / ("n" * 300)), ReGradError,
                           "name too long"),
    "load-subfolder-too-long": (lambda c: GradientBank.from_pretrained(c.tmp, subfolder="s" * 300), ReGradError,
                                "name too long"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE_PATHS))
def test_paths_no_filesystem_can_hold_are_typed_errors(tiny_model, tiny_bank, embedder, tmp_path, case):
    call, error, match = HOSTILE_PATHS[case]
    tiny_bank.save_pretrained(tmp_path / "bank")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    context = type("Context", (), {"bank": tiny_bank, "model": tiny_model, "embedder": embedder, "tmp": tmp_path})
    with pytest.raises(error, match=match):
        call(context)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
