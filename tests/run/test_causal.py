"""``model.task: causal_lm`` through the CLI on the tiny Llama: the run folder, the dev loss
reproduced by the exported adapter under stock PEFT, ``autolora generate`` and ``export``."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from autolora import ConfigError, DataError
from autolora.run import causal, lm
from autolora.run.cli import main
from autolora.run.config import build_config, load_config
from autolora.run.evaluate import evaluate_run
from autolora.run.models import load_tokenizer, section_source
from experiments.tiny_lm import make_tiny_lm
from tests.conftest import load_peft, needs_smollm2

TINY_LM = "configs/tiny-lm.yaml"
E2E = Path("../shared/data/e2e")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


def _rows(tmp_path):
    train = [
        {"prompt": f"name[{w}] area[{a}]\n", "completion": f"{w} is in the {a}."}
        for w in "ABCDEFGH"
        for a in ("city", "river")
    ]
    dev = [
        {
            "messages": [
                {"role": "user", "content": f"where is {w}?"},
                {"role": "assistant", "content": f"{w} is by the river."},
            ]
        }
        for w in "XYZ"
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    return tmp_path / "train.jsonl", tmp_path / "dev.jsonl"


def _zeroed_copy(adapter: Path, out: Path) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    weights = out / "adapter_model.safetensors"
    state = load_file(weights)
    save_file({k: v * 0 if "lora_B" in k else v for k, v in state.items()}, weights)


def test_evaluate_names_what_is_missing(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "holds no config.yaml" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": "x"}, "data": {"task": "MRPC"}}))
    assert main(["evaluate", str(tmp_path), "--adapter", str(tmp_path / "nope")]) == 2
    assert "holds no exported adapter" in capsys.readouterr().err


def test_tiny_lm_config_is_valid():
    cfg, _ = load_config(TINY_LM)
    assert cfg.model.task == "causal_lm" and cfg.data.prompt_column == "mr"


def test_causal_lm_needs_files():
    with pytest.raises(ConfigError, match="causal_lm reads prompt/completion or chat rows"):
        build_config({"model": {"name_or_path": "x", "task": "causal_lm"}, "data": {"task": "MRPC"}})
    with pytest.raises(ConfigError, match="must contain"):
        build_config(
            {"model": {"name_or_path": "x"}, "data": {"train_file": "a", "dev_file": "b", "prompt_template": "x"}}
        )


@pytest.mark.skipif(not (E2E / "trainset.csv").is_file(), reason="needs ../shared/data/e2e")
def test_cli_train_reload_generate_export(tmp_path, tiny_lm, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    assert main(["train", TINY_LM, f"model.name_or_path={tiny_lm}", f"output_dir={run}", "fit.max_steps=2"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["metric"] == "dev_loss" and metrics["dev_examples"] == 16 and metrics["train_examples"] == 32
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["dev_loss"], rel=1e-6)
    report = (run / "report.md").read_text()
    score = f"- dev loss: {metrics['dev_loss']:.4f} (perplexity {metrics['perplexity']:.2f}; base model without"
    assert score in report and report.count("dev loss") == 1  # one line, with the baseline
    assert list((run / "logs").glob("events.out.tfevents.*"))
    logged = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("dev/loss" in str(r) for r in logged)

    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(tiny_lm)

    # the exported adapter, loaded with stock PEFT on a fresh base, reproduces the dev loss
    cfg = build_config(yaml.safe_load((run / "config.yaml").read_text()))
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = load_peft(AutoModelForCausalLM.from_pretrained(tiny_lm), run / "adapter")
    _, dev = causal.load_data(cfg, tok)
    scored = lm.dev_loss(model, lm.make_lm_batches(dev, 3, lm.pad_id(tok)))  # another batching
    assert scored["dev_loss"] == pytest.approx(metrics["dev_loss"], rel=1e-5)
    assert scored["dev_tokens"] == metrics["dev_tokens"]
    # the baseline is the base model itself: the same dev loss without the adapter
    base = lm.dev_loss(AutoModelForCausalLM.from_pretrained(tiny_lm).eval(), lm.make_lm_batches(dev, 3, lm.pad_id(tok)))
    assert metrics["baseline"]["dev"] == pytest.approx(base["dev_loss"], rel=1e-5)
    assert "base model without the adapter" in (run / "report.md").read_text()

    # `autolora evaluate` does the same check for a user: the dev loss through stock PEFT
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[: out.rindex("}") + 1])
    assert result["metric"] == "dev_loss" and result["reported"] == metrics["dev_loss"]
    assert result["dev"] == pytest.approx(metrics["dev_loss"], rel=1e-5) and result["abs_diff"] < 1e-4
    assert f"dev loss through the PEFT adapter {run / 'adapter'}: " in out and "autolora train reported" in out
    # ... and it would see a broken export: an adapter with B zeroed scores the base model
    _zeroed_copy(run / "adapter", tmp_path / "zeroed")
    broken = evaluate_run(run, tmp_path / "zeroed")
    assert broken["dev"] == pytest.approx(metrics["baseline"]["dev"], rel=1e-5) and broken["abs_diff"] > 1e-3

    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "name[Alimentum]", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out
    assert text.strip() and text.strip() == causal.generate(run, "name[Alimentum]", 5).strip()
    assert main(["export", str(run), "--target-rank", "1", "--out", str(tmp_path / "r1")]) == 0
    assert json.loads((tmp_path / "r1" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def test_jsonl_and_chat_run_and_bad_rows_fail_before_the_run_folder(tmp_path, tiny_lm):
    from autolora.run import pipeline

    train, dev = _rows(tmp_path)
    raw = {
        "model": {"name_or_path": str(tiny_lm), "task": "causal_lm", "max_length": 64, "device": "cpu"},
        "data": {"train_file": str(train), "dev_file": str(dev), "batch_size": 4, "group_by_length": True},
        "search": {"max_rank": 2, "target_modules": ["q_proj", "v_proj"]},
        "fit": {"max_steps": 2, "checkpoint_every": 1},
        "retrain": {"enabled": False},
        "logging": {"progress": False, "loggers": ["jsonl"]},
        "output_dir": str(tmp_path / "run"),
    }
    metrics = pipeline.train(build_config(raw))
    assert metrics["dev_examples"] == 3 and metrics["dev_loss"] > 0 and metrics["search_steps"] == 2

    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    raw["data"]["train_file"], raw["output_dir"] = str(tmp_path / "bad.jsonl"), str(tmp_path / "run2")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: missing field"):
        pipeline.train(build_config(raw))
    assert not (tmp_path / "run2").exists()


def test_generate_refuses_a_classification_run(tmp_path):
    (tmp_path / "config.yaml").write_text(
        "model: {name_or_path: x}\ndata: {train_file: a.csv, dev_file: b.csv}\noutput_dir: o\n"
    )
    with pytest.raises(DataError, match=r"needs model\.task=causal_lm"):
        causal.generate(tmp_path, "hi")


@needs_smollm2
@pytest.mark.parametrize("config", ["configs/smollm2-e2e.yaml", "configs/smollm2-gsm8k.yaml"])
def test_shipped_llm_configs_read_every_row_they_train_on(config):
    """The full GPU configs tokenise all their train and dev rows with the real SmolLM2 tokenizer:
    no row fails (a completion longer than model.max_length does) and none is truncated."""
    cfg, _ = load_config(config)
    if not Path(cfg.data.train_file).is_file():
        pytest.skip(f"needs {cfg.data.train_file}")
    tokenizer = load_tokenizer(section_source(cfg.model))
    for split in ("train", "dev"):
        data = causal.load_run_split(cfg, tokenizer, split)
        assert len(data) > 0 and data.truncated == 0, split
