"""What ``autolora train`` / ``export`` run, directly, on a tiny random BERT saved to disk."""

import json

import pytest

from autolora import ConfigError, DataError
from autolora.run import pipeline
from autolora.run.config import build_config

WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "sad"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(str(folder))
    cfg = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, vocab_size=13)
    BertForSequenceClassification(cfg).save_pretrained(str(folder))
    return folder


def _files(tmp_path):
    rows = [(f"{WORDS[i % 8]} {WORDS[(i * 3) % 8]}", "pos" if i % 2 else "neg") for i in range(24)]
    for name, part in (("train.csv", rows[:16]), ("dev.csv", rows[16:])):
        (tmp_path / name).write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in part))
    return tmp_path / "train.csv", tmp_path / "dev.csv"


def _config(tmp_path, model, **sections):
    train, dev = _files(tmp_path)
    raw = {
        "model": {"name_or_path": str(model), "max_length": 8, "device": "cpu"},
        "data": {"train_file": str(train), "dev_file": str(dev), "text_columns": ["text"], "batch_size": 4},
        "search": {"max_rank": 2, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
        "fit": {"epochs": 1, "checkpoint_every": 2},
        "logging": {"log_every": 1, "progress": False, "loggers": ["jsonl"]},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return build_config(raw)


def test_load_examples_from_files_maps_labels_in_train_order(tmp_path, tiny_model):
    train, dev, num_labels, metric = pipeline.load_examples(_config(tmp_path, tiny_model))
    assert (len(train), len(dev), num_labels, metric) == (16, 8, 2, "accuracy")
    assert set(train.labels) == {0, 1}
    limited, *_ = pipeline.load_examples(_config(tmp_path, tiny_model, data={"limit": 5}))
    assert len(limited) == 5


def test_train_writes_the_run_folder_and_export_recuts_it(tmp_path, tiny_model):
    cfg = _config(tmp_path, tiny_model, retrain={"epochs": 1})
    metrics = pipeline.train(cfg)
    run = tmp_path / "run"
    assert metrics["search_steps"] == 3 and metrics["dev_examples"] == 8  # 4 batches -> 3 train + 1 val
    for name in ("config.yaml", "ranks.json", "metrics.json", "logs/metrics.jsonl", "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "metrics.json").read_text())["ranks"] == metrics["ranks"]
    out = pipeline.export(run, None, target_rank=1)
    ranks = json.loads((out / "ranks.json").read_text())["ranks"]
    assert set(ranks.values()) == {1}
    again = pipeline.train(cfg)  # the same config resumes (the search is already done)
    assert again["search_steps"] == 3


def test_prepare_run_dir_refuses_another_config(tmp_path):
    pipeline.prepare_run_dir(tmp_path, {"a": 1})
    pipeline.prepare_run_dir(tmp_path, {"a": 1})
    with pytest.raises(ConfigError, match="another config"):
        pipeline.prepare_run_dir(tmp_path, {"a": 2})


def test_bad_inputs_fail_before_the_run_folder(tmp_path, tiny_model):
    cfg = _config(tmp_path, tiny_model, data={"dev_file": str(tmp_path / "missing.csv")})
    with pytest.raises(DataError, match="no such data file"):
        pipeline.train(cfg)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="is not installed"):
        pipeline.resolve_model_path("package:no_such_autolora_model")
    with pytest.raises(DataError, match=r"no config\.yaml"):
        pipeline.export(tmp_path, None)


def test_a_non_empty_folder_that_is_not_a_run_folder_is_refused_untouched(tmp_path, tiny_model):
    cfg = _config(tmp_path, tiny_model)
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "mine.bin").write_bytes(b"user data")
    (run / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match="not an autolora run folder"):
        pipeline.train(cfg)
    assert sorted(p.name for p in run.rglob("*")) == ["adapter", "metrics.json", "mine.bin"]
    assert (run / "metrics.json").read_text() == "{}"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        pipeline.prepare_run_dir(tmp_path / "file", {"a": 1})


def test_a_missing_model_folder_and_a_tagged_saved_config_are_config_errors(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="is not a folder"):
        pipeline.resolve_model_path(str(tmp_path / "no-model"))
    (tmp_path / "config.yaml").write_text("model: !!python/object/apply:os.system [echo]\n")
    with pytest.raises(ConfigError, match="not valid plain YAML"):
        pipeline.export(tmp_path, None)


def test_a_rerun_skips_the_retrain_and_the_metrics_carry_the_baseline(tmp_path, tiny_model, monkeypatch):
    import autolora.trainer

    cfg = _config(tmp_path, tiny_model, retrain={"epochs": 1})
    first = pipeline.train(cfg)
    assert first["baseline"]["name"].startswith("majority class") and isinstance(first["warnings"], list)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["baseline"] == first["baseline"]
    monkeypatch.setattr(autolora.trainer, "retrain_loop", lambda *a, **k: pytest.fail("retrained again"))
    again = pipeline.train(cfg)
    assert again["dev"] == first["dev"] and again["ranks"] == first["ranks"]
