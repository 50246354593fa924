"""Batches: checks, the seeded train/validation split, cycling, and moving to a device."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from autolora.errors import DataError


def check_reiterable(data: object, what: str) -> None:
    """Raise unless ``data`` can be iterated more than once (a DataLoader, a list of batches)."""
    if data is None or not isinstance(data, Iterable):
        raise DataError(
            f"{what} must be a re-iterable collection of batches (a DataLoader or a list), got {type(data).__name__}."
        )
    if iter(data) is data:
        raise DataError(
            f"{what} is a one-shot iterator ({type(data).__name__}), but fit() iterates it once per epoch; "
            "pass a DataLoader or a list of batches instead (e.g. list(your_iterator))."
        )


def check_nonempty(data: Iterable, what: str) -> None:
    size = len(data) if hasattr(data, "__len__") else sum(1 for _ in iter(data))
    if size == 0:
        raise DataError(f"{what} is empty; give at least one batch.")


def split_batches(batches: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded split of a list of batches: floor(fraction * n) (at least 1) become validation.

    Both parts keep the batches' original order.
    """
    n = len(batches)
    if n < 2:
        raise DataError(
            f"val_data=None splits the train batches into train and validation, which needs at least 2 "
            f"batches, got {n}; pass more batches or an explicit val_data."
        )
    n_val = max(1, int(fraction * n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx = set(perm[:n_val])
    return [b for i, b in enumerate(batches) if i not in val_idx], [b for i, b in enumerate(batches) if i in val_idx]


class Cycle:
    """Endless iteration over a re-iterable collection, counting the position in the cycle."""

    def __init__(self, data: Iterable) -> None:
        self.data = data
        self.position = 0
        self._it: Iterator | None = None

    def next(self) -> Any:
        if self._it is None:
            self._it = iter(self.data)
            for _ in range(self.position):  # resume mid-cycle
                next(self._it)
        try:
            item = next(self._it)
        except StopIteration:
            self._it, self.position = iter(self.data), 0
            item = next(self._it)
        self.position += 1
        return item


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested) batch to ``device``; everything else is left as is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(moved) if type(batch) in (list, tuple) else moved
    return batch


def lookahead(data: Iterable) -> Iterator[tuple[int, Any, bool]]:
    """``(index, item, is_last)`` over ``data``, knowing the last item without ``len``."""
    it = iter(data)
    sentinel = object()
    current = next(it, sentinel)
    i = 0
    while current is not sentinel:
        following = next(it, sentinel)
        yield i, current, following is sentinel
        current, i = following, i + 1


def fit_data(train_data: Iterable, val_data: Iterable | None, fraction: float, seed: int) -> tuple[Iterable, Iterable]:
    """Checked (train, validation) data; ``val_data=None`` splits the train batches
    (:func:`split_batches`)."""
    check_reiterable(train_data, "train_data")
    check_nonempty(train_data, "train_data")
    if val_data is None:
        return split_batches(list(train_data), fraction, seed)
    check_reiterable(val_data, "val_data")
    check_nonempty(val_data, "val_data")
    return train_data, val_data


def retrain_batches(train_data: Iterable, val_data: Iterable | None) -> list:
    """The batches of ``retrain``: the train batches, then the validation batches if given."""
    check_reiterable(train_data, "train_data")
    check_nonempty(train_data, "train_data")
    batches = list(train_data)
    if val_data is not None:
        check_reiterable(val_data, "val_data")
        batches += list(val_data)
    return batches
