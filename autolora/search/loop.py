"""The fit loop: batch -> step (with a selector step when due) -> the caller's logging and
checkpoint hook, until the epochs or steps of this call are spent.

The loop knows nothing of loggers or files: ``on_step`` is called after every step with its
losses, and decides what to log and when to checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autolora.data import Cycle, lookahead
from autolora.errors import ConfigError
from autolora.search.step import Search, selector_due, take_step
from autolora.state import TrainerState


@dataclass(frozen=True)
class Budget:
    """What one ``fit`` call may spend: ``epochs`` epoch ends and ``max_steps`` steps counted
    from ``(start_step, start_epoch)``, the counters when the call (or the call a checkpoint
    was written by) began."""

    start_step: int
    start_epoch: int
    epochs: int
    max_steps: int | None = None

    def out_of_steps(self, state: TrainerState) -> bool:
        return self.max_steps is not None and state.step - self.start_step >= self.max_steps

    def out_of_epochs(self, state: TrainerState) -> bool:
        return state.epoch - self.start_epoch >= self.epochs

    def steps_left(self, state: TrainerState, n_batches: int | None, accum: int) -> int | None:
        """The steps this call still takes (for a progress bar); ``None`` if unknown."""
        total = None
        if n_batches is not None:
            per_epoch = -(-n_batches // accum)
            total = per_epoch * (self.epochs - (state.epoch - self.start_epoch)) - -(-state.batch_in_epoch // accum)
        if self.max_steps is not None:
            left = self.max_steps - (state.step - self.start_step)
            total = left if total is None else min(total, left)
        return total


class StableStop:
    """Ends a search once its rank plan has stopped changing.

    Args:
        patience: How many consecutive logged plans must be identical.
        min_step: No stop before this step (e.g. a quarter of the call's budget), so that an
            early plateau of a still-growing update does not end the search.
    """

    def __init__(self, patience: int, min_step: int = 0) -> None:
        self.patience, self.min_step = patience, min_step
        self._plans: list[dict[str, int]] = []

    def update(self, step: int, ranks: dict[str, int]) -> bool:
        """Record the plan at ``step``; True when the search should stop here."""
        self._plans = [*self._plans[-(self.patience - 1) :], dict(ranks)] if self.patience > 1 else [dict(ranks)]
        stable = len(self._plans) == self.patience and all(p == self._plans[-1] for p in self._plans)
        return stable and step >= self.min_step


def micro_batches(data: Iterable, accum: int, skip: int) -> Iterator[tuple[int, list, bool]]:
    """``(index of the group's last batch, group of up to accum batches, is the epoch's last)``,
    after skipping the first ``skip`` batches (to continue mid-epoch)."""
    group: list[Any] = []
    for i, batch, is_last in lookahead(data):
        if i < skip:
            continue
        group.append(batch)
        if len(group) == accum or is_last:
            yield i, group, is_last
            group = []


def _end_epoch(state: TrainerState) -> None:
    state.epoch += 1
    state.batch_in_epoch = 0


def fit_loop(
    search: Search,
    train_data: Iterable,
    val: Cycle,
    budget: Budget,
    on_step: Callable[[dict[str, torch.Tensor]], bool | None],
) -> None:
    """Take steps until ``budget`` is spent or ``on_step`` returns True (stop now); ``val`` is
    cycled for the selector steps."""
    state, accum = search.state, search.config.grad_accum_steps
    while not budget.out_of_epochs(state) and not budget.out_of_steps(state):
        epoch_ended = False
        for i, group, is_last in micro_batches(train_data, accum, skip=state.batch_in_epoch):
            val_group = [val.next() for _ in group] if selector_due(search) else None
            losses = take_step(search, group, val_group)
            state.batch_in_epoch, state.val_position = i + 1, val.position
            if is_last:
                _end_epoch(state)
                epoch_ended = True
            if on_step(losses):
                state.stopped_stable = True
                return
            if budget.out_of_steps(state) or epoch_ended:
                break
        if not epoch_ended and not budget.out_of_steps(state):  # an empty epoch (nothing left to skip to)
            _end_epoch(state)


def check_fit_args(epochs, max_steps, checkpoint_every, keep_checkpoints, resume, checkpoint_dir) -> None:
    """Raise a ``ConfigError`` for a bad argument of ``fit``, naming it."""
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs={epochs!r} is invalid; it must be an integer >= 1.")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ConfigError(f"max_steps={max_steps!r} is invalid; it must be an integer >= 1 or None.")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ConfigError(f"checkpoint_every={checkpoint_every!r} is invalid; it must be an integer >= 1.")
    if not isinstance(keep_checkpoints, int) or keep_checkpoints < 1:
        raise ConfigError(f"keep_checkpoints={keep_checkpoints!r} is invalid; it must be an integer >= 1.")
    if checkpoint_dir is not None and Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
        raise ConfigError(f"checkpoint_dir={str(checkpoint_dir)!r} is a file; give a folder path.")
    if (resume or checkpoint_every) and checkpoint_dir is None:
        raise ConfigError("resume=True and checkpoint_every need checkpoint_dir=<folder> to know where to look.")
