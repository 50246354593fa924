"""autolora: AutoLoRA (Zhang et al., NAACL 2024) as a library.

Gated LoRA adapters, a bilevel rank search, pruning to a rank per layer, and export to a stock
PEFT LoRA adapter.
"""

from autolora.config import AdapterConfig, LoggingConfig, SearchConfig
from autolora.errors import (
    AutoLoRAError,
    ConfigError,
    DataError,
    ExportError,
    NonFiniteError,
    StateError,
    TargetError,
)
from autolora.export import peft_config
from autolora.hypergrad import ENGINES
from autolora.layers import GatedLoRALinear
from autolora.loggers import JsonlLogger, Logger, NullLogger, TensorBoardLogger
from autolora.prune import PrunePlan
from autolora.trainer import AutoLoRATrainer

__version__ = "0.1.0"

__all__ = [
    "ENGINES",
    "AdapterConfig",
    "AutoLoRAError",
    "AutoLoRATrainer",
    "ConfigError",
    "DataError",
    "ExportError",
    "GatedLoRALinear",
    "JsonlLogger",
    "Logger",
    "LoggingConfig",
    "NonFiniteError",
    "NullLogger",
    "PrunePlan",
    "SearchConfig",
    "StateError",
    "TargetError",
    "TensorBoardLogger",
    "__version__",
    "peft_config",
]
