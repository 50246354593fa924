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
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from autolora.config import AdapterConfig, LoggingConfig, SearchConfig, split_kwargs
from autolora.errors import ConfigError, DataError
from autolora.run.sections import (  # noqa: F401  (the sections are part of this module's interface)
    SECTIONS,
    TOP_LEVEL,
    DataSection,
    FitSection,
    ModelSection,
    PruneSection,
    RetrainSection,
    RunConfig,
)


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


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line: what is wrong and where (line:column) (YAML's own message spans lines)."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


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
        try:
            node[leaf] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); quote it, e.g. key='value'."
            ) from None
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


def read_yaml(path: Path) -> object:
    """``yaml.safe_load`` of a file; bad bytes, bad YAML and YAML tags are a ``ConfigError``."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8.") from None
    except yaml.YAMLError as e:  # a parse error, or a tag such as !!python/object (never constructed)
        raise ConfigError(f"{path} is not valid plain YAML ({_yaml_problem(e)}).") from None
    except OSError as e:
        raise ConfigError(f"{path} cannot be read ({e.strerror or e}).") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[RunConfig, dict]:
    """Read a YAML run config (``yaml.safe_load``), apply overrides; returns (config, raw dict)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such config file {str(path)!r}.")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a run config must be a mapping of sections, got {type(raw).__name__}.")
    raw = _merge(raw, parse_overrides(overrides or []))
    return build_config(raw), raw


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config an ``autolora train`` run saved in its folder.

    Raises:
        DataError: if ``run_dir`` holds no ``config.yaml``.
    """
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise DataError(f"{run_dir} holds no config.yaml; give the output_dir of an `autolora train` run.")
    return build_config(read_yaml(saved))


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
