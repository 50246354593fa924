"""Text-classification data from files (TSV, CSV, JSON lines) or a ``datasets`` hub name.

GLUE tasks have fixed layouts (see :mod:`autolora.glue`); other data names its text and label
columns. Labels are mapped to class indices in a fixed order, or read as floats for regression.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

from autolora.errors import DataError
from autolora.glue import Examples


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"no such data file {str(path)!r}.")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i} is not valid JSON ({e.msg}).") from None
        return rows
    if suffix not in (".tsv", ".csv"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .tsv, .csv or .jsonl.")
    with path.open(encoding="utf-8-sig", newline="") as f:
        if suffix == ".tsv":  # quoting off: GLUE-style TSVs contain bare quote characters
            return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        return list(csv.DictReader(f))


def read_table(
    path: str | os.PathLike,
    text_columns: Sequence[str],
    label_column: str,
    labels: Sequence[str] | None = None,
    regression: bool = False,
) -> tuple[Examples, list[str] | None]:
    """Examples from a file with a header row (or JSON keys); returns them and the label order.

    With ``labels=None`` for classification, the order is the sorted distinct labels of this file
    (pass the train file's order on to the dev file).

    Raises:
        DataError: for a missing file, a missing column or an unknown label.
    """
    path = Path(path)
    rows = _rows(path)
    if not rows:
        raise DataError(f"{path} has no rows.")
    missing = [c for c in (*text_columns, label_column) if c not in rows[0]]
    if missing:
        raise DataError(f"{path} has no column(s) {missing}; its columns are {list(rows[0])}.")
    raw = [str(r[label_column]).strip() for r in rows]
    if regression:
        try:
            values: list = [float(v) for v in raw]
        except ValueError as e:
            raise DataError(f"{path}: regression labels must be numbers ({e}).") from None
        order = None
    else:
        order = list(labels) if labels is not None else sorted(set(raw))
        unknown = sorted(set(raw) - set(order))
        if unknown:
            raise DataError(f"{path}: labels {unknown[:5]} are not in the label list {order}.")
        values = [order.index(v) for v in raw]
    texts = [tuple(str(r[c]) for c in text_columns) for r in rows]
    return Examples(texts, values), order


def load_hub(name: str, config: str | None, split: str, text_columns: Sequence[str], label_column: str) -> Examples:
    """A split of a ``datasets`` hub dataset (needs the network and the ``datasets`` package)."""
    try:
        import datasets
    except ImportError:
        raise DataError("data.hub needs the 'datasets' package; pip install datasets, or give data files.") from None
    rows = datasets.load_dataset(name, config, split=split)
    return Examples([tuple(r[c] for c in text_columns) for r in rows], [r[label_column] for r in rows])
