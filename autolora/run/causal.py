"""``autolora train`` / ``export`` / ``generate`` for ``model.task: causal_lm``.

The same search -> prune -> retrain -> PEFT export as :mod:`autolora.run.pipeline`, on the
causal-LM data of :mod:`autolora.run.lm`, scored by the dev loss (token-weighted NLL over the
completion tokens) and its perplexity. These go to ``metrics.json`` (``dev_loss``,
``perplexity``), to the logs as ``dev/loss`` and ``dev/perplexity`` (TensorBoard, report).
"""

from __future__ import annotations

import sys
from pathlib import Path

from autolora.errors import DataError
from autolora.run import lm
from autolora.run.config import RunConfig, load_run_config, to_dict
from autolora.run.models import load_model, load_tokenizer, section_source
from autolora.trainer import AutoLoRATrainer

CHECKPOINTS, LOGS, ADAPTER = "checkpoints", "logs", "adapter"


def load_run_split(cfg: RunConfig, tokenizer, split: str) -> lm.LMData:
    """The ``train`` or ``dev`` file tokenised: a seeded subset of ``limit`` / ``dev_limit`` rows
    when given; says on stderr how many rows were cut to ``model.max_length``."""
    d = cfg.data
    if d.dev_file is None:
        raise DataError("model.task=causal_lm needs data.dev_file for the dev loss.")
    path, limit = (d.train_file, d.limit) if split == "train" else (d.dev_file, d.dev_limit)
    data = lm.load_lm_file(
        path,
        tokenizer,
        cfg.model.max_length,
        prompt_column=d.prompt_column,
        completion_column=d.completion_column,
        messages_column=d.messages_column,
        prompt_template=d.prompt_template,
        limit=limit,
        seed=d.subset_seed,
    )
    if data.truncated:
        print(
            f"autolora: {data.truncated} of {len(data)} {split} rows were longer than model.max_length="
            f"{cfg.model.max_length}; their prompts were cut from the left.",
            file=sys.stderr,
        )
    return data


def load_data(cfg: RunConfig, tokenizer) -> tuple[lm.LMData, lm.LMData]:
    """(train, dev) tokenised, see :func:`load_run_split`."""
    return load_run_split(cfg, tokenizer, "train"), load_run_split(cfg, tokenizer, "dev")


def build(cfg: RunConfig, run_dir: Path, tokenizer=None):
    """(model, tokenizer, trainer) with the adapters injected."""
    import torch

    from autolora.run.pipeline import pick_device

    src = section_source(cfg.model)
    tokenizer = tokenizer or load_tokenizer(src)
    torch.manual_seed(cfg.seed)
    model = load_model(src, "causal_lm").to(pick_device(cfg.model.device))
    logging = cfg.logging.__class__(**{**cfg.logging.__dict__, "log_dir": str(run_dir / LOGS)})
    return model, tokenizer, AutoLoRATrainer.from_configs(model, cfg.adapter, cfg.search, logging)


def batches(cfg: RunConfig, data: lm.LMData, tokenizer, shuffle: bool) -> list:
    group = cfg.data.group_by_length
    return lm.make_lm_batches(data, cfg.data.batch_size, lm.pad_id(tokenizer), shuffle, cfg.seed, group)


def train(cfg: RunConfig) -> dict:
    """The whole causal-LM pipeline; returns (and writes) ``metrics.json``."""
    from autolora.run.pipeline import (
        check_enough_rows,
        pick_device,
        prepare_run_dir,
        search_and_retrain,
        search_summary,
        write_records,
    )

    run_dir = Path(cfg.output_dir)
    pick_device(cfg.model.device)
    tokenizer = load_tokenizer(section_source(cfg.model))
    train_data, dev_data = load_data(cfg, tokenizer)  # bad rows fail before the run folder exists
    check_enough_rows(len(train_data), cfg)
    prepare_run_dir(run_dir, to_dict(cfg))
    model, tokenizer, trainer = build(cfg, run_dir, tokenizer)
    train_batches = batches(cfg, train_data, tokenizer, shuffle=True)
    dev_batches = batches(cfg, dev_data, tokenizer, shuffle=False)
    progress = cfg.logging.progress
    base_loss = lm.dev_loss(model, dev_batches, progress)["dev_loss"]  # fresh adapters have B = 0: the base model
    ranks, search_s, retrain_s = search_and_retrain(cfg, trainer, train_batches, run_dir)
    retrain_steps = len(train_batches) * cfg.retrain.epochs if cfg.retrain.enabled else 0  # an upper bound
    scores = lm.dev_loss(model, dev_batches, progress)
    trainer._get_logger().log_dict(
        {"dev/loss": scores["dev_loss"], "dev/perplexity": scores["perplexity"]}, trainer.state.step + retrain_steps
    )
    trainer.close()
    trainer.export(run_dir / ADAPTER, overwrite=True)  # a rerun of the same config replaces its export
    metrics = {
        "metric": "dev_loss",
        "dev": scores["dev_loss"],
        "dev_loss": scores["dev_loss"],
        "baseline": {"name": "base model without the adapter", "dev": base_loss},
        "warnings": []
        if scores["dev_loss"] < base_loss
        else [
            f"the dev loss {scores['dev_loss']:.4f} is not below the base model's ({base_loss:.4f}): the adapter did not help."
        ],
        "perplexity": scores["perplexity"],
        "dev_tokens": scores["dev_tokens"],
        "dev_examples": len(dev_data),
        "train_examples": len(train_data),
        "truncated_rows": {"train": train_data.truncated, "dev": dev_data.truncated},
        **search_summary(trainer, ranks, search_s, retrain_s),
    }
    write_records(run_dir, trainer, metrics)
    return metrics


def generate(run_dir: str | Path, prompt: str, max_new_tokens: int = 64, raw: bool = False) -> str:
    """Greedy generation through the run's exported adapter; the prompt is formatted with the
    run's ``data.prompt_template`` unless ``raw``."""
    from autolora.run.evaluate import load_adapted

    cfg = load_run_config(run_dir)
    if cfg.model.task != "causal_lm":
        raise DataError(f"{run_dir} is a {cfg.model.task} run; `autolora generate` needs model.task=causal_lm.")
    model, tokenizer = load_adapted(run_dir)
    text = prompt if raw else cfg.data.prompt_template.format(prompt=prompt)
    return lm.generate(model, tokenizer, text, max_new_tokens)
