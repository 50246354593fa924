"""The GLUE readers on the real TSV files in ../shared/data/glue (skipped where absent)."""

import json
import os
from pathlib import Path

import pytest
import torch

from autolora import DataError
from autolora.run.glue import TASKS, read_tsv

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


def test_a_short_row_or_a_bad_score_names_the_line(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\ta\tb\n0\t3\t4\tc\n")
    with pytest.raises(DataError, match=r"dev\.tsv:3: expected at least 5 tab-separated columns, got 4"):
        read_tsv(path, "MRPC")
    header = "\t".join(f"c{i}" for i in range(10))
    path.write_text(header + "\n" + "\t".join(["x"] * 9 + ["high"]) + "\n")
    with pytest.raises(DataError, match=r"dev\.tsv:2: label 'high' is not a number"):
        read_tsv(path, "STS-B")
