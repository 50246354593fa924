"""The non-finite guard on synthetic step results: every tensor is checked, and only non-finite
values (never a large finite one) count."""

import pytest
import torch

from autolora.errors import NonFiniteError
from autolora.search.guard import Guard
from autolora.search.hypergrad import Hypergrad, MetaGrads
from autolora.state import TrainerState


def meta(weight_grads, selector_grads=None, train_loss=1.0, val_loss=1.0) -> MetaGrads:
    hyper = None
    if selector_grads is not None:
        hyper = Hypergrad(tuple(selector_grads), torch.tensor(val_loss))
    return MetaGrads(torch.tensor(train_loss), tuple(weight_grads), hyper)


def check_step(meta, step, state, *, fp16, skip) -> bool:
    """Check one step and settle it at once: True if it is skipped."""
    guard = Guard(fp16=fp16, skip=skip)
    assert guard.check(meta, step, defer=False) is None
    return guard.settle(state)


def grads(n=7, bad_at=None, bad=float("nan"), dtype=torch.float32):
    out = [torch.randn(3, 5, dtype=dtype) for _ in range(n)]
    if bad_at is not None:
        out[bad_at][1, 2] = bad
    return out


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 3, 6])
def test_one_bad_entry_in_any_weight_gradient_is_caught(bad, where):
    with pytest.raises(NonFiniteError, match="step 5: the weight gradient is not finite"):
        check_step(meta(grads(bad_at=where, bad=bad)), 5, TrainerState(), fp16=False, skip=False)


def test_the_message_names_every_bad_part():
    m = meta(grads(), grads(n=4, bad_at=2), val_loss=float("nan"))
    with pytest.raises(NonFiniteError, match="the validation loss and the selector hypergradient"):
        check_step(m, 1, TrainerState(), fp16=False, skip=False)


def test_large_finite_half_precision_gradients_pass():
    # a 2-norm of these overflows float16; the infinity norm the guard uses does not
    big = [torch.full((64, 64), 6.0e4, dtype=torch.float16) for _ in range(5)]
    state = TrainerState()
    assert check_step(meta(big, big), 1, state, fp16=False, skip=False) is False
    assert state.skipped_steps == 0


def test_skip_counts_and_fp16_overflow_halves_the_scale():
    state = TrainerState(loss_scale=1024.0)
    assert check_step(meta(grads(bad_at=1)), 1, state, fp16=False, skip=True) is True
    assert state.skipped_steps == 1 and state.loss_scale == 1024.0
    assert check_step(meta(grads(bad_at=1)), 2, state, fp16=True, skip=False) is True  # overflow, not an error
    assert state.skipped_steps == 2 and state.loss_scale == 512.0
    with pytest.raises(NonFiniteError, match="train loss"):  # a non-finite loss is never an overflow
        check_step(meta(grads(), train_loss=float("nan")), 3, state, fp16=True, skip=False)
