"""The bad-input matrix (issue 7): each bad document, argument or damaged bank file raises the expected typed error
and leaves the bank, the model and the saved bank files exactly as they were."""

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from regrad_hf import BankMismatchError, GradientBank, ReGradError, ReGradKeyError, ReGradValueError
from regrad_hf.errors import ReGradTypeError

from ..conftest import DOCUMENTS, IDS, make_tiny_model, parameter_bytes

SHARD = Path("gradients") / "shard-00000.safetensors"


@dataclass
class Context:
    bank: GradientBank
    model: object
    directory: Path  # a private copy of the saved bank, free to damage
    tokenizer: object
    embedder: object

    def load(self):
        return GradientBank.from_pretrained(self.directory, embedder_model=self.embedder)

    def edit_config(self, edit):
        path = self.directory / "bank_config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
        return self.load()

    def edit_documents(self, edit):
        path = self.directory / "documents.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        edit(records)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return self.fix_checksum("documents.jsonl")

    def fix_checksum(self, name):
        """Records the file's new checksum, so that the check behind the checksum has to catch the damage."""
        key = {"documents.jsonl": "documents_sha256", "index.usearch": "index_sha256"}[name]
        digest = hashlib.sha256((self.directory / name).read_bytes()).hexdigest()
        return self.edit_config(lambda c: c.update({key: digest}))

    def edit_shard(self, edit, fix_checksum=True):
        path = self.directory / SHARD
        tensors = load_file(str(path))
        save_file(edit(tensors, next(iter(tensors))), str(path))
        if fix_checksum:  # so that the shape or dtype check, not the checksum, has to catch it
            return self.edit_config(
                lambda c: c["shards"][0].update(sha256=hashlib.sha256(path.read_bytes()).hexdigest())
            )
        return self.load()

    def rewrite_bytes(self, relative, edit, fix_checksum=False):
        path = self.directory / relative
        path.write_bytes(edit(bytearray(path.read_bytes())))
        return self.fix_checksum(relative) if fix_checksum else self.load()


def flip(offset):
    def edit(data):
        data[offset] ^= 0x01
        return bytes(data)

    return edit


def poisoned(value):
    def call(c):
        compute = c.model.document_gradients

        def gradients(documents):
            stacked = compute(documents)
            next(iter(stacked.values()))[0].view(-1)[0] = value
            return stacked

        c.model.document_gradients = gradients
        try:
            c.bank.add(c.model, ["A new fact about cheese."], ids=["new"], show_progress=False)
        finally:
            del c.model.document_gradients

    return call


def add(documents, **kwargs):
    return lambda c: c.bank.add(c.model, documents, **{"show_progress": False, **kwargs})


def entered(block):
    """Enters (and leaves) the block that `block(c)` returns: the error must come before anything is applied."""

    def call(c):
        with block(c):
            pass

    return call


def with_bank(call):
    """Runs `call` with the bank attached, then detaches it again (the model is compared with its state before)."""

    def run(c):
        c.model.attach_bank(c.bank)
        try:
            return call(c)
        finally:
            c.model.detach_bank()

    return run


def generate(**kwargs):
    def call(c):
        inputs = c.tokenizer("What is the capital of Zorbia?", return_tensors="pt")
        return c.model.generate(**inputs, max_new_tokens=2, do_sample=False, **kwargs)

    return with_bank(call)


