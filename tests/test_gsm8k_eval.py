"""experiments/gsm8k_eval.py: the final-answer rule, and the whole script on a tiny run."""

import json
from pathlib import Path

import pytest

from experiments.gsm8k_eval import exact_match, final_answer

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so 9 * 2 = 18\n#### 18", "18"),
        ("#### $1,000.", "1000"),
        ("#### 3.50 dollars", "3.5"),
        ("#### -7", "-7"),
        ("first #### 4 then #### 5", "4"),
        ("the answer is 18", None),
        ("#### none", None),
    ],
)
def test_final_answer(text, answer):
    assert final_answer(text) == answer


def test_exact_match_counts_a_missing_answer_as_wrong():
    golds = ["... #### 18", "... #### 1,200", "#### 3"]
    assert exact_match(["#### 18", "#### 1200.00", "3"], golds) == pytest.approx(2 / 3)


@pytest.mark.skipif(not (GSM8K / "test.jsonl").is_file(), reason="needs ../shared/data/gsm8k")
def test_script_scores_a_run_with_and_without_its_adapter(tmp_path):
    from autolora.run.cli import main as cli
    from experiments.gsm8k_eval import main
    from experiments.tiny_lm import make_tiny_lm

    model, run, out = make_tiny_lm(tmp_path / "lm"), tmp_path / "run", tmp_path / "gsm8k.jsonl"
    overrides = [f"model.name_or_path={model}", "model.device=cpu", f"output_dir={run}", "data.limit=8"]
    overrides += ["data.dev_limit=3", "data.batch_size=4", "fit.max_steps=2", "retrain.enabled=false"]
    overrides += [f"data.train_file={GSM8K / 'train.jsonl'}", f"data.dev_file={GSM8K / 'test.jsonl'}"]
    overrides += ["model.max_length=2048", "logging.progress=false"]
    assert cli(["train", "configs/smollm2-gsm8k.yaml", *overrides]) == 0
    assert main([str(run), "--max-new-tokens", "3", "--batch-size", "2", "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["dev_rows"] == 3 and row["max_new_tokens"] == 3
    for name in ("adapter", "base"):  # a random byte-level model writes no "#### <n>" in 3 tokens
        assert row[f"{name}_exact_match"] == 0.0 and row[f"{name}_answered"] == 0.0
    assert row["dev_loss"] == json.loads((run / "metrics.json").read_text())["dev_loss"]
