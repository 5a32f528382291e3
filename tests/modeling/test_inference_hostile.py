"""Hostile inputs to inference: re-entrant generate from callbacks, arguments transformers refuses deep inside
`generate`, odd input dtypes, a ReGrad model as an assistant, odd save paths."""

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from regrad_hf import ReGradError, ReGradValueError
from regrad_hf.errors import ReGradTypeError

from ..conftest import make_tiny_model, parameter_bytes

GREEDY = {"max_new_tokens": 3, "do_sample": False}


class _CallsGenerate(BaseStreamer):
    """A streamer that calls `model.generate` on its first token, as a hostile callback would."""

    def __init__(self, model, inputs):
        self.model, self.inputs, self.calls = model, inputs, 0

    def put(self, value):
        self.calls += 1
        if self.calls == 1:
            self.model.generate(**self.inputs, **GREEDY)

    def end(self):
        pass


def _edited(**values) -> GenerationConfig:
    """A generation config edited after construction (its constructor would refuse the values)."""
    config = GenerationConfig()
    for name, value in values.items():
        setattr(config, name, value)
    return config


@pytest.fixture
def prompts(tokenizer):
    tokenizer.padding_side = "left"
    one = tokenizer(["What is the capital of Zorbia?"], return_tensors="pt")
    two = tokenizer(["What is the capital of Zorbia?", "Who discovered halvorite?"], return_tensors="pt", padding=True)
    yield one, two
    tokenizer.padding_side = "right"


@pytest.mark.parametrize("outer", ["swap", "per_row"])
def test_generate_called_by_a_streamer_inside_an_adapted_generate_is_refused(tiny_model, tiny_bank, prompts, outer):
    # Before: the inner call silently ran with the outer call's step (swap) or hit its per-row hooks.
    one, two = prompts
    tiny_model.attach_bank(tiny_bank)
    before = parameter_bytes(tiny_model)
    outer_inputs = one if outer == "swap" else two
    with pytest.raises(ReGradError, match="inside a generate call of the same model"):
        tiny_model.generate(**outer_inputs, streamer=_CallsGenerate(tiny_model, one), **GREEDY)
    assert parameter_bytes(tiny_model) == before and not tiny_model._restore.active
    assert not any(module._forward_hooks for module in tiny_model.modules())
    # A plain generate (nothing injected) may still be called from a streamer, and the model then serves as usual.
    streamer = _CallsGenerate(tiny_model, {**one, "use_bank": False})
    tiny_model.generate(**one, streamer=streamer, use_bank=False, **GREEDY)
    assert streamer.calls > 1 and torch.equal(
        tiny_model.generate(**one, **GREEDY), tiny_model.generate(**one, **GREEDY)
    )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"top_k_doc": 2}, ReGradValueError, "not used by the model"),  # a typo of top_k_docs
        ({"bad_words_ids": [[-3]]}, ReGradValueError, "bad_words_ids"),
        ({"forced_eos_token_id": 10**9}, ReGradValueError, "out of bounds"),
        ({"max_length": 3, "max_new_tokens": None}, ReGradValueError, "max_length"),
        ({"num_return_sequences": 2}, ReGradValueError, "num_return_sequences"),
        ({"streamer": object()}, ReGradTypeError, "put"),
        ({"stopping_criteria": [5]}, ReGradTypeError, "not callable"),
        ({"max_time": "soon"}, ReGradTypeError, "not supported"),
        ({"generation_config": {"max_new_tokens": 2}}, ReGradTypeError, "must be a GenerationConfig"),
        ({"generation_config": GenerationConfig(num_beams=0)}, ReGradValueError, "num_beams must be a positive"),
        ({"generation_config": _edited(max_new_tokens=-1)}, ReGradValueError, "max_new_tokens must be"),
    ],
    ids=lambda value: "" if isinstance(value, (dict, type)) else value,
)
@pytest.mark.parametrize("with_bank", [False, True])
def test_arguments_transformers_refuses_are_typed_errors(
    tiny_model, tiny_bank, prompts, kwargs, error, match, with_bank
):
    if with_bank:
        tiny_model.attach_bank(tiny_bank)
    before = parameter_bytes(tiny_model)
    with pytest.raises(error, match=match):
        tiny_model.generate(**prompts[0], **{**GREEDY, **kwargs})
    assert parameter_bytes(tiny_model) == before and not tiny_model._restore.active


