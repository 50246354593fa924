"""Text-classification data: examples, the one reader of delimited files and the one
``datasets`` loader, tokenised batches and the metrics.

GLUE tasks (:mod:`autolora.run.glue`) have fixed layouts and use the same reader and loader;
other data names its text and label columns. Labels are mapped to class indices in a fixed
order, or read as floats for regression.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from autolora.errors import DataError
from autolora.logging.dashboard import progress_iter


@dataclass(frozen=True)
class Examples:
    """Texts (one tuple of 1 or 2 strings per example) and labels (int class or float score)."""

    texts: list[tuple[str, ...]]
    labels: list[float] | list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> Examples:
        return Examples([self.texts[i] for i in indices], [self.labels[i] for i in indices])


def read_delimited(path: Path, missing: str, delimiter: str | None = None) -> list[list[str]]:
    """The rows of a TSV or CSV file (header included), ``utf-8-sig``, TSVs with quoting off
    (GLUE-style TSVs contain bare quote characters). ``delimiter``: by the file's suffix
    unless given.

    Raises:
        DataError: ``missing`` if there is no such file.
    """
    if not path.is_file():
        raise DataError(missing)
    with path.open(encoding="utf-8-sig", newline="") as f:
        if (delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")) == "\t":
            return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        return list(csv.reader(f))


def load_hub(
    name: str,
    config: str | None,
    split: str,
    text_columns: Sequence[str],
    label_column: str,
    missing: str = "data.hub needs the optional 'datasets' package: pip install 'autolora[hub]', or give data files.",
) -> Examples:
    """A split of a ``datasets`` hub dataset (needs the network and the ``datasets`` package).

    Raises:
        DataError: ``missing`` if ``datasets`` is not installed.
    """
    try:
        import datasets
    except ImportError:
        raise DataError(missing) from None
    rows = datasets.load_dataset(name, config, split=split)
    return Examples([tuple(r[c] for c in text_columns) for r in rows], [r[label_column] for r in rows])


def _records(path: Path) -> list[tuple[int, dict]]:
    """(line number, {column: value}) for each row of a file with a header (TSV, CSV) or of
    JSON lines (each an object). Blank lines are skipped.

    Raises:
        DataError: for a missing file, bytes that are not UTF-8, a JSON line that is not an
            object, or a row with fewer or more cells than the header, naming the file and line.
    """
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".csv", ".jsonl") or not path.is_file():
        if not path.is_file():
            raise DataError(f"no such data file {str(path)!r}.")
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .tsv, .csv or .jsonl.")
    try:
        if suffix == ".jsonl":
            return json_records(path)
        header, *rows = read_delimited(path, f"no such data file {str(path)!r}.") or [[]]
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8.") from None
    sep = "tab-separated" if suffix == ".tsv" else "comma-separated"
    records = []
    for line, row in enumerate(rows, 2):  # csv lines: a quoted cell may span lines, rare in data files
        if not row or row == [""]:
            continue
        if len(row) != len(header):
            raise DataError(
                f"{path}:{line}: expected {len(header)} {sep} cells as in the header {header}, got {len(row)}; "
                "fix or remove that row."
            )
        records.append((line, dict(zip(header, row))))
    return records


def json_records(path: Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` of every non-blank line of a JSONL file.

    Raises:
        DataError: for a line that is not JSON or not an object, naming the file and line.
    """
    records = []
    for line, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line} is not valid JSON ({e.msg}).") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line}: each line must be a JSON object of columns, got {type(record).__name__}.")
        records.append((line, record))
    return records


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
    rows = _records(path)
    if not rows:
        raise DataError(f"{path} has no rows.")
    wanted = (*text_columns, label_column)
    missing = [c for c in wanted if c not in rows[0][1]]
    if missing:
        raise DataError(f"{path} has no column(s) {missing}; its columns are {list(rows[0][1])}.")
    for line, r in rows:
        bad = [c for c in wanted if r.get(c) is None or isinstance(r[c], (dict, list))]
        if bad:
            raise DataError(f"{path}:{line}: no value for column(s) {bad}; fix or remove that row.")
    raw = [str(r[label_column]).strip() for _, r in rows]
    if regression:
        values: list = []
        for (line, _), v in zip(rows, raw):
            try:
                values.append(float(v))
            except ValueError:
                raise DataError(f"{path}:{line}: regression labels must be numbers, got {v!r}.") from None
        order = None
    else:
        order = list(labels) if labels is not None else sorted(set(raw))
        unknown = sorted(set(raw) - set(order))
        if unknown:
            raise DataError(f"{path}: labels {unknown[:5]} are not in the label list {order}.")
        values = [order.index(v) for v in raw]
    texts = [tuple(str(r[c]) for c in text_columns) for _, r in rows]
    return Examples(texts, values), order


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


def predict(model, batches, metric: str = "accuracy", progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, gold labels) of ``model`` (in eval mode, no grad) over ``batches``: class
    indices, or scores for ``"pearson"``; a progress bar on a terminal unless ``progress=False``."""
    was_training = model.training
    model.eval()
    preds, golds = [], []
    with torch.no_grad():
        for batch in progress_iter(batches, "dev eval", progress):
            device = next(model.parameters()).device
            logits = model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits
            preds.append(logits.squeeze(-1) if metric == "pearson" else logits.argmax(-1))
            golds.append(batch["labels"])
    model.train(was_training)
    return torch.cat(preds).float().cpu(), torch.cat(golds).float().cpu()


def score(p: torch.Tensor, g: torch.Tensor, metric: str = "accuracy") -> float:
    """The task metric of predictions ``p`` against gold labels ``g``."""
    if metric == "pearson":
        return float(torch.corrcoef(torch.stack([p, g]))[0, 1])
    if metric == "mcc":
        tp, tn = float(((p == 1) & (g == 1)).sum()), float(((p == 0) & (g == 0)).sum())
        fp, fn = float(((p == 1) & (g == 0)).sum()), float(((p == 0) & (g == 1)).sum())
        denom = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
        return (tp * tn - fp * fn) / denom if denom else 0.0
    return float((p == g).float().mean())


def evaluate(model, batches, metric: str = "accuracy", progress: bool = True) -> float:
    """The task metric of ``model`` (in eval mode, no grad) over ``batches``."""
    return score(*predict(model, batches, metric, progress), metric)


def baseline(train_labels: Sequence, dev_labels: Sequence, metric: str) -> dict:
    """What predicting without the input scores on the dev labels: the train set's majority class
    (classification), or the train mean (regression, which has no correlation: 0)."""
    if metric == "pearson":
        return {"name": "mean predictor", "dev": 0.0}
    majority = max(sorted(set(train_labels)), key=list(train_labels).count)
    g = torch.tensor([float(v) for v in dev_labels])
    return {"name": f"majority class {majority}", "dev": score(torch.full_like(g, float(majority)), g, metric)}


def degenerate(preds: torch.Tensor, dev: float, base: dict, metric: str) -> list[str]:
    """Warnings for a run a user should not trust: one predicted class (or a constant score), or
    a dev score that does not beat the baseline."""
    out = []
    if metric == "pearson":
        if len(preds) > 1 and float(preds.std()) < 1e-6:
            out.append("every dev prediction is the same score: the model learned no signal.")
    elif len(preds.unique()) == 1:
        out.append(f"every dev prediction is class {int(preds[0])}: the model ignores its input.")
    if not dev > base["dev"]:  # also NaN (a constant prediction has no correlation)
        out.append(f"the dev {metric} {dev:.4f} does not beat the {base['name']} baseline ({base['dev']:.4f}).")
    return out
