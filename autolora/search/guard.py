"""The non-finite guard: every loss and gradient of a step is checked before it updates anything.

A step's checks are a handful of fused kernels that leave one flag per part of the step (train
loss, weight gradient, validation loss, selector hypergradient) on the device. What happens next
depends on whether the host may wait for them:

- **Settled at once** (CPU, float16 loss scaling, or an optimiser without a fused kernel): the
  host reads the flags (one sync) and skips the update itself.
- **Deferred** (CUDA with fused optimisers): the optimisers receive ``found_inf`` and skip the
  update on the device, as they do under ``GradScaler``; the flags travel to pinned host memory
  behind an event and are read at the start of the next step, or whenever the trainer needs its
  counters (logging, checkpoints, the end of ``fit``). The host never waits for the step it just
  launched, so it can queue the next one while the device works.

Either way a bad step changes no parameter and no optimiser state; the error (or the skip count)
comes at most one step later when deferred.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils import get_total_norm

from autolora.errors import NonFiniteError
from autolora.search.hypergrad import MetaGrads
from autolora.state import FP16_GROWTH_INTERVAL, TrainerState


@dataclass
class _Pending:
    """One step's flags (True = not finite), on the host once ``ready`` has completed."""

    step: int
    parts: list[str]
    flags: torch.Tensor
    ready: torch.cuda.Event | None


class Guard:
    """Checks each step and keeps a ``TrainerState``'s ``skipped_steps`` and float16 loss scale.

    Args:
        fp16: Non-finite gradients under finite losses are a loss-scale overflow: skip the step
            and halve ``state.loss_scale`` (as ``GradScaler`` does); after
            ``FP16_GROWTH_INTERVAL`` good steps the scale doubles. Always settled at once, since
            the next step's scale depends on it.
        skip: Skip bad steps (counted) instead of raising ``NonFiniteError``.
    """

    def __init__(self, *, fp16: bool, skip: bool) -> None:
        self.fp16, self.skip = fp16, skip
        self._pending: _Pending | None = None

    def check(self, meta: MetaGrads, step: int, *, defer: bool) -> torch.Tensor | None:
        """Flag step ``step``; deferred, return its ``found_inf`` (a float32 device scalar, 1 = skip)
        for the fused optimisers.

        The step before it must be settled first (:meth:`settle`). The new step is left pending:
        with ``defer`` on CUDA its flags are copied to the host behind an event (never defer with
        float16: the next step needs the loss scale); without ``defer`` the caller settles it at
        once with :meth:`settle`, and ``found_inf`` is None.
        """
        assert self._pending is None, "settle() the previous step before checking the next"
        parts = [("train loss", [meta.train_loss]), ("weight gradient", meta.weight_grads)]
        if meta.hyper is not None:
            parts += [("validation loss", [meta.hyper.val_loss]), ("selector hypergradient", meta.hyper.selector_grads)]
        device = meta.train_loss.device
        bad = ~torch.stack([_max_abs(ts).to(device) for _, ts in parts]).isfinite()
        found_inf = bad.any().float() if defer else None
        names = [what for what, _ in parts]
        flags, ready = bad, None
        if defer and device.type == "cuda":
            flags = torch.empty(bad.shape, dtype=torch.bool, pin_memory=True)
            flags.copy_(bad, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        self._pending = _Pending(step, names, flags, ready)
        return found_inf

    def settle(self, state: TrainerState) -> bool:
        """Read the pending step's flags: count it, adjust the loss scale or raise.

        Returns:
            True if that step was skipped (False when nothing was pending).

        Raises:
            NonFiniteError: for a bad step without ``skip`` (its ``step`` attribute says which).
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        if pending.ready is not None:
            pending.ready.synchronize()  # that step's copy only, not what was queued after it
        bad = [what for what, flag in zip(pending.parts, pending.flags.tolist()) if flag]
        if not bad:
            if self.fp16:
                state.good_steps += 1
                if state.good_steps % FP16_GROWTH_INTERVAL == 0:
                    state.loss_scale *= 2
            return False
        overflow = self.fp16 and not any(what.endswith("loss") for what in bad)
        if overflow or self.skip:
            state.skipped_steps += 1
            state.good_steps = 0
            if overflow:
                state.loss_scale = max(state.loss_scale / 2, 1.0)
            return True
        raise NonFiniteError(
            f"step {pending.step}: the {' and the '.join(bad)} is not finite (NaN or inf); no parameter was "
            "changed. Check that batch for bad values, lower lr / selector_lr, or pass skip_nonfinite=True to "
            "skip such steps.",
            step=pending.step,
        )


def _max_abs(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """max |x| over ``tensors`` as a float32 scalar: NaN or inf exactly when some entry is.

    The infinity norm cannot overflow for finite entries (a 2-norm of finite float16 values
    can), and ``get_total_norm`` computes it with a few fused multi-tensor kernels rather than
    one small kernel per tensor, which matters because a step is usually launch-bound.
    """
    return get_total_norm(list(tensors), norm_type=math.inf).float()
