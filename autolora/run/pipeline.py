"""What ``autolora train`` and ``autolora export`` run: data and model from a RunConfig, then
search -> prune -> optional retrain -> PEFT export -> dev evaluation, into one run folder.

Run folder: ``config.yaml`` (resolved), ``logs/`` (TensorBoard and ``metrics.jsonl``),
``checkpoints/``, ``adapter/`` (the PEFT adapter and its ``ranks.json``), ``ranks.json`` and
``metrics.json``.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import torch
import yaml

from autolora.errors import ConfigError
from autolora.plan.atomic import atomic_file
from autolora.plan.export import check_target_dir
from autolora.run import glue
from autolora.run.config import RunConfig, load_run_config, read_yaml, to_dict
from autolora.run.models import load_model, load_tokenizer, resolve_source, section_source
from autolora.run.text import Examples, baseline, degenerate, load_hub, make_batches, predict, read_table, score
from autolora.trainer import AutoLoRATrainer

CHECKPOINTS, LOGS, ADAPTER = "checkpoints", "logs", "adapter"
RETRAINED = f"{CHECKPOINTS}/retrain"  # the retrained adapters, so a rerun skips the retrain


def resolve_model_path(name_or_path: str) -> str:
    """A folder, a hub name, or ``package:<module>`` (see :mod:`autolora.run.models`).

    Raises:
        ConfigError: for a path that looks local but is not a folder, or a package that is missing.
    """
    local = (
        name_or_path.startswith(("/", ".", "~"))
        or name_or_path.count("/") > 1
        or (os.sep != "/" and os.sep in name_or_path)
    )
    if local and not Path(name_or_path).expanduser().is_dir():
        raise ConfigError(
            f"model.name_or_path={name_or_path!r} is not a folder; give a folder holding a saved model "
            "(config.json and weights), a hub name such as 'bert-base-uncased', or package:<module>."
        )
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
    src = section_source(cfg.model)
    torch.manual_seed(cfg.seed)  # the classifier head's init
    try:
        model = load_model(src, cfg.model.task, num_labels)
        tokenizer = load_tokenizer(src)
    except OSError as e:  # not a model folder, an unknown hub name, no network
        raise ConfigError(f"model.name_or_path={cfg.model.name_or_path!r} cannot be loaded: {e}") from None
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


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a run folder: it holds a ``config.yaml`` (``prepare_run_dir`` then
    resumes only if it is this run's config)."""
    return (path / "config.yaml").is_file()


def prepare_run_dir(run_dir: Path, config: dict) -> None:
    """Create the folder and write the resolved config; a different config there is an error,
    and so is a non-empty folder that is not a run folder (nothing of it is touched)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir={str(run_dir)!r} is a file; give a folder path.")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not is_run_dir(run_dir):
        raise ConfigError(
            f"output_dir={str(run_dir)!r} is a non-empty folder that is not an autolora run folder (it has no "
            "config.yaml); autolora would write adapter/, checkpoints/ and metrics.json into it. "
            "Give a new or empty folder."
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output_dir={str(run_dir)!r} cannot be created ({e.strerror or e}).") from None
    saved = run_dir / "config.yaml"
    text = yaml.safe_dump(config, sort_keys=False)
    if saved.is_file() and read_yaml(saved) != yaml.safe_load(text):
        raise ConfigError(
            f"{run_dir} already holds a run with another config ({saved}). Use a new output_dir, or delete "
            "that folder to start over (an identical config resumes from its checkpoints)."
        )
    with atomic_file(saved) as tmp:
        tmp.write_text(text)


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
    check_enough_rows(len(train_ex), cfg)
    prepare_run_dir(run_dir, to_dict(cfg))
    model, tokenizer, trainer = build(cfg, run_dir, num_labels)
    regression = metric == "pearson"  # load_examples scores regression data by Pearson correlation
    train_batches = batches(tokenizer, cfg, train_ex, shuffle=True, regression=regression)
    dev_batches = batches(tokenizer, cfg, dev_ex, shuffle=False, regression=regression)
    ranks, search_s, retrain_s = search_and_retrain(cfg, trainer, train_batches, run_dir)
    trainer.close()
    trainer.export(run_dir / ADAPTER, overwrite=True)  # a rerun of the same config replaces its export
    preds, golds = predict(model, dev_batches, metric, cfg.logging.progress)
    dev_score, base = score(preds, golds, metric), baseline(train_ex.labels, dev_ex.labels, metric)
    metrics = {
        "metric": metric,
        "dev": dev_score,
        "baseline": base,
        "warnings": degenerate(preds, dev_score, base, metric),
        "dev_examples": len(dev_ex),
        "train_examples": len(train_ex),
        **search_summary(trainer, ranks, search_s, retrain_s),
    }
    write_records(run_dir, trainer, metrics)
    return metrics


def check_enough_rows(n_rows: int, cfg: RunConfig) -> None:
    """The search splits the train batches 70/30 and needs at least 2 (checked before the run
    folder is touched; ``fit()`` would say it in Python words).

    Raises:
        ConfigError: naming data.limit and data.batch_size.
    """
    n_batches = -(-n_rows // cfg.data.batch_size)
    if n_batches < 2:
        raise ConfigError(
            f"the {n_rows} train rows make {n_batches} batch of data.batch_size={cfg.data.batch_size}; the search "
            "needs at least 2 (30% of them tune the selectors): raise data.limit or lower data.batch_size."
        )


def search_and_retrain(cfg: RunConfig, trainer: AutoLoRATrainer, train_batches: list, run_dir: Path):
    """Search (resuming from the run's checkpoints), prune with the run's rule, retrain (a
    finished retrain of this run is loaded from its checkpoint, not redone).

    Returns:
        (ranks, search seconds, retrain seconds).
    """
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
        r = cfg.retrain
        trainer.retrain(
            train_batches, epochs=r.epochs, lr=r.lr, warmup_ratio=r.warmup_ratio, checkpoint_dir=run_dir / RETRAINED
        )
    return ranks, search_s, time.perf_counter() - t1


def search_summary(trainer: AutoLoRATrainer, ranks: dict[str, int], search_s: float, retrain_s: float) -> dict:
    """The part of ``metrics.json`` that every task shares: the plan, its size, the steps and times."""
    return {
        "ranks": ranks,
        "adapter_parameters": trainer.parameter_count()["adapter"],
        "search_steps": trainer.state.step,
        "search_stopped_stable": trainer.state.stopped_stable,  # ended early on a settled plan
        "skipped_steps": trainer.state.skipped_steps,
        "search_seconds": round(search_s, 2),
        "retrain_seconds": round(retrain_s, 2),
        **({"compile_seconds": round(trainer.state.compile_seconds, 2)} if trainer.search_config.compile else {}),
        "device": str(trainer.device),
    }


def write_records(run_dir: Path, trainer: AutoLoRATrainer, metrics: dict) -> None:
    """``ranks.json`` and ``metrics.json`` of a finished run, each written atomically."""
    for name, record in (("ranks.json", trainer.rank_record()), ("metrics.json", metrics)):
        with atomic_file(run_dir / name) as tmp:
            tmp.write_text(json.dumps(record, indent=1))


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
    cfg = load_run_config(run_dir)
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
