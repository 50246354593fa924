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


def _first_dim(batch: Mapping) -> int | None:
    for key in ("input_ids", "inputs_embeds", "pixel_values", "attention_mask"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def check_labels(model: object, batch: object, what: str, *, defer_range: bool = False) -> torch.Tensor | None:
    """Raise a ``DataError`` naming the problem if a batch's ``labels`` do not fit the model:
    a count other than the batch's, and for a Hugging Face sequence classifier the dtype (floats
    would switch it to multi-label), the shape and the range of the classes.

    With ``defer_range`` the range of the classes is not read (that costs a device sync): the
    return value is then a device bool, True when some class is out of range (else ``None``)."""
    if not isinstance(batch, Mapping) or not isinstance(batch.get("labels"), torch.Tensor):
        return None
    labels, rows = batch["labels"], _first_dim(batch)
    if rows is not None and (labels.dim() == 0 or labels.shape[0] != rows):
        got = "a single value" if labels.dim() == 0 else f"{labels.shape[0]} labels"
        raise DataError(f"{what}: a batch of {rows} examples has {got}; give one label per example.")
    config = getattr(model, "config", None)
    if not type(model).__name__.endswith("ForSequenceClassification") or config is None:
        return None
    n, kind = int(config.num_labels), getattr(config, "problem_type", None)
    if kind == "multi_label_classification":
        if not labels.is_floating_point() or labels.dim() != 2 or labels.shape[1] != n:
            raise DataError(f"{what}: multi-label targets must be floats shaped (batch, {n}), got {_desc(labels)}.")
    elif n == 1 or kind == "regression":
        if not labels.is_floating_point():
            raise DataError(
                f"{what}: the model has one output (regression) but labels are {_desc(labels)}; give floats."
            )
    else:
        if labels.is_floating_point():
            raise DataError(
                f"{what}: labels are {_desc(labels)}, but the model classifies into {n} classes: floats would make "
                "Hugging Face train it as multi-label. Give class indices as torch.long."
            )
        if labels.dim() != 1:
            raise DataError(f"{what}: class labels must be shaped (batch,), got {_desc(labels)}.")
        out_of_range = (labels != -100) & ((labels < 0) | (labels >= n))
        if defer_range:
            return out_of_range.any()
        bad = labels[out_of_range]
        if bad.numel():
            raise DataError(
                f"{what}: label {int(bad[0])} is out of range; the model has {n} classes (0 to {n - 1}). "
                "Build the model with num_labels= the number of classes, or fix the labels."
            )
    return None


def _desc(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} shaped {tuple(t.shape)}"


def check_label_batches(model: object, data: Iterable, what: str) -> None:
    """:func:`check_labels` on every batch of a list or tuple, and on the first of other data
    (a DataLoader is not iterated twice)."""
    if isinstance(data, (list, tuple)):
        flags = [(i, check_labels(model, b, f"{what}[{i}]", defer_range=True)) for i, b in enumerate(data)]
        flags = [(i, f) for i, f in flags if f is not None]
        if flags:  # every batch's range in one device sync, not one each
            hits = torch.stack([f.to(flags[0][1].device) for _, f in flags]).tolist()
            for (i, _), hit in zip(flags, hits):
                if hit:
                    check_labels(model, data[i], f"{what}[{i}]")  # raises, naming the label
    else:
        for batch in data:
            check_labels(model, batch, f"{what} (first batch)")
            break


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
