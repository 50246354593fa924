"""What ``autolora train`` and ``autolora export`` run: data and model from a RunConfig, then
search -> prune -> optional retrain -> PEFT export -> dev evaluation, into one run folder.

Run folder: ``config.yaml`` (resolved), ``logs/`` (TensorBoard and ``metrics.jsonl``),
``checkpoints/``, ``adapter/`` (the PEFT adapter and its ``ranks.json``), ``ranks.json`` and
``metrics.json``.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import torch
import yaml

from autolora.errors import ConfigError, DataError
from autolora.plan.export import check_target_dir
from autolora.run import glue
from autolora.run.config import RunConfig, build_config, to_dict
from autolora.run.models import load_model, load_tokenizer, resolve_source
from autolora.run.text import Examples, evaluate, load_hub, make_batches, read_table
from autolora.trainer import AutoLoRATrainer

CHECKPOINTS, LOGS, ADAPTER = "checkpoints", "logs", "adapter"


def resolve_model_path(name_or_path: str) -> str:
    """A folder, a hub name, or ``package:<module>`` (see :mod:`autolora.run.models`)."""
    return resolve_source(name_or_path).path


def load_examples(cfg: RunConfig) -> tuple[Examples, Examples, int, str]:
    """(train, dev, num_labels, metric) for the data section."""
    d = cfg.data
    if d.task is not None:
        spec = glue.task_spec(d.task)
        train, dev = glue.load_glue(d.task, "train", d.path), glue.load_glue(d.task, "dev", d.path)
        num_labels, metric = spec.num_labels, spec.metric
    elif d.train_file is not None:
        if d.dev_file is None:
            raise ConfigError("data.train_file needs data.dev_file for the final evaluation.")
        train, order = read_table(d.train_file, d.text_columns, d.label_column, d.labels, d.regression)
        dev, _ = read_table(d.dev_file, d.text_columns, d.label_column, order, d.regression)
        num_labels = 1 if d.regression else len(order)
        metric = "pearson" if d.regression else "accuracy"
    elif d.hub is not None:
        train = load_hub(d.hub, d.hub_config, d.train_split, d.text_columns, d.label_column)
        dev = load_hub(d.hub, d.hub_config, d.dev_split, d.text_columns, d.label_column)
        num_labels = 1 if d.regression else len({int(v) for v in train.labels})
        metric = "pearson" if d.regression else "accuracy"
    else:
        raise ConfigError("the data section needs one of: task (GLUE), train_file + dev_file, or hub.")
    if d.limit is not None and d.limit < len(train):
        rows = sorted(random.Random(d.subset_seed).sample(range(len(train)), d.limit))
        train = train.subset(rows)
    return train, dev, num_labels, metric


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device={name!r} but no CUDA GPU is available; use 'cpu' or 'auto'.")
    return torch.device(name)


def build(cfg: RunConfig, run_dir: Path, num_labels: int):
    """(model, tokenizer, trainer) with the adapters injected."""
    src = resolve_source(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.hub_name)
    torch.manual_seed(cfg.seed)  # the classifier head's init
    model = load_model(src, cfg.model.task, num_labels)
    tokenizer = load_tokenizer(src)
    model.to(pick_device(cfg.model.device))
    logging = cfg.logging.__class__(**{**cfg.logging.__dict__, "log_dir": str(run_dir / LOGS)})
    trainer = AutoLoRATrainer.from_configs(model, cfg.adapter, cfg.search, logging)
    return model, tokenizer, trainer


def batches(tokenizer, cfg: RunConfig, examples, shuffle: bool, regression: bool) -> list:
    return make_batches(
        tokenizer,
        examples,
        cfg.data.batch_size,
        cfg.model.max_length,
        shuffle=shuffle,
        seed=cfg.seed,
        regression=regression,
    )


def prepare_run_dir(run_dir: Path, config: dict) -> None:
    """Create the folder and write the resolved config; a different config there is an error."""
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.yaml"
    text = yaml.safe_dump(config, sort_keys=False)
    if saved.is_file() and yaml.safe_load(saved.read_text()) != yaml.safe_load(text):
        raise ConfigError(
            f"{run_dir} already holds a run with another config ({saved}). Use a new output_dir, or delete "
            "that folder to start over (an identical config resumes from its checkpoints)."
        )
    saved.write_text(text)


def train(cfg: RunConfig) -> dict:
    """Run the whole pipeline; returns (and writes) ``metrics.json``."""
    if cfg.model.task == "causal_lm":
        from autolora.run import causal

        return causal.train(cfg)
    run_dir = Path(cfg.output_dir)
    # everything that can fail on the user's input fails before the run folder is touched
    resolve_model_path(cfg.model.name_or_path)
    pick_device(cfg.model.device)
    train_ex, dev_ex, num_labels, metric = load_examples(cfg)
    prepare_run_dir(run_dir, to_dict(cfg))
    model, tokenizer, trainer = build(cfg, run_dir, num_labels)
    regression = metric == "pearson"  # load_examples scores regression data by Pearson correlation
    train_batches = batches(tokenizer, cfg, train_ex, shuffle=True, regression=regression)
    dev_batches = batches(tokenizer, cfg, dev_ex, shuffle=False, regression=regression)
    t0 = time.perf_counter()
    trainer.fit(
        train_batches,
        epochs=cfg.fit.epochs,
        max_steps=cfg.fit.max_steps,
        checkpoint_dir=run_dir / CHECKPOINTS,
        checkpoint_every=cfg.fit.checkpoint_every,
        keep_checkpoints=cfg.fit.keep_checkpoints,
        resume=True,
    )
    search_s = time.perf_counter() - t0
    ranks = trainer.prune(cfg.prune.threshold, cfg.prune.target_rank, min_rank=cfg.prune.min_rank)
    t1 = time.perf_counter()
    if cfg.retrain.enabled:
        trainer.retrain(
            train_batches, epochs=cfg.retrain.epochs, lr=cfg.retrain.lr, warmup_ratio=cfg.retrain.warmup_ratio
        )
    retrain_s = time.perf_counter() - t1
    trainer.close()
    if (run_dir / ADAPTER).exists():
        shutil.rmtree(run_dir / ADAPTER)  # a rerun of the same config replaces its export
    trainer.export(run_dir / ADAPTER)
    score = evaluate(model, dev_batches, metric)
    record = trainer.rank_record()
    (run_dir / "ranks.json").write_text(json.dumps(record, indent=1))
    metrics = {
        "metric": metric,
        "dev": score,
        "dev_examples": len(dev_ex),
        "train_examples": len(train_ex),
        "ranks": ranks,
        "adapter_parameters": trainer.parameter_count()["adapter"],
        "search_steps": trainer.state.step,
        "skipped_steps": trainer.state.skipped_steps,
        "search_seconds": round(search_s, 2),
        "retrain_seconds": round(retrain_s, 2),
        "device": str(trainer.device),
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def export(
    run_dir: Path,
    out: Path | None,
    *,
    overwrite: bool = False,
    merged: bool = False,
    threshold: float | None = None,
    target_rank: int | None = None,
) -> Path:
    """Export a run's newest search checkpoint as a PEFT adapter (or a merged model).

    Pruned with the run's prune rule, or with ``threshold`` / ``target_rank`` given here, so a
    finished search can be cut to another budget, and an interrupted one exported as it stands.
    The export is of the search's adapters (no retraining).
    """
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise DataError(f"{run_dir} holds no config.yaml; give the output_dir of an `autolora train` run.")
    cfg = build_config(yaml.safe_load(saved.read_text()))
    out = out or run_dir / ("merged" if merged else "adapter-from-checkpoint")
    check_target_dir(Path(out), overwrite)  # fail before the slow part
    if cfg.model.task == "causal_lm":
        from autolora.run import causal

        _, _, trainer = causal.build(cfg, run_dir)
    else:
        _, _, num_labels, _ = load_examples(cfg)
        _, _, trainer = build(cfg, run_dir, num_labels)
    trainer.load_checkpoint(run_dir / CHECKPOINTS)
    if threshold is None and target_rank is None:
        threshold, target_rank = cfg.prune.threshold, cfg.prune.target_rank
    trainer.prune(threshold, target_rank, min_rank=cfg.prune.min_rank)
    if merged:
        trainer.export_merged(out, overwrite=overwrite)
    else:
        trainer.export(out, overwrite=overwrite)
    return out
