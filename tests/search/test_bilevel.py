"""The functional view of an adapted model, directly: losses at fast weights and value_and_grad."""

import pytest
import torch

from autolora import AutoLoRATrainer, DataError
from autolora.search.bilevel import Bilevel, LossModule, RngSnapshot, default_loss, grads_or_zeros
from tests.conftest import MLP, mlp_batches, mlp_loss


def _problem(**kw) -> Bilevel:
    t = AutoLoRATrainer(
        MLP(dtype=torch.float64), max_rank=2, target_modules=["fc1"], modules_to_save=["head"], loss_fn=mlp_loss
    )
    p = t.problem
    return Bilevel(LossModule(t.model, mlp_loss), p.weight_names, p.weights, p.selector_names, p.selectors, **kw)


def test_names_align_with_parameters():
    p = _problem()
    named = dict(p.model.named_parameters())
    assert all(named[n] is w for n, w in zip(p.weight_names, p.weights))
    assert p.selector_names == ("fc1",) and p.selectors[0] is p.model.fc1.selector


def test_loss_at_fast_weights_equals_loss_after_assigning_them():
    p = _problem()
    batch = mlp_batches(1, dtype=torch.float64)[0]
    fast = [w.detach() + 0.1 for w in p.weights]
    at_fast = p.loss(batch, fast)
    with torch.no_grad():
        for w, f in zip(p.weights, fast):
            w.copy_(f)
    torch.testing.assert_close(at_fast, p.loss(batch))


def test_value_and_grad_accumulates_the_mean_and_undoes_the_loss_scale():
    p = _problem()
    batches = mlp_batches(3, dtype=torch.float64)
    loss, grads = p.value_and_grad(batches, p.weights)
    losses = [p.loss(b) for b in batches]
    want = torch.autograd.grad(sum(losses) / 3, p.weights)
    torch.testing.assert_close(loss, sum(losses).detach() / 3)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)
    scaled = _problem(loss_scale=1024.0)
    _, scaled_grads = scaled.value_and_grad(batches, scaled.weights)
    for g, w in zip(scaled_grads, want):
        torch.testing.assert_close(g, w)


def test_reducer_sees_gradients_and_loss():
    seen = []

    def reducer(tensors):
        seen.append(len(tensors))
        return tensors

    p = _problem(reducer=reducer)
    p.value_and_grad(mlp_batches(1, dtype=torch.float64), p.weights)
    assert seen == [len(p.weights) + 1]


def test_grads_or_zeros_and_default_loss():
    x, unused = torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)
    gx, gu = grads_or_zeros((x * 2).sum(), [x, unused])
    assert torch.equal(gx, torch.full((2,), 2.0)) and torch.equal(gu, torch.zeros(3))
    with pytest.raises(DataError, match="'labels'"):
        default_loss(lambda **kw: {"logits": 1}, {"input_ids": 1})


def test_default_loss_turns_the_decoder_cache_off():
    """A loss pass never reads a key/value cache: a forward that takes ``use_cache`` gets False,
    unless the batch sets it; a forward without the argument is called as before."""

    class Decoder(torch.nn.Module):
        def forward(self, input_ids, use_cache=None):
            return {"loss": torch.tensor(0.0 if use_cache is False else 1.0)}

    class Plain(torch.nn.Module):
        def forward(self, input_ids):
            return {"loss": torch.tensor(2.0)}

    assert default_loss(Decoder(), {"input_ids": 1}).item() == 0.0
    assert default_loss(Decoder(), {"input_ids": 1, "use_cache": True}).item() == 1.0
    assert default_loss(Plain(), {"input_ids": 1}).item() == 2.0


def test_rng_snapshot_replays_without_consuming_randomness():
    snap = RngSnapshot([torch.device("cpu")])
    first = torch.rand(3)
    with snap.replay():
        again = torch.rand(3)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(first, again) and not torch.equal(after, first)


@pytest.mark.parametrize(
    ("loss_fn", "message"),
    [
        (lambda m, b: float(mlp_loss(m, b)), "got float"),
        (lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"), r"shaped \(8,\)"),
        (lambda m, b: {"loss": mlp_loss(m, b)}, "got dict"),
        (lambda m, b: torch.tensor(1), "torch.int64 tensor"),
    ],
)
def test_loss_fn_must_return_a_scalar_float_tensor(loss_fn, message):
    from autolora import AutoLoRAError, AutoLoRATrainer

    t = AutoLoRATrainer(MLP(), loss_fn=loss_fn, max_rank=2, target_modules=["fc1"])
    with pytest.raises(AutoLoRAError, match=f"must return a scalar float tensor.*{message}"):
        t.fit(mlp_batches(4), max_steps=1)
