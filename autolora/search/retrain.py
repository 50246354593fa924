"""Retraining at the found ranks: plain AdamW steps with a linear warm-up and decay."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from autolora.config import check_int, check_positive
from autolora.errors import ConfigError
from autolora.layers import GatedLoRALinear
from autolora.logging.base import LoggerBase
from autolora.search.step import Search, apply, check, gradients, settle


def linear_warmup(total: int, warmup: int) -> Callable[[int], float]:
    """The retrain schedule's factor at step i: linear warm-up over ``warmup`` steps, then
    linear decay to 0 at ``total`` (for ``LambdaLR``)."""

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / max(1, warmup)
        return max(0.0, (total - i) / max(1, total - warmup))

    return factor


def check_retrain_args(epochs: object, lr: object, max_steps: object, warmup_ratio: object) -> None:
    """Raise a ``ConfigError`` for a bad argument of ``retrain``, naming it (as ``fit`` does)."""
    check_int("epochs", epochs, minimum=1)
    if lr is not None:
        check_positive("lr", lr)  # a negative lr would be gradient ascent, NaN poisons every weight
    if max_steps is not None:
        check_int("max_steps", max_steps, minimum=1)
    ok = isinstance(warmup_ratio, (int, float)) and not isinstance(warmup_ratio, bool)
    if not (ok and 0 <= warmup_ratio < 1):
        raise ConfigError(f"warmup_ratio={warmup_ratio!r} is invalid; it must be a number in [0, 1).")


def snapshot(model: nn.Module, names: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Copies of the state of modules ``names`` (the modules_to_save as a search starts)."""
    return {n: {k: v.detach().clone() for k, v in model.get_submodule(n).state_dict().items()} for n in names}


def restart(
    model: nn.Module,
    adapters: Mapping[str, GatedLoRALinear],
    saved: Mapping[str, Mapping[str, torch.Tensor]],
    lora_alpha: float,
    seed: int,
) -> None:
    """Fresh LoRA adapters at their current ranks (A random, B zero, PEFT's ``alpha / r_k``,
    gates fixed at 1), and the ``saved`` modules back at their :func:`snapshot`."""
    gen = torch.Generator().manual_seed(seed)
    for adapter in adapters.values():
        adapter.reinit(lora_alpha / adapter.rank, generator=gen)
    for name, state in saved.items():
        model.get_submodule(name).load_state_dict(state)


def retrain_loop(
    search: Search,
    batches: list,
    *,
    total: int,
    warmup: int,
    lr: float,
    seed: int,
    log_every: int,
    logger: LoggerBase,
    bar=None,
) -> None:
    """``total`` weight steps over ``batches`` in seeded random order (reshuffled each pass),
    logging ``retrain/loss`` and ``retrain/lr`` after the search's steps."""
    optimizer = search.weight_optimizer
    for group in optimizer.param_groups:
        group["lr"] = lr
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup(total, warmup))
    order = torch.Generator().manual_seed(seed)
    step = 0
    while step < total:
        for i in torch.randperm(len(batches), generator=order).tolist():
            meta = gradients(search, [batches[i]], None, engine=None)
            skip, found_inf = check(search, meta, step + 1, counts_as_step=False)
            if not skip:
                apply(optimizer, search.problem.weights, meta.weight_grads, search.config.max_grad_norm, found_inf)
            schedule.step()
            step += 1
            logged = step == 1 or step == total or step % log_every == 0
            if logged:  # reading the loss waits for the device: only on logged steps
                loss = float(meta.train_loss)
                logger.log_dict(
                    {"retrain/loss": loss, "retrain/lr": schedule.get_last_lr()[0]}, search.state.step + step
                )
            if bar is not None:
                bar.update(1)
                if logged:
                    bar.set_postfix(loss=f"{loss:.4f}")
            if step >= total:
                break
    settle(search, counts_as_step=False)