CASES = [
    # documents
    pytest.param(add([]), ReGradValueError, "empty", id="no-documents"),
    pytest.param(add(["   \n\t"]), ReGradValueError, "empty", id="whitespace-document"),
    pytest.param(add(["broken \udcff text"]), ReGradValueError, "not valid Unicode", id="non-utf8-document"),
    pytest.param(add([b"bytes"]), ReGradValueError, "not a string", id="bytes-document"),
    pytest.param(add(["x" * (16 << 20 | 1)]), ReGradValueError, "longer than", id="oversized-document"),
    pytest.param(add(["a b c", "d e f"], ids=["x", "x"]), ReGradValueError, "duplicate", id="duplicate-ids"),
    pytest.param(add(["a b c"], ids=["zorbia"]), ReGradValueError, "already holds", id="existing-id"),
    pytest.param(add(["a b c"], ids=["x", "y"]), ReGradValueError, "2 ids for 1", id="id-count"),
    pytest.param(add(["a b c"], ids=[""]), ReGradValueError, "non-empty strings", id="empty-id"),
    pytest.param(add(["a b c"], ids=["i" * 2000]), ReGradValueError, "at most 1024", id="oversized-id"),
    pytest.param(add(["a b c"], metadata=[{"f": object()}]), ReGradValueError, "JSON", id="metadata-not-json"),
    pytest.param(add(["a b c"], metadata=[{"f": "v" * (1 << 20)}]), ReGradValueError, "limit", id="oversized-metadata"),
    pytest.param(add(["a b c"], metadata=["text"]), ReGradValueError, "mapping", id="metadata-not-a-mapping"),
    pytest.param(add(["a b c"], batch_size=0), ReGradValueError, "batch_size", id="batch-size-0"),
    pytest.param(poisoned(float("nan")), ReGradValueError, "NaN or inf", id="nan-gradient"),
    pytest.param(poisoned(float("-inf")), ReGradValueError, "NaN or inf", id="inf-gradient"),
    # ids, k, queries
    pytest.param(lambda c: c.bank.gather(["zorbia", "nope"]), ReGradKeyError, "nope", id="gather-missing-id"),
    pytest.param(lambda c: c.bank.gather([]), ReGradValueError, "at least one", id="gather-nothing"),
    pytest.param(lambda c: c.bank.remove(["velomar", "nope"]), ReGradKeyError, "nope", id="remove-missing-id"),
    pytest.param(lambda c: c.bank.search("a query", k=0), ReGradValueError, "positive integer", id="k-0"),
    pytest.param(lambda c: c.bank.search("a query", k=-1), ReGradValueError, "positive integer", id="k-negative"),
    pytest.param(lambda c: c.bank.search("a query", k=5), ReGradValueError, "larger than the bank", id="k-too-big"),
    pytest.param(lambda c: c.bank.search("  ", k=1), ReGradValueError, "non-empty query", id="blank-query"),
    pytest.param(lambda c: c.model.knowledge([]).__enter__(), ReGradValueError, "empty", id="knowledge-nothing"),
    # arguments of the model's injection blocks and generate: typed errors, nothing applied
    pytest.param(entered(lambda c: c.model.knowledge(None)), ReGradTypeError, "documents must be a list",
                 id="knowledge-none"),
    pytest.param(entered(lambda c: c.model.knowledge(5)), ReGradTypeError, "documents must be a list",
                 id="knowledge-int"),
    pytest.param(entered(lambda c: c.model.knowledge(d for d in DOCUMENTS)), ReGradTypeError,
                 "documents must be a list", id="knowledge-generator"),
    pytest.param(entered(lambda c: c.model.knowledge(DOCUMENTS[:1], use_bank="no")), ReGradTypeError,
                 "use_bank must be True or False", id="knowledge-use-bank-a-string"),
    pytest.param(entered(lambda c: c.model.knowledge(DOCUMENTS[:1], gamma=10**400)), ReGradValueError,
                 "gamma must be a finite number", id="knowledge-gamma-too-large-for-a-float"),
    pytest.param(entered(lambda c: c.model.knowledge(DOCUMENTS[:1], gamma=1e300)), ReGradValueError,
                 "step .* is not finite", id="knowledge-gamma-overflowing-the-step"),
    pytest.param(with_bank(entered(lambda c: c.model.retrieved(["capital of Zorbia"]))), ReGradTypeError,
                 "one query string", id="retrieved-a-list"),
    pytest.param(with_bank(entered(lambda c: c.model.retrieved("bad \udcff"))), ReGradValueError,
                 "not valid Unicode", id="retrieved-lone-surrogate"),
    pytest.param(with_bank(entered(lambda c: c.model.injected(None))), ReGradTypeError, "got NoneType",
                 id="injected-none"),
    pytest.param(with_bank(entered(lambda c: c.model.injected(5))), ReGradTypeError, "got int", id="injected-int"),
    pytest.param(with_bank(entered(lambda c: c.model.injected(["zorbia"], gamma=1e300))), ReGradValueError,
                 "step .* is not finite", id="injected-gamma-overflowing-the-step"),
    pytest.param(lambda c: c.model.attach_bank("bank"), ReGradTypeError, "takes a GradientBank", id="attach-str"),
    pytest.param(lambda c: c.model.attach_bank(None), ReGradTypeError, "takes a GradientBank", id="attach-none"),
    pytest.param(generate(query=5), ReGradTypeError, "query must be a string", id="generate-query-int"),
    pytest.param(generate(query=b"capital"), ReGradTypeError, "query must be a string", id="generate-query-bytes"),
    pytest.param(generate(query="\udcff"), ReGradValueError, "not valid Unicode", id="generate-query-surrogate"),
    pytest.param(generate(use_bank="no"), ReGradTypeError, "use_bank must be", id="generate-use-bank-a-string"),
    pytest.param(generate(gamma=1e300), ReGradValueError, "step .* is not finite", id="generate-gamma-overflow"),
    # learners
    pytest.param(
        lambda c: make_tiny_model(c.tokenizer, seed=1).attach_bank(c.bank),
        BankMismatchError,
        "differ in base_weights .*, lora_values",
        id="wrong-fingerprint-attach",
    ),
    pytest.param(
        lambda c: c.bank.add(make_tiny_model(c.tokenizer, seed=1), ["Some text."], show_progress=False),
        BankMismatchError,
        "built by learner",
        id="wrong-fingerprint-add",
    ),
    pytest.param(
        lambda c: GradientBank.build(c.model, DOCUMENTS[:1], embedder_model=c.embedder, dtype="fp8"),
        ReGradValueError,
        "bank dtype must be one of",
        id="unknown-dtype",
    ),
    # damaged or hostile files
    pytest.param(lambda c: c.rewrite_bytes(SHARD, lambda d: bytes(d[: len(d) // 2])), ReGradValueError,
                 "shard-00000.safetensors is not a readable safetensors file", id="truncated-shard"),
    pytest.param(lambda c: c.rewrite_bytes(SHARD, lambda d: bytes(d[:5])), ReGradValueError, "truncated",
                 id="shard-shorter-than-its-header-length"),
    pytest.param(lambda c: c.rewrite_bytes(SHARD, flip(12)), ReGradValueError, "shard-00000.safetensors",
                 id="bit-flipped-shard-header"),
    pytest.param(lambda c: c.rewrite_bytes(SHARD, flip(-3)).gather(IDS), ReGradValueError,
                 "does not match its checksum", id="bit-flipped-shard-data"),
    pytest.param(lambda c: c.rewrite_bytes(SHARD, lambda d: (1 << 40).to_bytes(8, "little") + bytes(d[8:])),
                 ReGradValueError, "header of 1099511627776 bytes, more than the limit", id="oversized-header"),
    pytest.param(lambda c: c.edit_shard(lambda t, n: {**t, n: t[n].float()}), ReGradValueError, "is F32",
                 id="wrong-dtype-in-shard"),
    pytest.param(lambda c: c.edit_shard(lambda t, n: {**t, n: t[n][:, :1].contiguous()}), ReGradValueError,
                 "expected BF16", id="wrong-shape-in-shard"),
    pytest.param(lambda c: c.edit_shard(lambda t, n: {k: v for k, v in t.items() if k != n}), ReGradValueError,
                 "other tensors", id="missing-tensor-in-shard"),
    pytest.param(lambda c: c.edit_shard(lambda t, n: {k: v[:2].contiguous() for k, v in t.items()}),
                 ReGradValueError, "has 2 rows", id="missing-rows-in-shard"),
    pytest.param(lambda c: (c.directory / SHARD).unlink() or c.load(), ReGradValueError, "is missing",
                 id="missing-shard"),
    pytest.param(lambda c: (c.directory / "documents.jsonl").unlink() or c.load(), ReGradValueError,
                 "documents.jsonl is missing", id="missing-documents"),
    pytest.param(lambda c: (c.directory / "index.usearch").unlink() or c.load(), ReGradValueError,
                 "index.usearch is missing", id="missing-index"),
    pytest.param(lambda c: (c.directory / "bank_config.json").unlink() or c.load(), ReGradValueError,
                 "bank_config.json is missing", id="missing-config"),
    pytest.param(lambda c: c.rewrite_bytes("bank_config.json", lambda d: b"[1, 2]"), ReGradValueError,
                 "must hold a JSON object", id="config-not-an-object"),
    pytest.param(lambda c: c.rewrite_bytes("bank_config.json", lambda d: bytes(d[:-9])), ReGradValueError,
                 "not valid JSON", id="truncated-config"),
    pytest.param(lambda c: c.edit_config(lambda k: k.update(format_version=99)), ReGradValueError,
                 "field 'format_version' is 99; this regrad-hf reads versions", id="future-format-version"),
    pytest.param(lambda c: c.edit_config(lambda k: k.update(num_documents=5)), ReGradValueError,
                 "field 'num_documents' is 5, but the shards hold 4", id="edited-document-count"),
    pytest.param(lambda c: c.edit_config(lambda k: k["learner"].update(lora_values="0" * 64)), ReGradValueError,
                 "does not match the learner field", id="edited-learner"),
    pytest.param(lambda c: c.edit_config(lambda k: k.update(dtype="int9")), ReGradValueError,
                 "field 'dtype' must be one of", id="edited-dtype"),
    pytest.param(lambda c: c.edit_config(lambda k: k.update(dtype="float32")), ReGradValueError, "is BF16",
                 id="config-dtype-disagrees-with-shard"),
    pytest.param(lambda c: c.edit_config(lambda k: k.update(embedding_dim="384")), ReGradValueError,
                 "field 'embedding_dim' must be an integer", id="embedding-dim-not-an-integer"),
    pytest.param(lambda c: c.edit_config(lambda k: k["shards"][0].update(file="../../../etc/passwd")),
                 ReGradValueError, r"field 'shards\[0\].file' must match", id="shard-path-traversal"),
    pytest.param(lambda c: c.edit_config(lambda k: k["shards"][0].update(sha256="abc")), ReGradValueError,
                 r"'shards\[0\].sha256' must match", id="malformed-checksum"),
    pytest.param(lambda c: c.edit_config(
                     lambda k: k["parameter_shapes"].update({next(iter(k["parameter_shapes"])): [1 << 20, 1 << 20]})),
                 ReGradValueError, "at most 268435456 elements", id="absurd-shape"),
    pytest.param(lambda c: c.edit_config(lambda k: k.update(quantization={"bits": 4})), ReGradValueError,
                 "field 'quantization' must be null", id="quantization-on-a-float-bank"),
    pytest.param(lambda c: c.edit_documents(lambda r: r[1].update(id="zorbia")), ReGradValueError,
                 "field 'id' repeats an earlier document", id="duplicate-id-in-file"),
    pytest.param(lambda c: c.edit_documents(lambda r: r[1].update(row=7)), ReGradValueError,
                 "field 'row' must be an integer from 0 to 3", id="row-out-of-range"),
    pytest.param(lambda c: c.edit_documents(lambda r: r[0].update(extra=1)), ReGradValueError,
                 "field 'extra' is unknown", id="unknown-document-field"),
    pytest.param(lambda c: c.edit_documents(lambda r: r[0].update(metadata={"x": "y" * (1 << 20)})),
                 ReGradValueError, "metadata of .* bytes is larger than the limit", id="oversized-metadata-in-file"),
    pytest.param(lambda c: c.edit_documents(lambda r: r[0].update(text="\udcff")), ReGradValueError,
                 "not valid Unicode", id="non-utf8-text-in-file"),
    pytest.param(lambda c: c.edit_documents(lambda r: r.pop()), ReGradValueError, "holds 3 documents",
                 id="missing-document-in-file"),
    pytest.param(lambda c: c.rewrite_bytes("index.usearch", lambda d: b"garbage", fix_checksum=True),
                 ReGradValueError, "not a readable usearch index", id="garbage-index"),
]  # fmt: skip


@pytest.fixture(scope="module")
def saved(tokenizer, embedder, tmp_path_factory):
    """A model, its bank and the bank saved once; every case checks that none of them changes."""
    model = make_tiny_model(tokenizer)
    bank = GradientBank.build(model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False)
    directory = tmp_path_factory.mktemp("saved")
    bank.save_pretrained(directory)
    return model, bank, directory


def state_of(bank, model):
    gathered = bank.gather(bank.ids)
    hits = [(hit.id, round(hit.score, 6)) for hit in bank.search("capital of Zorbia", k=2)]
    documents = [(i, bank.document(i).text, bank.document(i).metadata) for i in bank.ids]
    tensors = {name: tensor.reshape(-1).view(torch.uint8).numpy().tobytes() for name, tensor in gathered.items()}
    return documents, hits, tensors, parameter_bytes(model), model.bank


def files_of(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("call", "error", "match"), CASES)
def test_bad_input_raises_a_typed_error_and_changes_nothing(saved, tokenizer, embedder, tmp_path, call, error, match):
    model, bank, original = saved
    directory = tmp_path / "bank"
    shutil.copytree(original, directory)
    context = Context(bank, model, directory, tokenizer, embedder)
    before, saved_files = state_of(bank, model), files_of(original)
    with pytest.raises(error, match=match) as raised:
        call(context)
    assert isinstance(raised.value, ReGradError)
    assert state_of(bank, model) == before
    assert files_of(original) == saved_files


def test_the_matrix_has_at_least_thirty_cases():
    assert len(CASES) >= 30
