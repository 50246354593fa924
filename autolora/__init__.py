"""autolora: AutoLoRA (Zhang et al., NAACL 2024) as a library.

Gated LoRA adapters, a bilevel rank search, pruning to a rank per layer, and export to a stock
PEFT LoRA adapter. Everything public is imported from here; submodules are internal.
"""

from autolora.config import AdapterConfig, LoggingConfig, SearchConfig
from autolora.data import to_device
from autolora.errors import (
    AutoLoRAError,
    ConfigError,
    DataError,
    ExportError,
    NonFiniteError,
    RankWarning,
    RunWarning,
    StateError,
    TargetError,
    WriteError,
)
from autolora.layers import GatedLoRALinear
from autolora.logging import JsonlLogger, Logger, NullLogger, TensorBoardLogger
from autolora.plan.export import peft_config
from autolora.plan.prune import PrunePlan
from autolora.run.causal import load_run_split
from autolora.run.config import load_run_config
from autolora.run.evaluate import evaluate_run, load_adapted
from autolora.run.glue import TASKS as GLUE_TASKS
from autolora.run.glue import load_glue
from autolora.run.lm import LMData, dev_loss, generate_batch, load_lm_file, make_lm_batches, pad_id
from autolora.run.models import ModelSource, load_model, load_tokenizer, resolve_source
from autolora.run.report import write_report
from autolora.run.text import Examples, evaluate, make_batches
from autolora.search.bilevel import default_loss
from autolora.search.hypergrad import ENGINES, Engine
from autolora.search.retrain import linear_warmup
from autolora.trainer import AutoLoRATrainer

__version__ = "0.1.0"

__all__ = [
    "ENGINES",
    "GLUE_TASKS",
    "AdapterConfig",
    "AutoLoRAError",
    "AutoLoRATrainer",
    "ConfigError",
    "DataError",
    "Engine",
    "Examples",
    "ExportError",
    "GatedLoRALinear",
    "JsonlLogger",
    "LMData",
    "Logger",
    "LoggingConfig",
    "ModelSource",
    "NonFiniteError",
    "NullLogger",
    "PrunePlan",
    "RankWarning",
    "RunWarning",
    "SearchConfig",
    "StateError",
    "TargetError",
    "TensorBoardLogger",
    "WriteError",
    "__version__",
    "default_loss",
    "dev_loss",
    "evaluate",
    "evaluate_run",
    "generate_batch",
    "linear_warmup",
    "load_adapted",
    "load_glue",
    "load_lm_file",
    "load_model",
    "load_run_config",
    "load_run_split",
    "load_tokenizer",
    "make_batches",
    "make_lm_batches",
    "pad_id",
    "peft_config",
    "resolve_source",
    "to_device",
    "write_report",
]
