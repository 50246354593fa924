"""GLUE tasks: their TSV layouts, labels and metrics, read with :mod:`autolora.run.text`.

The TSV layouts differ per task: CoLA has no header, MRPC starts with a byte-order mark, texts
contain quote characters, so files are read with ``quoting`` off and ``utf-8-sig``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from autolora.errors import DataError
from autolora.run.text import Examples, load_hub, read_delimited


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
    missing = f"no such file {str(path)!r}; point data_dir at a folder holding {task}/train.tsv and dev.tsv."
    try:
        rows = read_delimited(path, missing, delimiter="\t")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}).") from None
    if spec.header:
        rows = rows[1:]
    width = max(*spec.text_columns, spec.label_column) + 1
    texts, labels = [], []
    for line, row in enumerate(rows, start=2 if spec.header else 1):
        if len(row) < width:
            raise DataError(f"{path}:{line}: expected at least {width} tab-separated columns, got {len(row)}.")
        raw = row[spec.label_column].strip()
        if spec.labels is None:
            try:
                labels.append(float(raw))
            except ValueError:
                raise DataError(f"{path}:{line}: label {raw!r} is not a number.") from None
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
    name, fields = task_spec(task).hub
    missing = (
        "no data_dir given, and loading GLUE from the hub needs the optional 'datasets' package: "
        "pip install 'autolora[hub]', or pass data_dir (data.path) pointing at the GLUE TSV files."
    )
    return load_hub("nyu-mll/glue", name, "validation" if split == "dev" else split, fields, "label", missing)
