"""The YAML run config: loading, overrides, and every section's validation in YAML key terms."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from autolora import ConfigError
from autolora.run.config import (
    DataSection,
    FitSection,
    ModelSection,
    PruneSection,
    RetrainSection,
    build_config,
    load_config,
    parse_overrides,
    to_dict,
)

TINY = "configs/tiny.yaml"


def _raw(**changes):
    raw = yaml.safe_load(Path(TINY).read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return raw


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"search__max_rnak": 4}, "unknown argument 'max_rnak'"),
        ({"fit__epoch": 2}, r"unknown key\(s\) fit.epoch"),
        ({"fit__epochs": "two"}, r"fit.epochs='two' has the wrong type; it must be an integer"),
        ({"retrain__enabled": "yes"}, "must be true or false"),
        ({"search__lr": "fast"}, "search.lr='fast' has the wrong type; it must be a number"),
        ({"search__log_every": 3}, "belong in the 'logging' section"),
        ({"search__hypergrad": "exact"}, "hypergrad='exact'"),
        ({"search__max_rank": 0}, "max_rank=0 is invalid"),
        ({"search__compile": "yes"}, "search.compile='yes' has the wrong type; it must be true or false"),
        ({"search__hypergrad": "unrolled", "search__compile": True}, "set compile=False .*search.compile: false"),
        ({"extra": 1}, r"unknown top-level key\(s\) \['extra'\]"),
        ({"model__max_length": 1.5}, "model.max_length=1.5 has the wrong type"),
        ({"data__text_columns": "sentence"}, "must be a list"),
    ],
)
def test_config_errors_name_the_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        build_config(_raw(**changes))


def test_compile_is_a_search_key():
    cfg, _ = load_config(TINY, ["search.compile=true"])
    assert cfg.search.compile and cfg.search.compile_backend == "inductor"
    assert to_dict(cfg)["search"]["compile"] is True


def test_yaml_exponents_and_overrides():
    cfg = build_config(_raw(search__lr="5e-4"))  # YAML 1.1 reads 5e-4 as a string
    assert cfg.search.lr == 5e-4
    assert parse_overrides(["search.max_rank=16", "data.labels=[a, b]", "fit.max_steps=null"]) == {
        "search": {"max_rank": 16},
        "data": {"labels": ["a", "b"]},
        "fit": {"max_steps": None},
    }
    cfg, _ = load_config(TINY, ["search.max_rank=2", "search.target_modules=[query]"])
    assert (cfg.adapter.max_rank, cfg.adapter.target_modules) == (2, ("query",))
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        parse_overrides(["search.max_rank"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config("configs/nope.yaml")


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_validates(path):
    cfg, _ = load_config(path)
    if cfg.model.task == "causal_lm":  # the decoder configs adapt Llama projections
        assert cfg.adapter.target_modules == "all-linear" or "q_proj" in cfg.adapter.target_modules
    else:
        assert cfg.adapter.target_modules == ("query", "value")
    assert cfg.fit.epochs >= 1


@pytest.mark.parametrize(
    ("section", "kwargs", "message"),
    [
        (ModelSection, {"name_or_path": ""}, "model.name_or_path=''"),
        (ModelSection, {"name_or_path": "x", "device": "tpu"}, "model.device='tpu'"),
        (DataSection, {}, "needs one of: task"),
        (DataSection, {"task": "MNLI-X"}, "data.task='MNLI-X' is not a GLUE task"),
        (DataSection, {"train_file": "a.tsv"}, "data.train_file needs data.dev_file"),
        (DataSection, {"task": "MRPC", "limit": 0}, "data.limit=0 is invalid"),
        (DataSection, {"task": "MRPC", "text_columns": ()}, "data.text_columns=()"),
        (FitSection, {"epochs": 0}, "fit.epochs=0 is invalid"),
        (FitSection, {"max_steps": 0}, "fit.max_steps=0 is invalid"),
        (FitSection, {"checkpoint_every": -1}, "fit.checkpoint_every=-1 is invalid"),
        (FitSection, {"keep_checkpoints": 0}, "fit.keep_checkpoints=0 is invalid"),
        (PruneSection, {"threshold": -1.0}, "prune.threshold=-1.0 is invalid"),
        (PruneSection, {"target_rank": 0}, "prune.target_rank=0 is invalid"),
        (PruneSection, {"threshold": 0.1, "target_rank": 2}, "give one of them"),
        (PruneSection, {"min_rank": -1}, "prune.min_rank=-1 is invalid"),
        (PruneSection, {"target_rank": 2, "min_rank": 3}, "prune.min_rank=3 is more than prune.target_rank=2"),
        (RetrainSection, {"epochs": 0}, "retrain.epochs=0 is invalid"),
        (RetrainSection, {"lr": -1.0}, "retrain.lr=-1.0 is invalid"),
        (RetrainSection, {"warmup_ratio": 1.5}, "retrain.warmup_ratio=1.5 is invalid"),
        (RetrainSection, {"enabled": "yes"}, "retrain.enabled='yes' is invalid"),
    ],
)
def test_every_section_validates_itself(section, kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        section(**kwargs)


def test_sections_are_frozen_and_their_defaults_valid():
    for section in (FitSection(), PruneSection(), RetrainSection(), DataSection(task="MRPC"), ModelSection("m")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            section.x = 1


def test_cross_section_checks_and_output_dir():
    with pytest.raises(ConfigError, match=re.escape("prune.target_rank=5 is more than search.max_rank=4")):
        build_config(_raw(prune__target_rank=5))
    with pytest.raises(ConfigError, match="output_dir"):
        build_config(_raw(output_dir=""))


def test_resolved_config_round_trips():
    cfg, _ = load_config(TINY)
    again = build_config(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert again == cfg
    assert to_dict(cfg)["search"]["max_rank"] == 4 and "log_dir" not in to_dict(cfg)["logging"]


def test_overrides_merge_into_nested_sections():
    assert parse_overrides(["fit.epochs=2", "fit.max_steps=3"]) == {"fit": {"epochs": 2, "max_steps": 3}}
    with pytest.raises(ConfigError, match="conflicts"):
        parse_overrides(["fit=1", "fit.epochs=2"])
    assert Path(TINY).is_file()
