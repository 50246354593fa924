"""Reading your own text data: TSV (quoting off), CSV, JSON lines; labels and regression."""

import json

import pytest
import torch

from autolora import DataError
from autolora.run.text import Examples, evaluate, make_batches, read_table


def test_tsv_csv_and_jsonl_give_the_same_examples(tmp_path):
    rows = [('a "quoted" text', "pos"), ("second", "neg"), ("third", "pos")]
    (tmp_path / "d.tsv").write_text("\ufefftext\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    (tmp_path / "d.csv").write_text(
        "text,label\n" + "".join(f'"{t.replace(chr(34), chr(34) * 2)}",{y}\n' for t, y in rows)
    )
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    for name in ("d.tsv", "d.csv", "d.jsonl"):
        examples, order = read_table(tmp_path / name, ["text"], "label")
        assert order == ["neg", "pos"]  # sorted distinct labels
        assert examples.texts[0] == ('a "quoted" text',) and examples.labels == [1, 0, 1]


def test_pairs_regression_and_a_given_label_order(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"a": "x", "b": "y", "score": "3.5"}) + "\n")
    examples, order = read_table(path, ["a", "b"], "score", regression=True)
    assert examples.texts == [("x", "y")] and examples.labels == [3.5] and order is None
    path.write_text(json.dumps({"a": "x", "b": "y", "score": "hi"}) + "\n")
    examples, order = read_table(path, ["a", "b"], "score", labels=["lo", "hi"])
    assert examples.labels == [1] and order == ["lo", "hi"]


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        ("text\tlabel\nx\tz\n", {"labels": ["a", "b"]}, r"labels \['z'\] are not in the label list"),
        ("sentence\tlabel\nx\ta\n", {}, r"has no column\(s\) \['text'\]; its columns are \['sentence', 'label'\]"),
        ("text\tlabel\n", {}, "has no rows"),
        ("text\tlabel\nx\tnot-a-number\n", {"regression": True}, "regression labels must be numbers"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, content, kwargs, message):
    path = tmp_path / "d.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_table(path, ["text"], "label", **kwargs)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_table(tmp_path / "nope.tsv", ["text"], "label")
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '\.parquet'"):
        read_table(tmp_path / "d.parquet", ["text"], "label")
    (tmp_path / "bad.jsonl").write_text('{"text": "x", "label": "a"}\n{broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2 is not valid JSON"):
        read_table(tmp_path / "bad.jsonl", ["text"], "label")


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

    ex = Examples([("a b c",), ("a",), ("a b",)], [0, 1, 0])
    batches = make_batches(Tok(), ex, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 3), (1, 2)]
    assert batches[0]["labels"].tolist() == [0, 1]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("t.tsv", "text\tlabel\ngood\tpos\nfine\nbad\tneg\n", r"t\.tsv:3: expected 2 tab-separated cells"),
        ("t.csv", "text,label\ngood,pos\nfine\n", r"t\.csv:3: expected 2 comma-separated cells"),
        ("t.csv", "text,label\ngood,pos\nfine,bad,neg\n", r"t\.csv:3: expected 2 comma-separated cells"),
        (
            "t.jsonl",
            '{"text": "a", "label": "pos"}\n{"text": "b"}\n',
            r"t\.jsonl:2: no value for column\(s\) \['label'\]",
        ),
        ("t.jsonl", '{"text": "a", "label": "pos"}\n[1, 2]\n', r"t\.jsonl:2: each line must be a JSON object"),
        ("t.jsonl", '{"text": "a", "label": null}\n', r"t\.jsonl:1: no value for column"),
    ],
)
def test_a_short_or_malformed_row_is_an_error_naming_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_table(path, ["text"], "label")


def test_non_numeric_regression_labels_and_bad_bytes_name_the_line(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("text,label\ngood,1.5\nbad,x\n")
    with pytest.raises(DataError, match=r"r\.csv:3: regression labels must be numbers, got 'x'"):
        read_table(path, ["text"], "label", regression=True)
    path.write_bytes(b"text,label\n\xff\xfe,1\n")
    with pytest.raises(DataError, match="is not UTF-8"):
        read_table(path, ["text"], "label")


def test_a_run_that_does_not_beat_the_majority_class_is_flagged():
    from autolora.run.text import baseline, degenerate

    base = baseline([1, 1, 0, 1], [1, 0, 1, 1], "accuracy")
    assert base == {"name": "majority class 1", "dev": 0.75}
    all_ones = torch.ones(4)
    warnings = degenerate(all_ones, 0.75, base, "accuracy")
    assert any("every dev prediction is class 1" in w for w in warnings)
    assert any("does not beat the majority class 1 baseline (0.7500)" in w for w in warnings)
    assert degenerate(torch.tensor([1.0, 0.0, 1.0, 1.0]), 1.0, base, "accuracy") == []
    assert baseline([0, 1, 1], [0, 1], "mcc")["dev"] == 0.0
    flat = degenerate(torch.full((3,), 2.0), float("nan"), baseline([1.0, 2.0], [1.0, 3.0], "pearson"), "pearson")
    assert len(flat) == 2 and "mean predictor" in flat[1]


def test_the_hub_path_without_datasets_says_how_to_install_it(monkeypatch):
    import sys

    from autolora.run.glue import load_glue
    from autolora.run.text import load_hub

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"pip install 'autolora\[hub\]'"):
        load_hub("glue", "mrpc", "train", ["sentence1"], "label")
    with pytest.raises(DataError, match=r"pip install 'autolora\[hub\]'"):
        load_glue("MRPC", "train")
