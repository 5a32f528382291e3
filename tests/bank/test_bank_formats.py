"""Compact bank formats: quantisation error bounds, gather from quantised shards, exact codes on disk, sizes."""

import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from regrad_hf import GradientBank, ReGradConfig, ReGradValueError
from regrad_hf.bank.quantization import QUANTIZED_FORMATS, QuantizedFormat, gradient_format

from ..conftest import DOCUMENTS, IDS

QUANTIZED = list(QUANTIZED_FORMATS)


def heavy_tailed(*shape, seed=0):
    """Gradient-like values: mostly small, some large (Student t with 3 degrees of freedom), scaled like gradients."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(*shape, generator=generator)
    chi = torch.randn(3, *shape, generator=generator).pow(2).sum(0)
    return 1e-3 * normal / (chi / 3).sqrt()


def group_scales(fmt: QuantizedFormat, encoded, shape):
    """Each value's scale, broadcast to the tensor's shape (for the half-step bound)."""
    group, groups = fmt._layout(shape)
    scales = encoded[".scales"].float().repeat_interleave(group, dim=1)[:, : math.prod(shape)]
    return scales.reshape(-1, *shape)


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("shape", [(16, 96), (96, 16), (5, 77)])  # LoRA A, LoRA B, sizes that need padding
def test_every_value_is_within_half_a_step_of_its_group_scale(name, shape):
    fmt = gradient_format(name)
    values = heavy_tailed(3, *shape)
    values[1, 0] = 0.0  # a zero row stays zero
    encoded = fmt.encode(values)
    decoded = fmt.decode(encoded, shape)
    assert decoded.shape == values.shape and decoded.dtype == torch.float32
    half_step = group_scales(fmt, encoded, shape) / 2
    assert torch.all((decoded - values).abs() <= half_step * (1 + 1e-6))
    assert torch.all(decoded[1, 0] == 0)
    # the scale is max|x| / levels, rounded up to bf16 by less than one bf16 step
    amax = values.abs().amax()
    assert encoded[".scales"].float().max() >= amax / fmt.levels
    assert encoded[".scales"].float().max() <= amax / fmt.levels * (1 + 2**-7)


def test_int8_relative_error_is_below_one_percent():
    fmt = gradient_format("int8")
    values = 1e-3 * torch.randn(4, 16, 576, generator=torch.Generator().manual_seed(0))
    decoded = fmt.decode(fmt.encode(values), (16, 576))
    # per-row scales: each row's error is at most half a step of max|row| / 127
    row_max = values.abs().amax(dim=-1, keepdim=True)
    assert torch.all((decoded - values).abs() <= row_max / 127 / 2 * (1 + 2**-7))
    assert ((decoded - values).norm() / values.norm()).item() < 0.01


@pytest.mark.parametrize("bits", range(2, 9))
def test_packing_round_trips_every_code(bits):
    fmt = QuantizedFormat("custom", bits, 64)
    codes = torch.randint(0, 2**bits, (3, 64 * 5), generator=torch.Generator().manual_seed(bits))
    packed = fmt._pack(codes)
    assert packed.dtype == torch.uint8 and packed.shape[1] == 64 * 5 * bits // 8
    assert torch.equal(fmt._unpack(packed).long(), codes)


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [("float32", 0.0), ("bfloat16", 0.01), ("int8", 0.02), ("int4", 0.2), ("int3", 0.35), ("int2", 0.9)],
)
def test_gather_of_quantised_rows_is_close_to_the_float32_rows(tiny_model, embedder, tmp_path, dtype, tolerance):
    bank = GradientBank.build(tiny_model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False, dtype=dtype)
    exact = tiny_model.document_gradients(DOCUMENTS)
    for loaded in (bank, _saved_and_loaded(bank, tmp_path)):
        gathered = loaded.gather(IDS)
        for name, tensor in gathered.items():
            assert tensor.shape == exact[name].shape
            error = (tensor.float() - exact[name]).norm() / exact[name].norm()
            assert error.item() <= tolerance, (dtype, name, error.item())
    assert bank.dtype == dtype


@pytest.mark.parametrize("dtype", QUANTIZED)
def test_saved_codes_are_bit_identical_to_the_encoded_gradients(tiny_model, embedder, tmp_path, dtype):
    bank = GradientBank.build(tiny_model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False, dtype=dtype)
    before = bank.gather(IDS)
    bank.save_pretrained(tmp_path)
    stored = load_file(str(tmp_path / "gradients" / "shard-00000.safetensors"))
    fmt = gradient_format(dtype)
    for name, gradients in tiny_model.document_gradients(DOCUMENTS).items():
        for suffix, tensor in fmt.encode(gradients).items():
            assert stored[name + suffix].dtype == tensor.dtype
            assert torch.equal(stored[name + suffix], tensor)
    config = json.loads((tmp_path / "bank_config.json").read_text())
    assert config["format_version"] == 3 and config["dtype"] == dtype
    assert config["quantization"] == {
        "method": "absmax",
        "bits": fmt.bits,
        "group_size": fmt.group_size,
        "scale_dtype": "bfloat16",
    }
    reloaded = GradientBank.from_pretrained(tmp_path, embedder_model=embedder)
    assert all(torch.equal(reloaded.gather(IDS)[name], before[name]) for name in before)
    assert all(torch.equal(bank.gather(IDS)[name], before[name]) for name in before)  # now read from the shard


def test_bytes_on_disk_per_document_follow_the_format(tiny_model, embedder, tmp_path):
    gradients = tiny_model.document_gradients(DOCUMENTS)
    values = sum(tensor[0].numel() for tensor in gradients.values())
    expected_bytes_per_value = {
        "float32": 4,
        "bfloat16": 2,
        "float16": 2,
        "int4": 0.5 + 2 / 64,  # the tiny model's tensors hold multiples of 64 values: no padding
        "int3": 3 / 8 + 2 / 32,
        "int2": 2 / 8 + 2 / 32,
    }
    for dtype, per_value in expected_bytes_per_value.items():
        bank = GradientBank.build(
            tiny_model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False, dtype=dtype
        )
        assert bank.bytes_per_document == values * per_value
        bank.save_pretrained(tmp_path / dtype)
        shard = tmp_path / dtype / "gradients" / "shard-00000.safetensors"
        header = 8 + int.from_bytes(shard.read_bytes()[:8], "little")
        assert shard.stat().st_size - header == len(DOCUMENTS) * bank.bytes_per_document
    # int8: one byte per value plus one bf16 scale per matrix row
    int8 = GradientBank.build(tiny_model, DOCUMENTS[:1], embedder_model=embedder, show_progress=False, dtype="int8")
    rows = sum(math.prod(shape[:-1]) for shape in int8.parameter_shapes.values())
    assert int8.bytes_per_document == values + 2 * rows


def test_non_finite_gradients_are_refused_in_every_format(tiny_model, embedder, monkeypatch):
    compute = tiny_model.document_gradients

    def poisoned(documents):
        stacked = compute(documents)
        next(iter(stacked.values()))[0].view(-1)[5] = float("inf")
        return stacked

    monkeypatch.setattr(tiny_model, "document_gradients", poisoned)
    for dtype in QUANTIZED:
        with pytest.raises(ReGradValueError, match="contain NaN or inf"):
            GradientBank.build(tiny_model, DOCUMENTS[:1], embedder_model=embedder, show_progress=False, dtype=dtype)


def test_a_non_finite_stored_scale_is_refused_on_gather(tiny_model, embedder, tmp_path):
    bank = GradientBank.build(
        tiny_model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False, dtype="int4"
    )
    bank.save_pretrained(tmp_path)
    shard = tmp_path / "gradients" / "shard-00000.safetensors"
    tensors = load_file(str(shard))
    name = next(key for key in tensors if key.endswith(".scales"))
    tensors[name][2, 0] = float("nan")  # row 2 = "velomar"
    save_file(tensors, str(shard))
    config = json.loads((tmp_path / "bank_config.json").read_text())
    config["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()  # as a buggy writer would
    (tmp_path / "bank_config.json").write_text(json.dumps(config))
    loaded = GradientBank.from_pretrained(tmp_path, embedder_model=embedder)
    loaded.gather(["zorbia"])
    with pytest.raises(ReGradValueError, match=r"\['velomar'\] contain NaN or inf"):
        loaded.gather(["velomar"])


def test_a_version_1_bank_still_loads(tiny_bank, tmp_path, embedder):
    tiny_bank.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "bank_config.json").read_text())
    del config["quantization"]
    config["format_version"] = 1
    (tmp_path / "bank_config.json").write_text(json.dumps(config))
    loaded = GradientBank.from_pretrained(tmp_path, embedder_model=embedder)
    assert all(torch.equal(loaded.gather(IDS)[n], tiny_bank.gather(IDS)[n]) for n in tiny_bank.parameter_shapes)
    config["dtype"] = "int4"  # version 1 had no quantised formats
    (tmp_path / "bank_config.json").write_text(json.dumps(config))
    with pytest.raises(
        ReGradValueError, match=r"bank_config.json: field 'dtype' must be one of .* in format version 1"
    ):
        GradientBank.from_pretrained(tmp_path, embedder_model=embedder)


def test_the_format_is_chosen_by_the_config_or_per_build(tokenizer, tiny_model, embedder):
    from ..conftest import make_tiny_model

    model = make_tiny_model(tokenizer, bank_dtype="int4")
    assert GradientBank.build(model, DOCUMENTS[:1], embedder_model=embedder, show_progress=False).dtype == "int4"
    bank = GradientBank.build(model, DOCUMENTS[:1], embedder_model=embedder, show_progress=False, dtype="int8")
    assert bank.dtype == "int8" and bank.format.bits == 8
    with pytest.raises(ReGradValueError, match=r"bank_dtype must be one of \['bfloat16', .*'int2'\], got 'int5'"):
        ReGradConfig(bank_dtype="int5")
    with pytest.raises(ReGradValueError, match=r"bank dtype must be one of .* got 'fp8'"):
        GradientBank.build(tiny_model, DOCUMENTS[:1], embedder_model=embedder, show_progress=False, dtype="fp8")
    assert ReGradConfig.from_dict(ReGradConfig(bank_dtype="int3").to_dict()).bank_dtype == "int3"


def _saved_and_loaded(bank, tmp_path):
    bank.save_pretrained(tmp_path / bank.dtype)
    return GradientBank.from_pretrained(tmp_path / bank.dtype, embedder_model=bank.embedder)


def test_the_config_names_every_format_the_bank_implements():
    """`ReGradConfig.bank_dtype` is checked against `regrad_hf.config.BANK_DTYPES` (the config cannot import the bank,
    a higher floor): the names are the bank's formats, floats first."""
    from regrad_hf.bank.quantization import FLOAT_DTYPES, QUANTIZED_FORMATS
    from regrad_hf.config import BANK_DTYPES

    assert (*FLOAT_DTYPES, *QUANTIZED_FORMATS) == BANK_DTYPES
