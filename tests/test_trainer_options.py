"""Gradient accumulation, mixed precision, gradient checkpointing and skipping bad steps."""

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from autolora import AutoLoRATrainer, ConfigError, NonFiniteError
from autolora.search.hypergrad import ENGINES
from tests.conftest import MLP, bert, mlp_batches, mlp_loss, token_batches


def _mlp(**kw):
    torch.manual_seed(0)
    return AutoLoRATrainer(
        MLP(),
        max_rank=4,
        target_modules=["fc1", "fc2"],
        modules_to_save=["head"],
        loss_fn=mlp_loss,
        seed=2,
        **kw,
        selector_every=1,
    )


def _trainable(t):
    return {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("engine", ["first_order", "darts", "unrolled"])
def test_accumulating_micro_batches_equals_one_big_batch(engine):
    train, val = mlp_batches(2, size=4, seed=5), mlp_batches(2, size=4, seed=6)
    big_train = [(torch.cat([b[0] for b in train]), torch.cat([b[1] for b in train]))]
    big_val = [(torch.cat([b[0] for b in val]), torch.cat([b[1] for b in val]))]
    acc = _mlp(hypergrad=engine, grad_accum_steps=2, selector_lr=0.1)
    acc.fit(train + train, val, max_steps=2)  # two steps of two micro-batches each
    one = _mlp(hypergrad=engine, selector_lr=0.1)
    one.fit(big_train + big_train, big_val, max_steps=2)
    assert acc.state.step == one.state.step == 2
    a, b = _trainable(acc), _trainable(one)
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6, rtol=1e-5), n
    assert any("selector" in n for n in a)


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_skip_nonfinite_keeps_every_parameter_finite(engine):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = mlp_loss(model, batch)
        return loss * float("nan") if calls["n"] % 5 == 0 else loss  # hits train and validation passes

    torch.manual_seed(0)
    t = AutoLoRATrainer(
        MLP(),
        max_rank=4,
        target_modules=["fc1", "fc2"],
        loss_fn=loss_fn,
        hypergrad=engine,
        skip_nonfinite=True,
        selector_every=1,
    )
    t.fit(mlp_batches(8), epochs=2)
    assert t.state.step == 12 and 0 < t.state.skipped_steps < 12
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_nan_in_the_validation_pass_stops_before_any_update():
    t = _mlp(hypergrad="darts")
    train, val = mlp_batches(2), mlp_batches(1, seed=4)
    t.fit(train, val, max_steps=1)
    before = _trainable(t)
    bad_val = (val[0][0] * float("inf"), val[0][1])
    with pytest.raises(NonFiniteError, match="step 2: the validation loss"):
        t.step(train[0], bad_val)
    assert all(torch.equal(before[n], p) for n, p in _trainable(t).items())


@pytest.mark.parametrize("kind", ["bf16", "fp16"])
def test_autocast_trains_with_fp32_adapters(kind):
    torch.manual_seed(0)
    t = AutoLoRATrainer(
        bert(), max_rank=4, target_modules=["query", "value"], hypergrad="darts", autocast=kind, selector_every=1
    )
    t.fit(token_batches(4), epochs=1)
    layer = t.adapters["bert.encoder.layer.0.attention.self.query"]
    assert layer.lora_A.dtype == torch.float32 and torch.isfinite(layer.lora_B).all()
    assert layer.lora_B.abs().sum() > 0  # the weights moved
    assert t.state.loss_scale == (2.0**16 if kind == "fp16" else 1.0)


def test_gradient_checkpointing_gives_the_same_hypergradient():
    batches = token_batches(2)
    plain = AutoLoRATrainer(bert(), max_rank=4, target_modules=["query", "value"], hypergrad="darts", selector_every=1)
    ckpt = AutoLoRATrainer(
        bert(),
        max_rank=4,
        target_modules=["query", "value"],
        hypergrad="darts",
        gradient_checkpointing=True,
        selector_every=1,
    )
    assert ckpt.model.training and any(getattr(m, "gradient_checkpointing", False) for m in ckpt.model.modules())
    plain.fit(batches, batches, max_steps=1)
    ckpt.fit(batches, batches, max_steps=1)
    a, b = plain.hypergradient(*batches), ckpt.hypergradient(*batches)
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6, rtol=1e-4), n


def test_gradient_checkpointing_errors():
    with pytest.raises(ConfigError, match="cannot run with gradient_checkpointing"):
        AutoLoRATrainer(
            bert(),
            max_rank=2,
            target_modules=["query"],
            hypergrad="unrolled",
            gradient_checkpointing=True,
            selector_every=1,
        )
    with pytest.raises(ConfigError, match="does not have"):
        _mlp(gradient_checkpointing=True)


def _weight_step_grad_norms(trainer, out):
    """Record the weights' gradient norm at every weight-optimiser step, whichever optimiser
    (search or retrain) takes it; the selector optimiser is ignored."""

    def hook(opt, args, kwargs):
        params = [p for g in opt.param_groups for p in g["params"]]
        if {id(p) for p in params} == {id(p) for p in trainer.problem.weights}:  # pruning replaces them
            out.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))

    return register_optimizer_step_pre_hook(hook)


def test_max_grad_norm_clips_the_weight_step_in_search_and_retrain():
    train, val = mlp_batches(4, seed=5), mlp_batches(2, seed=6)
    free = _mlp(hypergrad="first_order", lr=1e-2)
    seen_free: list[float] = []
    handle = _weight_step_grad_norms(free, seen_free)
    try:
        free.fit(train, val, max_steps=3)
    finally:
        handle.remove()
    limit = min(seen_free) / 4  # well below what the unclipped gradients reach
    clipped = _mlp(hypergrad="first_order", lr=1e-2, max_grad_norm=limit)
    seen: list[float] = []
    handle = _weight_step_grad_norms(clipped, seen)
    try:
        clipped.fit(train, val, max_steps=3)
        clipped.prune()
        clipped.retrain(train, epochs=1)  # a fresh optimiser; clipping applies there too
    finally:
        handle.remove()
    assert len(seen_free) == 3 and len(seen) == 3 + 4
    assert all(n <= limit * (1 + 1e-5) for n in seen)


def test_max_grad_norm_must_be_positive():
    with pytest.raises(ConfigError, match="max_grad_norm"):
        _mlp(max_grad_norm=0.0)
