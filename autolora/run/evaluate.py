"""``autolora evaluate RUN_DIR``: a finished run's dev score recomputed through its exported
adapter, loaded with stock PEFT onto a fresh base model, next to the score ``autolora train``
reported in ``metrics.json``. The two agreeing is the check that the export reproduces the
trained model; a user can run it on any run folder (or another adapter, ``--adapter``).
"""

from __future__ import annotations

import json
from pathlib import Path

from autolora.errors import DataError
from autolora.run import causal, lm, pipeline, text
from autolora.run.config import RunConfig, load_run_config
from autolora.run.models import load_model, load_tokenizer, section_source
from autolora.run.pipeline import ADAPTER, pick_device


def _adapter_dir(run_dir: Path, adapter: str | Path | None) -> Path:
    """``adapter`` or the run's own export, checked to hold an adapter."""
    adapter = Path(adapter) if adapter is not None else run_dir / ADAPTER
    if not (adapter / "adapter_config.json").is_file():
        raise DataError(f"{adapter} holds no exported adapter (adapter_config.json); run `autolora train` first.")
    return adapter


def _peft_model(cfg: RunConfig, adapter: Path, num_labels: int = 2):
    from peft import PeftModel

    src = section_source(cfg.model)
    base = load_model(src, cfg.model.task, num_labels).to(pick_device(cfg.model.device))
    return PeftModel.from_pretrained(base, str(adapter)).eval(), load_tokenizer(src)


def load_adapted(run_dir: str | Path, adapter: str | Path | None = None, num_labels: int | None = None):
    """(PEFT model, tokenizer): the run's base model with its exported adapter, via stock PEFT.
    ``num_labels`` (classification runs): read from the run's data when not given.

    Raises:
        DataError: if the run folder has no config or no exported adapter.
    """
    cfg = load_run_config(run_dir)
    adapter = _adapter_dir(Path(run_dir), adapter)
    if num_labels is None and cfg.model.task != "causal_lm":
        num_labels = pipeline.load_examples(cfg)[2]
    return _peft_model(cfg, adapter, num_labels or 2)


def evaluate_run(run_dir: str | Path, adapter: str | Path | None = None) -> dict:
    """``{"metric", "dev", "reported", "abs_diff", "adapter"}``: the dev score of the run's data
    through the exported adapter, and the one in its ``metrics.json`` (``None`` if the run has
    none yet, e.g. an interrupted run scored through ``autolora export``'s adapter)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    adapter = _adapter_dir(run_dir, adapter)  # before the data, which may be slow to load
    if cfg.model.task == "causal_lm":
        model, tokenizer = _peft_model(cfg, adapter)
        dev_batches = causal.batches(cfg, causal.load_run_split(cfg, tokenizer, "dev"), tokenizer, shuffle=False)
        metric, value = "dev_loss", lm.dev_loss(model, dev_batches, cfg.logging.progress)["dev_loss"]
    else:
        _, dev, num_labels, metric = pipeline.load_examples(cfg)
        model, tokenizer = _peft_model(cfg, adapter, num_labels)
        dev_batches = pipeline.batches(tokenizer, cfg, dev, shuffle=False, regression=metric == "pearson")
        value = text.evaluate(model, dev_batches, metric, cfg.logging.progress)
    saved = run_dir / "metrics.json"
    reported = json.loads(saved.read_text()).get("dev") if saved.is_file() else None
    return {
        "metric": metric,
        "dev": value,
        "reported": reported,
        "abs_diff": None if reported is None else abs(value - reported),
        "adapter": str(adapter),
    }
