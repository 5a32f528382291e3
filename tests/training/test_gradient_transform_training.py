"""Training the learned gradient transform `G' = L G R` (issue 29, lever 2): `ReGradTrainer` moves it in the
second-order and the cached-gradient (theta0 frozen) modes, in its own parameter group, and the cached gradients
give it the gradient of uncached first-order training."""

import pytest
import torch

from regrad_hf.adaptation.objective import task_loss
from regrad_hf.data.collator import TaskCollator
from regrad_hf.data.grouping import group_by_documents
from regrad_hf.errors import ReGradValueError
from regrad_hf.modeling.learner_state import init_from_learner
from regrad_hf.training import ReGradTrainer
from regrad_hf.training.checkpoints import export_compact_checkpoint
from regrad_hf.training.gradient_cache import DocumentGradientCache

from ..conftest import make_tiny_model
from .test_amortised_recipe import paragraph_tasks
from .test_training import arguments, color_tasks


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.learner_state_dict().items()}


def test_second_order_training_moves_the_transform_theta0_and_step_sizes(tokenizer, tmp_path):
    model = make_tiny_model(tokenizer, gradient_transform_rank=2)
    before = snapshot(model)
    trainer = ReGradTrainer(
        model, arguments(tmp_path, gradient_transform_learning_rate=1e-2), train_dataset=color_tasks(4, 0, 0)
    )
    trainer.train()
    after = snapshot(model)
    assert not torch.equal(after["regrad.gradient_transform"], before["regrad.gradient_transform"])
    assert not torch.equal(after["regrad.step_sizes"], before["regrad.step_sizes"])
    assert all(not torch.equal(after[n], before[n]) for n in model.lora_parameters())
    (group,) = [g for g in trainer.optimizer.param_groups if g["params"][0] is model.gradient_transform.raw]
    assert group["initial_lr"] == 1e-2 and group["weight_decay"] == 0.0  # its own group


def test_cached_training_moves_the_transform_and_leaves_theta0_untouched(tokenizer, tmp_path):
    # step sizes fixed: the transform alone is what the cached phase trains, which it may now do
    model = make_tiny_model(tokenizer, gradient_transform_rank=2, step_size_mode="fix")
    before = snapshot(model)
    groups = group_by_documents(paragraph_tasks())
    trainer = ReGradTrainer(model, arguments(tmp_path, cached_gradients=True, max_steps=2), train_dataset=groups)
    trainer.train()
    after = snapshot(model)
    assert not torch.equal(after["regrad.gradient_transform"], before["regrad.gradient_transform"])
    assert all(torch.equal(after[n], before[n]) for n in [*model.lora_parameters(), "regrad.step_sizes"])
    factors = model.gradient_transform.factors(next(iter(model.lora_parameters())))
    assert not torch.equal(factors["left"], torch.eye(len(factors["left"])))  # the rank side's full matrix moved


def test_cached_gradients_give_the_transform_the_uncached_first_order_gradient(tokenizer):
    model = make_tiny_model(tokenizer, gradient_transform_rank=2)
    with torch.no_grad():  # away from the identity, where every factor gets a gradient
        model.gradient_transform.raw.add_(0.1 * torch.randn(model.gradient_transform.raw.shape))
    collator = TaskCollator(tokenizer, max_document_tokens=64)
    cache = DocumentGradientCache(model, max_tokens=64)
    parameters = [model.step_sizes.raw, model.gradient_transform.raw]
    for item in group_by_documents(paragraph_tasks()):
        encoded = collator.encode(item)
        uncached = torch.autograd.grad(task_loss(model, encoded, first_order=True), parameters)
        cached = torch.autograd.grad(
            task_loss(model, encoded, summed_gradients=cache.summed(encoded["documents"])), parameters
        )
        for found, expected in zip(cached, uncached, strict=True):
            assert expected.abs().sum() > 0
            torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_init_learner_from_a_learner_without_a_transform_starts_it_at_the_identity(tokenizer, tmp_path):
    source = make_tiny_model(tokenizer, seed=3)
    source.save_pretrained(tmp_path)
    model = make_tiny_model(tokenizer, gradient_transform_rank=1)
    identity = model.gradient_transform.raw.detach().clone()
    init_from_learner(model, tmp_path)
    state = model.learner_state_dict()
    assert torch.equal(state["regrad.gradient_transform"], identity)
    assert all(torch.equal(state[n], p) for n, p in source.learner_state_dict().items())


def test_a_run_with_a_transform_resumes_from_a_full_or_compact_checkpoint(tokenizer, tmp_path):
    tasks, options = color_tasks(16, 0, 0), {"max_steps": 4, "warmup_steps": 1}

    def learner():
        model = make_tiny_model(tokenizer, gradient_transform_rank=1)
        with torch.no_grad():  # a start other than the checkpoint's: what a resumed run ends with comes from it
            model.gradient_transform.raw.uniform_(-1, 1)
        return model

    uninterrupted = make_tiny_model(tokenizer, gradient_transform_rank=1)
    ReGradTrainer(uninterrupted, arguments(tmp_path / "a", **options), train_dataset=tasks).train()
    args = arguments(tmp_path / "b", save_strategy="steps", save_steps=2, **options)
    ReGradTrainer(make_tiny_model(tokenizer, gradient_transform_rank=1), args, train_dataset=tasks).train()
    checkpoint = tmp_path / "b" / "run" / "checkpoint-2"
    resumed = learner()
    ReGradTrainer(resumed, args, train_dataset=tasks).train(resume_from_checkpoint=str(checkpoint))
    expected = snapshot(uninterrupted)
    assert all(torch.equal(value, expected[name]) for name, value in snapshot(resumed).items())
    # the compact form: three optimizer groups, moments stored lossily, so the steps after it are close
    compact = export_compact_checkpoint(checkpoint, tmp_path / "compact")
    from_compact = learner()
    start = from_compact.gradient_transform.raw.detach().clone()
    trainer = ReGradTrainer(from_compact, arguments(tmp_path / "c", **options), train_dataset=tasks)
    trainer.train(resume_from_checkpoint=str(compact))
    end, got = uninterrupted.gradient_transform.raw.detach(), from_compact.gradient_transform.raw.detach()
    assert trainer.state.global_step == 4 and (got - end).norm() < 1e-2 * (start - end).norm()


def test_init_learner_from_a_damaged_learner_file_raises_a_typed_error(tokenizer, tmp_path):
    make_tiny_model(tokenizer, seed=3).save_pretrained(tmp_path)
    (tmp_path / "learner.safetensors").write_bytes(b"not a safetensors file")
    model = make_tiny_model(tokenizer)
    before = model.learner_state_dict()
    with pytest.raises(ReGradValueError, match="not a readable learner file"):
        init_from_learner(model, tmp_path)
    assert all(torch.equal(model.learner_state_dict()[n], t) for n, t in before.items())  # nothing written
