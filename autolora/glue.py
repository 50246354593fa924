"""GLUE tasks: read the standard TSV files (or the ``datasets`` hub copy) and batch them.

The TSV layouts differ per task: CoLA has no header, MRPC starts with a byte-order mark, texts
contain quote characters, so files are read with ``quoting`` off and ``utf-8-sig``.
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from autolora.errors import DataError


@dataclass(frozen=True)
class TaskSpec:
    """How one GLUE task's TSV is laid out.

    Attributes:
        text_columns: Column indices of the one or two input texts.
        label_column: Column index of the label.
        header: Whether the first row is a header.
        labels: The label strings in class order; ``None`` for regression (STS-B).
        hub: (dataset config name, text field names) in the ``datasets`` GLUE copy.
        metric: ``"accuracy"``, ``"mcc"`` or ``"pearson"``.
    """

    text_columns: tuple[int, ...]
    label_column: int
    header: bool
    labels: tuple[str, ...] | None
    hub: tuple[str, tuple[str, ...]]
    metric: str = "accuracy"

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


TASKS: dict[str, TaskSpec] = {
    "CoLA": TaskSpec((3,), 1, False, ("0", "1"), ("cola", ("sentence",)), "mcc"),
    "SST-2": TaskSpec((0,), 1, True, ("0", "1"), ("sst2", ("sentence",))),
    "MRPC": TaskSpec((3, 4), 0, True, ("0", "1"), ("mrpc", ("sentence1", "sentence2"))),
    "RTE": TaskSpec((1, 2), 3, True, ("entailment", "not_entailment"), ("rte", ("sentence1", "sentence2"))),
    "STS-B": TaskSpec((7, 8), 9, True, None, ("stsb", ("sentence1", "sentence2")), "pearson"),
    "QNLI": TaskSpec((1, 2), 3, True, ("entailment", "not_entailment"), ("qnli", ("question", "sentence"))),
    "WNLI": TaskSpec((1, 2), 3, True, ("0", "1"), ("wnli", ("sentence1", "sentence2"))),
}


@dataclass(frozen=True)
class Examples:
    """Texts (one tuple of 1 or 2 strings per example) and labels (int class or float score)."""

    texts: list[tuple[str, ...]]
    labels: list[float] | list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> Examples:
        return Examples([self.texts[i] for i in indices], [self.labels[i] for i in indices])


def task_spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise DataError(f"unknown GLUE task {task!r}; choose one of {', '.join(TASKS)}.")
    return TASKS[task]


def read_tsv(path: str | os.PathLike, task: str) -> Examples:
    """Read a GLUE TSV file of ``task``.

    Raises:
        DataError: if the file is missing or a row does not fit the task's layout.
    """
    spec, path = task_spec(task), Path(path)
    if not path.is_file():
        raise DataError(f"no such file {str(path)!r}; point data_dir at a folder holding {task}/train.tsv and dev.tsv.")
    texts, labels = [], []
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if spec.header:
            next(rows, None)
        width = max(*spec.text_columns, spec.label_column) + 1
        for line, row in enumerate(rows, start=2 if spec.header else 1):
            if len(row) < width:
                raise DataError(f"{path}:{line}: expected at least {width} tab-separated columns, got {len(row)}.")
            raw = row[spec.label_column].strip()
            if spec.labels is None:
                labels.append(float(raw))
            elif raw in spec.labels:
                labels.append(spec.labels.index(raw))
            else:
                raise DataError(f"{path}:{line}: label {raw!r} is not one of {spec.labels}.")
            texts.append(tuple(row[c].strip() for c in spec.text_columns))
    return Examples(texts, labels)


def load_glue(task: str, split: str, data_dir: str | os.PathLike | None = None) -> Examples:
    """``split`` ("train" or "dev") of ``task`` from ``data_dir/<task>/<split>.tsv``, or from the
    ``datasets`` hub copy of GLUE when no ``data_dir`` is given (needs network)."""
    if data_dir is not None:
        return read_tsv(Path(data_dir) / task / f"{split}.tsv", task)
    spec = task_spec(task)
    try:
        import datasets
    except ImportError:
        raise DataError(
            "no data_dir given and the 'datasets' package is missing; pip install datasets, "
            "or pass data_dir pointing at the GLUE TSV files."
        ) from None
    name, fields = spec.hub
    rows = datasets.load_dataset("nyu-mll/glue", name, split="validation" if split == "dev" else split)
    return Examples([tuple(r[f] for f in fields) for r in rows], [r["label"] for r in rows])


def make_batches(
    tokenizer,
    examples: Examples,
    batch_size: int = 32,
    max_length: int = 128,
    shuffle: bool = False,
    seed: int = 0,
    regression: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Tokenised batches with dynamic padding (each batch padded to its own longest row)."""
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        columns = list(zip(*[examples.texts[i] for i in idx]))
        enc = tokenizer(*columns, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        labels = [examples.labels[i] for i in idx]
        enc = dict(enc)
        enc["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
        batches.append(enc)
    return batches


def evaluate(model, batches, metric: str = "accuracy") -> float:
    """The task metric of ``model`` (in eval mode, no grad) over ``batches``."""
    was_training = model.training
    model.eval()
    preds, golds = [], []
    with torch.no_grad():
        for batch in batches:
            device = next(model.parameters()).device
            logits = model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits
            preds.append(logits.squeeze(-1) if metric == "pearson" else logits.argmax(-1))
            golds.append(batch["labels"])
    model.train(was_training)
    p, g = torch.cat(preds).float().cpu(), torch.cat(golds).float().cpu()
    if metric == "pearson":
        return float(torch.corrcoef(torch.stack([p, g]))[0, 1])
    if metric == "mcc":
        tp, tn = float(((p == 1) & (g == 1)).sum()), float(((p == 0) & (g == 0)).sum())
        fp, fn = float(((p == 1) & (g == 0)).sum()), float(((p == 0) & (g == 1)).sum())
        denom = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
        return (tp * tn - fp * fn) / denom if denom else 0.0
    return float((p == g).float().mean())
