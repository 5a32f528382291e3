"""Gather from memory-mapped shards: one `index_select` per stored tensor and shard, equal to reading row by row."""

import json
import math
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from regrad_hf import GradientBank, ReGradValueError
from regrad_hf.bank.mapped import MappedShard
from regrad_hf.bank.quantization import BANK_DTYPES, QuantizedFormat
from regrad_hf.bank.shards import check_finite

from ..conftest import DOCUMENTS, IDS, make_tiny_model

NEW_DOCUMENTS = ["Ostrava's tram line 9 runs past the old Vítkovice ironworks.", "Pelmets hide curtain rails."]
NEW_IDS = ["tram", "pelmet"]


def per_row_gather(bank: GradientBank, directory, ids):
    """The gather of the previous version, as reference: one `get_slice` per document and stored tensor (memory
    rows for unsaved documents), stacked, then decoded."""
    shards = json.loads((directory / "bank_config.json").read_text())["shards"]
    readers = {}

    def row(doc_id, key):
        if doc_id in bank.store.in_memory:
            return bank.store.in_memory[doc_id][key]
        document = bank.catalogue[doc_id]
        if document.shard not in readers:
            readers[document.shard] = safe_open(directory / shards[document.shard]["file"], framework="pt")
        return readers[document.shard].get_slice(key)[document.row : document.row + 1][0]

    gathered = {}
    for name in bank.parameter_shapes:
        keys = [name + suffix for suffix in bank.format.suffixes]
        gathered[name] = bank.store.decode({key: torch.stack([row(d, key) for d in ids]) for key in keys}, name)
    return gathered


def saved_bank(model, embedder, directory, dtype="bfloat16", per_shard=1):
    """A bank of the four documents saved with `per_shard` documents a shard, loaded back."""
    built = GradientBank.build(model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False, dtype=dtype)
    built.save_pretrained(directory, max_shard_bytes=per_shard * built.bytes_per_document)
    return GradientBank.from_pretrained(directory, embedder_model=embedder)


@pytest.mark.parametrize("dtype", BANK_DTYPES)
def test_gather_over_shards_and_memory_in_any_order_equals_reading_row_by_row(tiny_model, embedder, tmp_path, dtype):
    bank = saved_bank(tiny_model, embedder, tmp_path / "bank", dtype)
    assert len(json.loads((tmp_path / "bank" / "bank_config.json").read_text())["shards"]) == 4
    bank.add(tiny_model, NEW_DOCUMENTS, ids=NEW_IDS, show_progress=False)  # in memory until saved
    # several shards, memory rows between them, out of order, one document twice
    ids = ["pelmet", "quillon", "zorbia", "tram", "quillon", "halvorsen"]
    gathered = bank.gather(ids)
    expected = per_row_gather(bank, tmp_path / "bank", ids)
    for name, tensor in expected.items():
        assert gathered[name].dtype == tensor.dtype and torch.equal(gathered[name], tensor), name
    # one source only (a single shard; memory only): the fast path without reordering
    for ids in (["velomar"], NEW_IDS[::-1]):
        gathered = bank.gather(ids)
        assert all(torch.equal(gathered[n], t) for n, t in per_row_gather(bank, tmp_path / "bank", ids).items())


def test_gathered_tensors_are_fresh_copies(tiny_model, embedder, tmp_path):
    bank = saved_bank(tiny_model, embedder, tmp_path / "bank", per_shard=4)
    first = bank.gather(IDS)
    kept = {name: tensor.clone() for name, tensor in first.items()}
    for tensor in first.values():
        tensor.fill_(7.0)
    assert all(torch.equal(bank.gather(IDS)[n], kept[n]) for n in kept)


def test_a_corrupted_shard_raises_before_any_row_is_returned(tiny_model, embedder, tmp_path):
    directory = tmp_path / "bank"
    saved_bank(tiny_model, embedder, directory)
    second = directory / "gradients" / "shard-00001.safetensors"
    data = bytearray(second.read_bytes())
    data[-3] ^= 0x10  # a gradient value: the header still checks out
    second.write_bytes(bytes(data))
    bank = GradientBank.from_pretrained(directory, embedder_model=embedder)
    assert bank.gather([IDS[0]])  # shard 0 is intact
    with pytest.raises(ReGradValueError, match="shard-00001.safetensors does not match its checksum"):
        bank.gather([IDS[0], IDS[1]])
    with pytest.raises(ReGradValueError, match="does not match its checksum"):  # and every time after
        bank.gather([IDS[1]])


