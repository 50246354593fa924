"""The GLUE readers on the real TSV files in ../shared/data/glue (skipped where absent)."""

import json
import os
from pathlib import Path

import pytest
import torch

from autolora import DataError
from autolora.run.glue import TASKS, read_tsv
from autolora.run.text import evaluate, make_batches

GLUE = Path(os.environ.get("AUTOLORA_GLUE_DIR", Path(__file__).resolve().parents[3] / "shared" / "data" / "glue"))
needs_glue = pytest.mark.skipif(not (GLUE / "row_counts.json").is_file(), reason="GLUE TSVs not present")


def _counts():
    return [
        (r["task"], r["file"], r)
        for r in json.loads((GLUE / "row_counts.json").read_text())
        if r["task"] in TASKS and r["file"] in ("train.tsv", "dev.tsv") and (GLUE / r["task"] / r["file"]).is_file()
    ]


@needs_glue
def test_row_counts_and_labels_match_the_files():
    seen = 0
    for task, file, record in _counts():
        ex = read_tsv(GLUE / task / file, task)
        assert len(ex) == record["rows"], (task, file)
        spec = TASKS[task]
        if spec.labels is not None:
            counts = {spec.labels[k]: v for k, v in zip(*torch.tensor(ex.labels).unique(return_counts=True))}
            assert {k: int(v) for k, v in counts.items()} == record["labels"], (task, file)
        assert all(all(t for t in texts) for texts in ex.texts[:50])
        seen += 1
    assert seen >= 13  # 6 tasks x (train, dev) + QNLI dev


@needs_glue
def test_mrpc_bom_and_quotes():
    ex = read_tsv(GLUE / "MRPC" / "train.tsv", "MRPC")
    assert ex.labels[0] == 1 and ex.texts[0][0].startswith("Amrozi") and '" the witness "' in ex.texts[0][0]


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_tsv(tmp_path / "nope.tsv", "SST-2")
    (tmp_path / "bad.tsv").write_text("sentence\tlabel\nfine\t7\n")
    with pytest.raises(DataError, match="label '7'"):
        read_tsv(tmp_path / "bad.tsv", "SST-2")
    with pytest.raises(DataError, match="unknown GLUE task"):
        read_tsv(tmp_path / "bad.tsv", "SST-3")


def test_metrics():
    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.logits = logits

        def forward(self, **batch):
            return type("Out", (), {"logits": self.logits})()

    batch = {"input_ids": torch.zeros(4, 1), "labels": torch.tensor([1, 0, 1, 1])}
    model = Fixed(torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    assert evaluate(model, [batch]) == 0.75
    assert evaluate(model, [batch], "mcc") == pytest.approx((2 * 1 - 0 * 1) / (2 * 3 * 1 * 2) ** 0.5)


def test_make_batches_pads_dynamically():
    class Tok:
        def __call__(self, *columns, truncation, max_length, padding, return_tensors):
            n = max(len(t.split()) for t in columns[0])
            return {"input_ids": torch.zeros(len(columns[0]), n, dtype=torch.long)}

    from autolora.run.glue import Examples

    ex = Examples([("a b c",), ("a",), ("a b",)], [0, 1, 0])
    batches = make_batches(Tok(), ex, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 3), (1, 2)]
    assert batches[0]["labels"].tolist() == [0, 1]
