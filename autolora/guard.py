"""The non-finite guard: every loss and gradient of a step is checked before any update."""

from __future__ import annotations

import torch

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
    losses = [("train loss", [meta.train_loss])]
    grads = [("weight gradient", meta.weight_grads)]
    if meta.hyper is not None:
        losses.append(("validation loss", [meta.hyper.val_loss]))
        grads.append(("selector hypergradient", meta.hyper.selector_grads))
    checks = [(what, t) for what, ts in losses + grads for t in ts]
    device = meta.train_loss.device
    flags = torch.stack([torch.isfinite(t).all().to(device) for _, t in checks]).tolist()
    bad = list(dict.fromkeys(what for (what, _), ok in zip(checks, flags) if not ok))
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
