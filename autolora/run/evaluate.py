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
from autolora.run.config import load_run_config
from autolora.run.models import load_model, load_tokenizer, resolve_source
from autolora.run.pipeline import ADAPTER, pick_device


def _check_adapter(adapter: Path) -> None:
    if not (adapter / "adapter_config.json").is_file():
        raise DataError(f"{adapter} holds no exported adapter (adapter_config.json); run `autolora train` first.")


def load_adapted(run_dir: str | Path, adapter: str | Path | None = None, num_labels: int | None = None):
    """(PEFT model, tokenizer): the run's base model with its exported adapter, via stock PEFT.
    ``num_labels`` (classification runs): read from the run's data when not given.

    Raises:
        DataError: if the run folder has no config or no exported adapter.
    """
    from peft import PeftModel

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    adapter = Path(adapter) if adapter is not None else run_dir / ADAPTER
    _check_adapter(adapter)
    if num_labels is None and cfg.model.task != "causal_lm":
        num_labels = pipeline.load_examples(cfg)[2]
    src = resolve_source(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.hub_name)
    tokenizer = load_tokenizer(src)
    base = load_model(src, cfg.model.task, num_labels or 2).to(pick_device(cfg.model.device))
    return PeftModel.from_pretrained(base, str(adapter)).eval(), tokenizer


def evaluate_run(run_dir: str | Path, adapter: str | Path | None = None) -> dict:
    """``{"metric", "dev", "reported", "abs_diff", "adapter"}``: the dev score of the run's data
    through the exported adapter, and the one in its ``metrics.json`` (``None`` if the run has
    none yet, e.g. an interrupted run scored through ``autolora export``'s adapter)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    adapter = Path(adapter) if adapter is not None else run_dir / ADAPTER
    _check_adapter(adapter)  # before the data, which may be slow to load
    if cfg.model.task == "causal_lm":
        model, tokenizer = load_adapted(run_dir, adapter)
        dev = causal.load_run_split(cfg, tokenizer, "dev")
        metric = "dev_loss"
        dev_batches = causal.batches(cfg, dev, tokenizer, shuffle=False)
        value = lm.dev_loss(model, dev_batches, cfg.logging.progress)["dev_loss"]
    else:
        _, dev, num_labels, metric = pipeline.load_examples(cfg)
        model, tokenizer = load_adapted(run_dir, adapter, num_labels)
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