def test_errors_of_callers_callbacks_pass_through_unchanged(tiny_model, tiny_bank, prompts):
    class Mine(ValueError):
        pass

    class Raises(BaseStreamer):
        def put(self, value):
            raise Mine("the caller's own error")

        def end(self):
            pass

    tiny_model.attach_bank(tiny_bank)
    before = parameter_bytes(tiny_model)
    for inputs in prompts:
        with pytest.raises(Mine) as caught:
            tiny_model.generate(**inputs, streamer=Raises(), **GREEDY)
        assert type(caught.value) is Mine
        assert parameter_bytes(tiny_model) == before


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int8])
@pytest.mark.parametrize("use_bank", [False, None])
def test_input_ids_of_a_dtype_embeddings_refuse_are_typed_errors(tiny_model, tiny_bank, dtype, use_bank):
    # Before: a bare RuntimeError from the embedding, or "needs an explicit query=" for uint8 with a bank.
    tiny_model.attach_bank(tiny_bank)
    with pytest.raises(ReGradValueError, match="integer token ids"):
        tiny_model.generate(input_ids=torch.tensor([[5, 6, 7]], dtype=dtype), use_bank=use_bank, **GREEDY)
    assert tiny_model.generate(input_ids=torch.tensor([[5, 6, 7]], dtype=torch.int32), use_bank=False, **GREEDY).numel()


def test_a_regrad_model_serves_as_assistant_model(tiny_model, tiny_bank, tokenizer, prompts):
    # Before: AttributeError ('ReGradConfig' object has no attribute 'vocab_size') deep in assisted generation.
    tiny_model.attach_bank(tiny_bank)
    assistant = make_tiny_model(tokenizer, seed=1)
    before = parameter_bytes(tiny_model)
    drafted = tiny_model.generate(**prompts[0], assistant_model=assistant, **GREEDY)
    assert torch.equal(drafted, tiny_model.generate(**prompts[0], assistant_model=assistant.language_model, **GREEDY))
    tiny_model.generate(**prompts[0], assistant_model=tiny_model, **GREEDY)
    assert parameter_bytes(tiny_model) == before


def test_a_save_directory_with_a_nul_character_is_a_typed_error(tiny_model, tmp_path):
    with pytest.raises(ReGradValueError, match="NUL"):
        tiny_model.save_pretrained(str(tmp_path / "a\x00b"))


@pytest.fixture
def failing_hub(monkeypatch, tmp_path):
    """The loopback Hub of hub_server.py, with `hub.failure` ("500" on downloads, "truncate" the learner file,
    "500 push" on uploads) injected in front of its routes."""
    import transformers.utils.hub
    from huggingface_hub import constants

    from ..hub_server import FakeHub

    hub = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
    handler = hub.server.RequestHandlerClass
    route = handler._route
    hub.failure = None

    def failing_route(self, method):
        download = method == "GET" and "/resolve/" in self.path
        if hub.failure == "500" and download or hub.failure == "500 push" and method == "POST":
            return self._reply(500, b"internal error")
        if hub.failure == "truncate" and download and self.path.endswith("learner.safetensors"):
            body = hub.files("user/learner")["learner.safetensors"]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])  # the connection then closes: a download cut short
            self.close_connection = True
            return None
        return route(self, method)

    monkeypatch.setattr(handler, "_route", failing_route)
    yield hub
    hub.stop()


@pytest.mark.parametrize("failure", ["500", "truncate"])
def test_a_failing_hub_download_is_a_hub_error_and_a_retry_loads(failing_hub, tiny_model, tokenizer, failure):
    # Before: huggingface_hub's HfHubHTTPError, or httpx's RemoteProtocolError for a truncated body.
    from regrad_hf import ReGradForCausalLM
    from regrad_hf.errors import ReGradHubError

    from ..conftest import make_tiny_base

    tiny_model.push_to_hub("user/learner")
    failing_hub.failure = failure
    with pytest.raises(ReGradHubError, match="try again"):
        ReGradForCausalLM.from_pretrained("user/learner", base_model=make_tiny_base(tokenizer), tokenizer=tokenizer)
    failing_hub.failure = None
    loaded = ReGradForCausalLM.from_pretrained(
        "user/learner", base_model=make_tiny_base(tokenizer), tokenizer=tokenizer
    )
    assert loaded.fingerprint() == tiny_model.fingerprint()


def test_a_failing_hub_upload_is_a_hub_error(failing_hub, tiny_model):
    from regrad_hf.errors import ReGradHubError

    failing_hub.failure = "500 push"
    with pytest.raises(ReGradHubError, match="pushing to user/learner"):
        tiny_model.push_to_hub("user/learner")
    failing_hub.stop()
    with pytest.raises(ReGradHubError, match="Connection refused|ConnectError"):
        tiny_model.push_to_hub("user/learner")
