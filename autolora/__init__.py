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
from autolora.run.glue import TASKS as GLUE_TASKS
from autolora.run.glue import load_glue
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
    "Logger",
    "LoggingConfig",
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
    "evaluate",
    "linear_warmup",
    "load_glue",
    "make_batches",
    "peft_config",
    "to_device",
    "write_report",
]