def test_a_shard_replaced_after_the_bank_opened_it_does_not_change_what_the_bank_reads(
    tiny_model, tokenizer, embedder, tmp_path
):
    directory = tmp_path / "bank"
    saved = saved_bank(tiny_model, embedder, directory, per_shard=4)
    expected = saved.gather(IDS)
    bank = GradientBank.from_pretrained(directory, embedder_model=embedder)  # opened, not yet checksummed
    other = make_tiny_model(tokenizer, seed=1)  # same layout, other gradients, written over the same files
    GradientBank.build(other, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False).save_pretrained(
        directory
    )
    replaced = GradientBank.from_pretrained(directory, embedder_model=embedder).gather(IDS)
    gathered = bank.gather(IDS)
    for name, tensor in expected.items():
        assert torch.equal(gathered[name], tensor) and not torch.equal(replaced[name], tensor)


def shard_file(path, header_edit=None, tail=b""):
    """A small safetensors file (two tensors), its JSON header edited by `header_edit`, `tail` bytes appended."""
    save_file({"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(2, 4, dtype=torch.uint8)}, path)
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    if header_edit is not None:
        header_edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :] + tail)
    return path


def test_a_mapped_shard_views_each_tensor_in_place(tmp_path):
    shard = MappedShard(shard_file(tmp_path / "s.safetensors"), follow_symlinks=False)
    assert shard.specs == {"a": ("F32", [2, 3]), "b": ("U8", [2, 4])}
    assert torch.equal(shard.view("a"), torch.arange(6, dtype=torch.float32).view(2, 3))
    assert shard.view("a").data_ptr() == shard.view("a").data_ptr()  # the same bytes, not a copy each time


@pytest.mark.parametrize(
    ("edit", "tail", "message"),
    [
        (lambda h: h["a"].update(data_offsets=[0, 20]), b"", "spans 20 bytes"),
        (lambda h: h["b"].update(data_offsets=[16, 24]), b"", "starts at byte 16 of the data, expected 24"),
        (None, b"\0" * 8, "its tensors take 32 bytes, the file holds 40"),
        (lambda h: h["a"].update(dtype="Q7"), b"", "unknown dtype"),
        (lambda h: h["a"].update(shape=[2, -3]), b"", "malformed shape"),
        (lambda h: h.update(c=[1, 2]), b"", "is not a tensor entry"),
    ],
    ids=["span-disagrees-with-shape", "overlap", "trailing-bytes", "unknown-dtype", "negative-dim", "not-an-entry"],
)
def test_a_malformed_safetensors_header_is_refused(tmp_path, edit, tail, message):
    path = shard_file(tmp_path / "s.safetensors", edit, tail)
    with pytest.raises(ReGradValueError, match=message):
        MappedShard(path, follow_symlinks=False)


def test_the_finiteness_check_names_bad_documents_and_passes_large_finite_values():
    large = {"x": torch.full((3, 4, 4), 3e38), "y": torch.ones(3, 2)}  # their sum overflows; each value is finite
    check_finite(large, ["a", "b", "c"])
    for bad in (float("nan"), float("-inf")):
        tensors = {"x": torch.ones(3, 4, 4, dtype=torch.bfloat16), "y": torch.ones(3, 2)}
        tensors["y"][1, 1] = bad
        with pytest.raises(ReGradValueError, match=r"documents \['b'\] contain NaN or inf"):
            check_finite(tensors, ["a", "b", "c"])


def previous_decode(fmt: QuantizedFormat, parts, shape):
    """The previous version's dequantisation, as reference: codes widened to int64 words and unpacked, converted to
    float, offset, scaled."""
    documents, packed = parts[".scales"].shape[0], parts[".codes"]
    group, groups = fmt._layout(shape)
    byte_shifts = torch.arange(fmt.bytes_per_word, dtype=torch.int64) * 8
    words = (packed.view(documents, -1, fmt.bytes_per_word).to(torch.int64) << byte_shifts).sum(dim=-1)
    shifts = torch.arange(fmt.values_per_word, dtype=torch.int64) * fmt.bits
    codes = ((words.unsqueeze(-1) >> shifts) & (2**fmt.bits - 1)).view(documents, -1)
    values = codes.float().sub_(2 ** (fmt.bits - 1)).view(documents, groups, group)
    values.mul_(parts[".scales"].float().unsqueeze(-1))
    return values.view(documents, -1)[:, : math.prod(shape)].reshape(documents, *shape)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(16, 96), (5, 77)])
def test_dequantisation_equals_the_previous_one_bit_for_bit(bits, shape):
    fmt = QuantizedFormat(f"int{bits}", bits, None if bits == 8 else 8 * 8 // math.gcd(bits, 8))
    values = torch.randn(3, *shape, generator=torch.Generator().manual_seed(bits)) * 1e-3
    values[0, 0, :3] = torch.tensor([1e30, -1e-30, 0.0])  # large, tiny and zero values, scales across the range
    encoded = fmt.encode(values)
    decoded = fmt.decode(encoded, shape)
    assert decoded.dtype == torch.float32 and torch.equal(decoded, previous_decode(fmt, encoded, shape))
