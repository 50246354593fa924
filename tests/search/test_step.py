"""One bilevel step over a Search, directly: the deferred non-finite check of fused optimisers."""

import pytest
import torch

from autolora import AutoLoRATrainer, NonFiniteError
from autolora.search.guard import Guard
from autolora.search.hypergrad import Hypergrad, MetaGrads
from autolora.search.step import build_search, check, selector_due, settle, take_step
from autolora.state import TrainerState
from tests.conftest import MLP, mlp_batches, mlp_loss


def _search(*, fused: bool, skip: bool = False, engine: str = "darts", **kw):
    """A Search over a fresh MLP; ``fused=True`` is the CUDA configuration, on CPU: fused
    optimisers skip bad steps on the device and the host settles each verdict a step later."""
    t = AutoLoRATrainer(
        MLP(),
        max_rank=4,
        target_modules=["fc1", "fc2"],
        modules_to_save=["head"],
        loss_fn=mlp_loss,
        hypergrad=engine,
        skip_nonfinite=skip,
        **kw,
    )
    search = build_search(
        t.model,
        t.adapters,
        t.modules_to_save,
        t.loss_fn,
        t.search_config,
        state=TrainerState(),
        guard=Guard(fp16=False, skip=skip),
        fused=fused,
    )
    return t, search


def _params(t):
    return {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}


def test_fused_optimisers_defer_and_plain_ones_do_not():
    assert _search(fused=True)[1].defer
    assert not _search(fused=False)[1].defer


@pytest.mark.parametrize("engine", ["first_order", "darts"])
def test_deferred_check_skips_on_the_device_and_raises_one_step_later(engine):
    t, search = _search(fused=True, engine=engine)
    batches = mlp_batches(4)
    take_step(search, [batches[0]], [batches[1]])
    settle(search)
    before = _params(t)
    adam_steps = [float(s["step"]) for s in search.weight_optimizer.state.values()]
    bad = (batches[0][0] * float("nan"), batches[0][1])
    take_step(search, [bad], [batches[1]])  # deferred: no error yet, and the device skipped the update
    assert all(torch.equal(before[n], p) for n, p in _params(t).items())
    assert [float(s["step"]) for s in search.weight_optimizer.state.values()] == adam_steps  # state untouched too
    with pytest.raises(NonFiniteError, match="step 2: the train loss") as failed:
        take_step(search, [batches[2]], [batches[1]])  # settles step 2 before updating with step 3
    assert failed.value.step == 2
    assert all(torch.equal(before[n], p) for n, p in _params(t).items())
    assert search.state.step == 1  # the failed step does not count as taken


def test_deferred_skip_counts_at_the_next_settle_and_training_goes_on():
    t, search = _search(fused=True, skip=True)
    batches = mlp_batches(4)
    take_step(search, [batches[0]], [batches[1]])
    settle(search)
    before = _params(t)
    take_step(search, [(batches[0][0] * float("nan"), batches[0][1])], None)
    assert search.state.skipped_steps == 0  # not read back yet
    assert all(torch.equal(before[n], p) for n, p in _params(t).items())
    take_step(search, [batches[2]], [batches[1]])  # settles it, then trains on
    take_step(search, [batches[3]], [batches[1]])
    settle(search)
    assert search.state.skipped_steps == 1 and search.state.step == 4
    assert any(not torch.equal(before[n], p) for n, p in _params(t).items())
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_selector_step_only_when_due():
    t, search = _search(fused=False, selector_every=2)
    batches = mlp_batches(3)
    assert not selector_due(search)
    sel = {n: a.selector.detach().clone() for n, a in t.adapters.items()}
    losses = take_step(search, [batches[0]], None)
    assert set(losses) == {"loss/train"} and selector_due(search)
    assert all(torch.equal(a.selector, sel[n]) for n, a in t.adapters.items())
    losses = take_step(search, [batches[1]], [batches[2]])
    assert set(losses) == {"loss/train", "loss/val"}
    assert all(not torch.equal(a.selector, sel[n]) for n, a in t.adapters.items())


def test_fp16_overflow_halves_the_loss_scale_and_skips():
    t = AutoLoRATrainer(MLP(), max_rank=4, target_modules=["fc1", "fc2"], loss_fn=mlp_loss, autocast="fp16")
    search = t.search
    g = torch.ones(3)
    overflow = MetaGrads(torch.tensor(1.0), (g * float("inf"),), Hypergrad((g,), torch.tensor(1.0)))
    assert check(search, overflow, 1) == (True, None)  # settled at once: the next scale depends on it
    assert (search.state.loss_scale, search.state.skipped_steps) == (2.0**15, 1)
    nan_loss = MetaGrads(torch.tensor(float("nan")), (g,), None)
    with pytest.raises(NonFiniteError, match="train loss"):
        check(search, nan_loss, 2)  # a non-finite *loss* is not an overflow


@pytest.mark.parametrize("micro_batches", [1, 2])
@pytest.mark.parametrize(("difference", "passes"), [("forward", 3), ("central", 4)])
def test_darts_passes_per_step(difference, passes, micro_batches):
    """A darts selector step runs 3 forward passes per micro-batch (4 with the central
    difference); a plain step runs one and never differentiates the selectors."""
    forwards, selector_grads = [0], [0]

    def counting_loss(model, batch):
        forwards[0] += 1
        return mlp_loss(model, batch)

    t = AutoLoRATrainer(
        MLP(),
        max_rank=4,
        target_modules=["fc1", "fc2"],
        loss_fn=counting_loss,
        hypergrad="darts",
        darts_difference=difference,
        selector_every=2,
    )
    for a in t.adapters.values():  # fires whenever a backward computes a selector's gradient
        a.selector.register_hook(lambda g: selector_grads.__setitem__(0, selector_grads[0] + 1))
    batches = mlp_batches(2 * micro_batches)
    train, val = batches[:micro_batches], batches[micro_batches:]

    def counts(val_batches):
        forwards[0] = selector_grads[0] = 0
        take_step(t.search, train, val_batches)
        settle(t.search)
        return forwards[0], selector_grads[0]

    assert counts(None) == (micro_batches, 0)  # plain step: the train pass alone, weights only
    assert selector_due(t.search)
    # every pass of a selector step differentiates the selectors: 2 adapters per backward
    assert counts(val) == (passes * micro_batches, 2 * 3 * micro_batches)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_sparsity_gradients_stacked_by_shape_equal_the_per_module_sum(kind):
    """Selectors of one shape share one stacked penalty; the gradients are each module's own."""
    from autolora.gates import sparsity_penalty
    from autolora.search.step import sparsity_gradients

    gen = torch.Generator().manual_seed(0)
    selectors = [torch.randn(r, generator=gen, dtype=torch.float64, requires_grad=True) for r in (4, 4, 2, 4, 2)]
    got = sparsity_gradients(selectors, [kind] * len(selectors))
    for b, g in zip(selectors, got):
        (reference,) = torch.autograd.grad(sparsity_penalty(b, kind), [b])
        torch.testing.assert_close(g, reference, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("engine", ["first_order", "darts", "unrolled"])
def test_weight_gradients_carry_no_graph(engine):
    """Detached where the engine built them with a graph (unrolled), as they come otherwise."""
    from autolora.search.step import gradients

    _, search = _search(fused=False, engine=engine)
    batches = mlp_batches(2)
    meta = gradients(search, [batches[0]], [batches[1]], search.engine)
    assert all(g.grad_fn is None and not g.requires_grad for g in meta.weight_grads)
    assert meta.train_loss.grad_fn is None
