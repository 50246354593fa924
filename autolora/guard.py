"""The non-finite guard: every loss and gradient of a step is checked before any update."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn.utils import get_total_norm

from autolora.errors import NonFiniteError
from autolora.hypergrad import MetaGrads
from autolora.state import FP16_GROWTH_INTERVAL, TrainerState


def check_step(meta: MetaGrads, step: int, state: TrainerState, *, fp16: bool, skip: bool) -> bool:
    """True if this step must be skipped; raises ``NonFiniteError`` unless ``skip``.

    All checks cost one device sync. With float16 autocast, non-finite gradients under finite
    losses are a loss-scale overflow: the step is skipped and ``state.loss_scale`` halved (as
    ``GradScaler`` does); after ``FP16_GROWTH_INTERVAL`` good steps the scale doubles.
    Skipped steps are counted in ``state.skipped_steps``.
    """
    groups = [("train loss", [meta.train_loss]), ("weight gradient", meta.weight_grads)]
    if meta.hyper is not None:
        groups += [("validation loss", [meta.hyper.val_loss]), ("selector hypergradient", meta.hyper.selector_grads)]
    device = meta.train_loss.device
    flags = torch.stack([_max_abs(ts).to(device) for _, ts in groups]).isfinite().tolist()  # the one sync
    bad = [what for (what, _), ok in zip(groups, flags) if not ok]
    if not bad:
        if fp16:
            state.good_steps += 1
            if state.good_steps % FP16_GROWTH_INTERVAL == 0:
                state.loss_scale *= 2
        return False
    overflow = fp16 and not any(what.endswith("loss") for what in bad)
    if overflow or skip:
        state.skipped_steps += 1
        state.good_steps = 0
        if overflow:
            state.loss_scale = max(state.loss_scale / 2, 1.0)
        return True
    raise NonFiniteError(
        f"step {step}: the {' and the '.join(bad)} is not finite (NaN or inf); no parameter was changed. "
        "Check that batch for bad values, lower lr / selector_lr, or pass skip_nonfinite=True to skip such steps."
    )


def _max_abs(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """max |x| over ``tensors`` as a float32 scalar: NaN or inf exactly when some entry is.

    The infinity norm cannot overflow for finite entries (a 2-norm of finite float16 values
    can), and ``get_total_norm`` computes it with a few fused multi-tensor kernels rather than
    one small kernel per tensor, which matters because a step is usually launch-bound.
    """
    return get_total_norm(list(tensors), norm_type=math.inf).float()
