"""``evaluate_run`` / ``load_adapted`` on a classification run whose head is not the default size:
the exported adapter, in stock PEFT, scores what the run reported. (The CLI's ``autolora evaluate``
is tested on the runs of tests/run/test_cli.py and test_causal.py.)"""

import pytest

from autolora import evaluate_run, load_adapted
from autolora.run import pipeline
from autolora.run.config import build_config
from tests.run.test_pipeline import WORDS, tiny_model  # noqa: F401  (the fixture)


def test_a_three_class_run_on_a_two_class_checkpoint_trains_and_reloads(tmp_path, tiny_model):  # noqa: F811
    rows = [(f"{WORDS[i % 8]} {WORDS[(i * 3) % 8]}", ("neg", "pos", "meh")[i % 3]) for i in range(30)]
    for name, part in (("train.csv", rows[:21]), ("dev.csv", rows[21:])):
        (tmp_path / name).write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in part))
    cfg = build_config(
        {
            "model": {"name_or_path": str(tiny_model), "max_length": 8, "device": "cpu"},
            "data": {
                "train_file": str(tmp_path / "train.csv"),
                "dev_file": str(tmp_path / "dev.csv"),
                "text_columns": ["text"],
                "batch_size": 4,
            },
            "search": {"max_rank": 2, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
            "fit": {"epochs": 1},
            "retrain": {"epochs": 1},
            "logging": {"progress": False, "loggers": ["jsonl"]},
            "output_dir": str(tmp_path / "run"),
        }
    )
    metrics = pipeline.train(cfg)  # the tiny checkpoint has a 2-label head: replaced by a 3-label one
    model, _ = load_adapted(tmp_path / "run")
    assert model.base_model.model.config.num_labels == 3
    result = evaluate_run(tmp_path / "run")
    assert result["metric"] == "accuracy" and result["reported"] == metrics["dev"]
    assert result["dev"] == pytest.approx(metrics["dev"], abs=1e-6)
