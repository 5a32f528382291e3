import pytest
import torch
from transformers import AutoTokenizer, pipeline

from regrad_hf import GradientBank, ReGradError, ReGradForCausalLM, ReGradValueError
from regrad_hf.errors import ReGradTypeError
from regrad_hf.files import FILE_MODE

from ..conftest import DOCUMENTS, IDS, make_tiny_base, make_tiny_model, parameter_bytes

GREEDY = {"max_new_tokens": 6, "do_sample": False}
# A model built here without tests/conftest.py's helper is served as a learner (tests/modeling/test_served.py): these
# settings make its generate the base model's (no stop string, the prompt as given).
AS_THE_BASE = {"stop_strings": None, "apply_learner_prompt": False}


def chat(tokenizer, *turns, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for index, turn in enumerate(turns):
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": turn})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)


def base_parameters(model):
    lora = set(model.lora_parameters())
    return {n: p for n, p in model.language_model.named_parameters() if n not in lora}


@pytest.mark.parametrize("raise_inside", [False, True])
def test_contexts_restore_bit_for_bit_and_never_write_base_weights(tiny_model, tiny_bank, raise_inside):
    tiny_model.attach_bank(tiny_bank)
    before = parameter_bytes(tiny_model)
    versions = {n: p._version for n, p in base_parameters(tiny_model).items()}
    for context in (tiny_model.knowledge(DOCUMENTS[:2]), tiny_model.retrieved("capital of Zorbia")):
        if raise_inside:
            with pytest.raises(KeyboardInterrupt), context:
                raise KeyboardInterrupt
        else:
            with context:
                assert parameter_bytes(tiny_model) != before
        assert parameter_bytes(tiny_model) == before
    assert {n: p._version for n, p in base_parameters(tiny_model).items()} == versions


def test_retrieved_yields_hits_and_nests(tiny_model, tiny_bank):
    tiny_model.attach_bank(tiny_bank)
    before = parameter_bytes(tiny_model)
    with tiny_model.retrieved("Which mineral did Halvorsen discover?", top_k=2) as hits:
        assert [hit.id for hit in hits][0] == "halvorsen" and len(hits) == 2
        inside = parameter_bytes(tiny_model)
        with tiny_model.knowledge([DOCUMENTS[3]]):
            pass
        assert parameter_bytes(tiny_model) == inside
    assert parameter_bytes(tiny_model) == before


def test_generate_with_bank_equals_generate_inside_retrieved(tiny_model, tiny_bank, tokenizer):
    tiny_model.attach_bank(tiny_bank)
    inputs = tokenizer("What is the capital of Zorbia?", return_tensors="pt")
    with_bank = tiny_model.generate(**inputs, **GREEDY)
    with tiny_model.retrieved("What is the capital of Zorbia?"):
        expected = tiny_model.language_model.generate(**inputs, **GREEDY)
    assert torch.equal(with_bank, expected)
    plain = tiny_model.generate(**inputs, **GREEDY, use_bank=False)
    assert not torch.equal(with_bank, plain)  # the step changed something, or the test proves nothing


def test_use_bank_false_equals_the_plain_model(tokenizer, tiny_bank, tiny_model):
    # A fresh learner (peft init: B = 0) with use_bank=False generates exactly what the unwrapped base generates.
    unwrapped = make_tiny_base(tokenizer)
    inputs = tokenizer("Tell me about swans.", return_tensors="pt")
    expected = unwrapped.generate(**inputs, **GREEDY)
    fresh = ReGradForCausalLM.from_base(make_tiny_base(tokenizer), tiny_model.config, tokenizer=tokenizer)
    fresh.attach_bank(tiny_bank, force=True)
    assert torch.equal(fresh.generate(**inputs, **GREEDY, **AS_THE_BASE, use_bank=False), expected)
    tiny_model.attach_bank(tiny_bank)
    assert torch.equal(
        tiny_model.generate(**inputs, **GREEDY, use_bank=False), tiny_model.language_model.generate(**inputs, **GREEDY)
    )


def test_extra_kwargs_never_reach_the_base_generate(tiny_model, tiny_bank, tokenizer, monkeypatch):
    tiny_model.attach_bank(tiny_bank)
    seen = []
    original = tiny_model.language_model.generate

    def spy(*args, **kwargs):
        seen.append(set(kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny_model.language_model, "generate", spy)
    inputs = tokenizer("capital of Zorbia", return_tensors="pt")
    tiny_model.generate(**inputs, **GREEDY, query="Zorbia", top_k_docs=2, gamma=0.5)
    tiny_model.generate(**inputs, **GREEDY, use_bank=False)
    assert seen and all(not {"query", "top_k_docs", "gamma", "use_bank"} & keys for keys in seen)


def test_query_is_the_last_user_turn_of_a_chat(tiny_model, tiny_bank, tokenizer, monkeypatch):
    tiny_model.attach_bank(tiny_bank)
    queries = []
    search = tiny_bank.search
    monkeypatch.setattr(tiny_bank, "search", lambda query, k: queries.append(query) or search(query, k))
    system = "You are a helpful assistant who knows everything about bicycles and board games."
    inputs = chat(tokenizer, "Hello there", "Hi!", "What is the capital of Zorbia?", system=system)
    tiny_model.generate(**inputs, **GREEDY)
    plain = tokenizer("<|im_start|>Where was halvorite found?", return_tensors="pt")
    tiny_model.generate(**plain, **GREEDY)
    assert queries == ["What is the capital of Zorbia?", "Where was halvorite found?"]


def test_batch_rows_retrieve_their_own_documents(tiny_model, tiny_bank, tokenizer):
    tiny_model.attach_bank(tiny_bank)
    questions = ["What is the capital of Zorbia?", "Tell me about the Velomar bicycle frame"]
    tokenizer.padding_side = "left"
    batch = tokenizer(questions, return_tensors="pt", padding=True)
    outputs = tiny_model.generate(**batch, **GREEDY)
    for row, question in enumerate(questions):
        row_inputs = {k: v[row : row + 1] for k, v in batch.items()}
        with tiny_model.retrieved(question):
            alone = tiny_model.language_model.generate(**row_inputs, **GREEDY)
        assert torch.equal(outputs[row, : alone.shape[1]], alone[0])


def test_generate_errors(tiny_model, tokenizer):
    inputs = tokenizer("capital of Zorbia", return_tensors="pt")
    with pytest.raises(ReGradError, match="no gradient bank"):
        tiny_model.generate(**inputs, **GREEDY, use_bank=True)
    with pytest.raises(ReGradError, match="no gradient bank"):
        tiny_model.generate(**inputs, **GREEDY, query="Zorbia")


ROW = torch.tensor([[1, 2, 3]])


@pytest.mark.parametrize(
    "inputs, match",
    [
        ({"input_ids": torch.zeros((1, 0), dtype=torch.long)}, "is empty"),
        ({"input_ids": torch.zeros((0, 3), dtype=torch.long)}, "is empty"),
        ({"input_ids": torch.tensor([1, 2, 3])}, "add the batch dimension"),
        ({"input_ids": torch.tensor([[1.0, 2.0]])}, "integer token ids"),
        ({"input_ids": [[1, 2, 3]]}, "must be a torch.Tensor"),
        ({"input_ids": torch.tensor([[-1, 2]])}, "token id -1 is outside the vocabulary"),
        ({"input_ids": torch.tensor([[10**7]])}, "token id 10000000 is outside the vocabulary"),
        ({"input_ids": ROW, "attention_mask": torch.ones((1, 2), dtype=torch.long)}, "does not match input_ids"),
        ({"input_ids": ROW, "max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        ({"input_ids": ROW, "num_beams": 0}, "num_beams must be a positive integer"),
        ({"input_ids": ROW, "do_sample": True, "temperature": -1.0}, "temperature must be a positive"),
    ],
    ids=lambda value: "" if isinstance(value, dict) else value,
)
@pytest.mark.parametrize("with_bank", [False, True])
def test_odd_generate_inputs_are_typed_errors_that_change_nothing(tiny_model, tiny_bank, inputs, match, with_bank):
    """Refused before retrieval (whose messages would be about queries) and before the base's generate (whose
    errors are IndexError, OverflowError, ZeroDivisionError, ...)."""
    if with_bank:
        tiny_model.attach_bank(tiny_bank)
    before = parameter_bytes(tiny_model)
    with pytest.raises((ReGradValueError, ReGradTypeError), match=match):
        tiny_model.generate(**{"max_new_tokens": 2, "do_sample": False, **inputs})
    assert parameter_bytes(tiny_model) == before


def test_generate_keeps_settings_transformers_allows_at_their_bounds(tiny_model):
    """`top_k=0` (top-k filtering off), `min_new_tokens=0` and `no_repeat_ngram_size=0` are transformers' own
    'off' values, not bad input."""
    torch.manual_seed(0)
    output = tiny_model.generate(
        input_ids=ROW, max_new_tokens=2, do_sample=True, top_k=0, min_new_tokens=0, no_repeat_ngram_size=0
    )
    assert output.shape[0] == 1 and ROW.shape[1] < output.shape[1] <= ROW.shape[1] + 2


def test_knowledge_with_no_documents_changes_nothing(tiny_model):
    before = parameter_bytes(tiny_model)
    with pytest.raises(ReGradValueError, match="empty"), tiny_model.knowledge([]):
        pass
    assert parameter_bytes(tiny_model) == before


def test_save_and_load_write_only_the_learner_and_tokenizer(tiny_model, tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    tokenizer_files = ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert files == sorted(["config.json", "learner.safetensors", "generation_config.json", *tokenizer_files])
    assert type(AutoTokenizer.from_pretrained(tmp_path)) is type(tokenizer)  # what `pipeline(model=dir)` loads
    assert all((p.stat().st_mode & 0o777) == FILE_MODE for p in tmp_path.iterdir())
    assert (tmp_path / "learner.safetensors").stat().st_size < 100_000  # LoRA + step sizes, no base weights
    loaded = ReGradForCausalLM.from_pretrained(tmp_path, base_model=make_tiny_base(tokenizer), tokenizer=tokenizer)
    assert loaded.fingerprint() == tiny_model.fingerprint()
    assert parameter_bytes(loaded) == parameter_bytes(tiny_model)
    inputs = tokenizer("Tell me about swans.", return_tensors="pt")
    with tiny_model.knowledge([DOCUMENTS[0]]):
        expected = tiny_model.generate(**inputs, **GREEDY)
    with loaded.knowledge([DOCUMENTS[0]]):
        assert torch.equal(loaded.generate(**inputs, **GREEDY), expected)


def test_loading_a_learner_of_another_shape_fails_clearly(tiny_model, tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    other = make_tiny_model(tokenizer, lora_rank=2)
    with pytest.raises(ReGradValueError, match="does not fit"):
        other.load_learner(tmp_path / "learner.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReGradValueError, match="not a ReGrad learner"):
        ReGradForCausalLM.from_pretrained(tmp_path / "empty")
    with pytest.raises(ReGradValueError, match="neither a local directory nor a Hub repo id"):
        ReGradForCausalLM.from_pretrained(tmp_path / "missing")


def test_pipeline_with_a_bank(tiny_model, tiny_bank, tokenizer):
    tiny_model.attach_bank(tiny_bank)
    generator = pipeline("text-generation", model=tiny_model, tokenizer=tokenizer)
    prompt = "What is the capital of Zorbia?"
    result = generator(prompt, max_new_tokens=6, do_sample=False)
    assert isinstance(result[0]["generated_text"], str) and result[0]["generated_text"].startswith(prompt)
    with tiny_model.retrieved(prompt):
        expected = tiny_model.language_model.generate(**tokenizer(prompt, return_tensors="pt"), **GREEDY)
    assert result[0]["generated_text"] == tokenizer.decode(expected[0], skip_special_tokens=True)


def test_from_base_loads_a_local_checkpoint_by_path(tokenizer, tmp_path):
    make_tiny_base(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = ReGradForCausalLM.from_base(str(tmp_path))
    assert model.config.base_model_name_or_path == str(tmp_path)
    assert model.tokenizer is not None and len(model.lora_parameters()) == 12
    unwrapped = make_tiny_base(tokenizer)
    inputs = tokenizer("Tell me about swans.", return_tensors="pt")
    assert torch.equal(model.generate(**inputs, **GREEDY, **AS_THE_BASE), unwrapped.generate(**inputs, **GREEDY))


def test_generate_without_input_ids_needs_a_query(tiny_model, tiny_bank, tokenizer):
    tiny_model.attach_bank(tiny_bank)
    embeds = tiny_model.get_input_embeddings()(tokenizer("capital of Zorbia", return_tensors="pt").input_ids)
    with pytest.raises(ReGradValueError, match="query="):
        tiny_model.generate(inputs_embeds=embeds, **GREEDY)
    assert tiny_model.generate(inputs_embeds=embeds, query="capital of Zorbia", **GREEDY).shape[0] == 1


HETEROGENEOUS = [
    "What is the capital of Zorbia?",
    "Tell me about the frame of the Velomar electric bicycle please",
    "Which mineral?",
    "What is the capital of Zorbia?",
]


def new_tokens_alone(model, tokenizer, question, query, **generate_kwargs):
    """What one prompt generates on its own (no padding): its new tokens, one row per returned sequence."""
    inputs = tokenizer(question, return_tensors="pt")
    if query is None:
        output = model.generate(**inputs, **generate_kwargs, use_bank=False)
    else:
        with model.retrieved(query):
            output = model.language_model.generate(**inputs, **generate_kwargs)
    return output[:, inputs.input_ids.shape[1] :]


def assert_rows_equal_alone(batch_new, alone_new, pad_token_id):
    # A row generated alone stops at EOS; in the batch it is padded after it.
    assert torch.equal(batch_new[:, : alone_new.shape[1]], alone_new)
    assert (batch_new[:, alone_new.shape[1] :] == pad_token_id).all()


def test_heterogeneous_batch_is_one_call_and_each_row_gets_what_it_gets_alone(
    tiny_model, tiny_bank, tokenizer, monkeypatch
):
    tiny_model.attach_bank(tiny_bank)
    queries = [*HETEROGENEOUS[:3], None]  # the last row runs without retrieval
    tokenizer.padding_side = "left"
    batch = tokenizer(HETEROGENEOUS, return_tensors="pt", padding=True)
    assert len({int(n) for n in batch.attention_mask.sum(1)}) > 1  # prompts of different lengths: left padding
    calls, gathers = [], []
    generate, gather = tiny_model.language_model.generate, tiny_bank.gather
    monkeypatch.setattr(tiny_model.language_model, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    monkeypatch.setattr(tiny_bank, "gather", lambda ids: gathers.append(ids) or gather(ids))
    before = parameter_bytes(tiny_model)
    versions = {n: p._version for n, p in tiny_model.named_parameters()}
    output = tiny_model.generate(**batch, **GREEDY, query=queries, return_dict_in_generate=True)
    assert len(calls) == 1 and len(gathers) == 1  # one batched generate; one gather of all rows' documents
    assert parameter_bytes(tiny_model) == before
    assert {n: p._version for n, p in tiny_model.named_parameters()} == versions  # no tensor was written
    assert not any(module._forward_hooks for module in tiny_model.modules())
    monkeypatch.undo()
    batch_new = output.sequences[:, batch.input_ids.shape[1] :]
    for row, (question, query) in enumerate(zip(HETEROGENEOUS, queries, strict=True)):
        alone = new_tokens_alone(tiny_model, tokenizer, question, query, **GREEDY)
        assert_rows_equal_alone(batch_new[row : row + 1], alone, tokenizer.pad_token_id)
    assert len({tuple(row.tolist()) for row in batch_new}) == 4  # the rows differ, or the test proves nothing


def test_row_step_sizes_serve_a_heterogeneous_batch_as_each_row_alone(tokenizer, embedder):
    model = make_tiny_model(tokenizer, step_size_mode="row")
    with torch.no_grad():  # a different step size on every row, so a path that used one per tensor would differ
        model.step_sizes.raw.copy_(torch.linspace(-1.0, 1.5, model.step_sizes.raw.numel()))
    model.attach_bank(GradientBank.build(model, DOCUMENTS, ids=IDS, embedder_model=embedder, show_progress=False))
    tokenizer.padding_side = "left"
    batch = tokenizer(HETEROGENEOUS[:3], return_tensors="pt", padding=True)
    output = model.generate(**batch, **GREEDY, query=HETEROGENEOUS[:3])
    for row, question in enumerate(HETEROGENEOUS[:3]):
        alone = new_tokens_alone(model, tokenizer, question, question, **GREEDY)
        assert_rows_equal_alone(output[row : row + 1, batch.input_ids.shape[1] :], alone, tokenizer.pad_token_id)


def test_heterogeneous_batch_with_beams_and_several_returned_sequences(tiny_model, tiny_bank, tokenizer):
    tiny_model.attach_bank(tiny_bank)
    settings = {**GREEDY, "num_beams": 3, "num_return_sequences": 2}
    tokenizer.padding_side = "left"
    batch = tokenizer(HETEROGENEOUS[:3], return_tensors="pt", padding=True)
    output = tiny_model.generate(**batch, **settings)
    assert output.shape[0] == 6
    for row, question in enumerate(HETEROGENEOUS[:3]):
        alone = new_tokens_alone(tiny_model, tokenizer, question, question, **settings)
        assert_rows_equal_alone(
            output[2 * row : 2 * row + 2, batch.input_ids.shape[1] :], alone, tokenizer.pad_token_id
        )


class RaiseAtStep:
    """A stopping criterion that raises once generation has produced `step` tokens."""

    def __init__(self, prompt_length, step):
        self.prompt_length, self.step = prompt_length, step

    def __call__(self, input_ids, scores, **kwargs):
        if input_ids.shape[1] - self.prompt_length >= self.step:
            raise KeyboardInterrupt
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_heterogeneous_batch_failing_mid_generate_leaves_everything_as_it_was(tiny_model, tiny_bank, tokenizer):
    from transformers import StoppingCriteriaList

    tiny_model.attach_bank(tiny_bank)
    tokenizer.padding_side = "left"
    batch = tokenizer(HETEROGENEOUS[:2], return_tensors="pt", padding=True)
    expected = tiny_model.generate(**batch, **GREEDY)
    before = parameter_bytes(tiny_model)
    stop = StoppingCriteriaList([RaiseAtStep(batch.input_ids.shape[1], 3)])
    with pytest.raises(KeyboardInterrupt):
        tiny_model.generate(**batch, **GREEDY, stopping_criteria=stop)
    assert parameter_bytes(tiny_model) == before
    assert not any(module._forward_hooks for module in tiny_model.modules())
    assert torch.equal(tiny_model.generate(**batch, **GREEDY), expected)


def test_heterogeneous_batches_run_alongside_other_threads_swaps(tiny_model, tiny_bank, tokenizer):
    from concurrent.futures import ThreadPoolExecutor

    tiny_model.attach_bank(tiny_bank)
    tokenizer.padding_side = "left"
    calls = [tokenizer(HETEROGENEOUS[:3], return_tensors="pt", padding=True)]  # per-row LoRA tensors
    calls += [tokenizer(question, return_tensors="pt") for question in HETEROGENEOUS[:2]]  # swap the shared ones
    settings = {"max_new_tokens": 8, "do_sample": False}
    sequential = [tiny_model.generate(**inputs, **settings) for inputs in calls]
    before = parameter_bytes(tiny_model)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(tiny_model.generate, **inputs, **settings) for _ in range(2) for inputs in calls]
        results = [future.result() for future in futures]
    assert all(torch.equal(r, s) for r, s in zip(results, sequential * 2, strict=True))
    assert parameter_bytes(tiny_model) == before


def test_per_row_queries_are_strings_or_none(tiny_model, tiny_bank, tokenizer):
    tokenizer.padding_side = "left"
    batch = tokenizer(HETEROGENEOUS[:2], return_tensors="pt", padding=True)
    plain = tiny_model.generate(**batch, **GREEDY, use_bank=False)
    assert torch.equal(tiny_model.generate(**batch, **GREEDY, query=[None, None]), plain)  # no bank needed
    tiny_model.attach_bank(tiny_bank)
    with pytest.raises(ReGradValueError, match="a string or None"):
        tiny_model.generate(**batch, **GREEDY, query=["capital of Zorbia", 3])
