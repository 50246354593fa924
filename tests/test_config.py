"""The library's config dataclasses: one source of defaults, validation that names the field."""

import dataclasses

import pytest

from autolora import AdapterConfig, AutoLoRATrainer, ConfigError, LoggingConfig, SearchConfig
from autolora.config import ENGINE_NAMES, LOGGER_NAMES, split_kwargs
from autolora.logging import LOGGERS
from autolora.search.hypergrad import ENGINES
from tests.conftest import bert


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (AdapterConfig, {"max_rank": 0}, "max_rank=0 is invalid"),
        (AdapterConfig, {"lora_alpha": -1}, "lora_alpha=-1 is invalid"),
        (AdapterConfig, {"gate": "relu"}, "gate='relu' is not supported"),
        (AdapterConfig, {"lora_dropout": 1.0}, "lora_dropout=1.0 is invalid"),
        (AdapterConfig, {"scale": 0}, "scale=0 is invalid"),
        (AdapterConfig, {"target_modules": []}, "target_modules=() is invalid"),
        (AdapterConfig, {"modules_to_save": [1]}, "modules_to_save=(1,) is invalid"),
        (SearchConfig, {"hypergrad": "exact"}, "hypergrad='exact' is not an engine"),
        (SearchConfig, {"lr": 0}, "lr=0 is invalid"),
        (SearchConfig, {"weight_decay": -1}, "weight_decay=-1 is invalid"),
        (SearchConfig, {"max_grad_norm": 0}, "max_grad_norm=0 is invalid"),
        (SearchConfig, {"selector_betas": (0.5,)}, "selector_betas=(0.5,) is invalid"),
        (SearchConfig, {"selector_every": 0}, "selector_every=0 is invalid"),
        (SearchConfig, {"fd_epsilon": 0}, "fd_epsilon=0 is invalid"),
        (SearchConfig, {"darts_difference": "backward"}, "darts_difference='backward' is not supported"),
        (SearchConfig, {"val_fraction": 1}, "val_fraction=1 is invalid"),
        (SearchConfig, {"seed": -1}, "seed=-1 is invalid"),
        (SearchConfig, {"autocast": "fp8"}, "autocast='fp8' is not supported"),
        (SearchConfig, {"grad_accum_steps": 0}, "grad_accum_steps=0 is invalid"),
        (SearchConfig, {"gradient_checkpointing": 1}, "gradient_checkpointing=1 is invalid"),
        (SearchConfig, {"skip_nonfinite": "no"}, "skip_nonfinite='no' is invalid"),
        (SearchConfig, {"compile": 1}, "compile=1 is invalid"),
        (SearchConfig, {"compile_backend": ""}, "compile_backend='' is invalid"),
        (SearchConfig, {"compile_scope": "layers"}, "compile_scope='layers' is not supported"),
        (LoggingConfig, {"log_every": 0}, "log_every=0 is invalid"),
        (LoggingConfig, {"progress": None}, "progress=None is invalid"),
        (LoggingConfig, {"loggers": []}, "loggers=() is invalid"),
        (LoggingConfig, {"loggers": ["wandb"]}, "loggers='wandb' is not supported"),
    ],
)
def test_each_field_is_validated(cls, kwargs, message):
    with pytest.raises(ConfigError) as e:
        cls(**kwargs)
    assert message in str(e.value)


def test_lists_become_tuples_and_configs_are_frozen():
    a = AdapterConfig(target_modules=["q", "v"], modules_to_save="classifier")
    assert (a.target_modules, a.modules_to_save) == (("q", "v"), ("classifier",))
    assert SearchConfig(selector_betas=[0.9, 0.99]).selector_betas == (0.9, 0.99)
    assert LoggingConfig(loggers="jsonl", log_dir=123).loggers == ("jsonl",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.max_rank = 2


def test_effective_scale_and_xi():
    assert AdapterConfig(lora_alpha=16).effective_scale == 16.0  # softmax: alpha
    assert AdapterConfig(lora_alpha=16, max_rank=8, gate="sigmoid").effective_scale == 4.0  # 2 alpha / r
    assert AdapterConfig(scale=3).effective_scale == 3.0
    assert SearchConfig(lr=0.1).xi == 0.1 and SearchConfig(lr=0.1, inner_lr=0.0).xi == 0.0


def test_one_registry_per_choice():
    assert tuple(ENGINES) == ENGINE_NAMES
    assert tuple(LOGGERS) == LOGGER_NAMES


def test_split_kwargs_routes_and_names_unknown_keys():
    adapter, search, logging = split_kwargs({"max_rank": 2, "lr": 0.1, "log_every": 3})
    assert (adapter, search, logging) == ({"max_rank": 2}, {"lr": 0.1}, {"log_every": 3})
    with pytest.raises(ConfigError, match="unknown argument 'rank'"):
        split_kwargs({"rank": 2})


def test_the_trainer_takes_its_defaults_from_the_dataclasses():
    t = AutoLoRATrainer(bert())
    assert t.adapter_config == AdapterConfig()
    assert t.search_config == SearchConfig() and t.logging_config == LoggingConfig()
    assert {a.rank for a in t.adapters.values()} == {AdapterConfig().max_rank} == {8}
