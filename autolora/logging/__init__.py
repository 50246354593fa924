"""Logging: the protocol, its TensorBoard and JSONL implementations, and the rank figures.

``LOGGERS`` is the one registry of logger names; ``LoggingConfig.loggers`` accepts its keys.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from autolora.config import LOGGER_NAMES
from autolora.logging.base import Logger, LoggerBase, MultiLogger, NullLogger
from autolora.logging.jsonl import METRICS_FILE, JsonlLogger
from autolora.logging.tensorboard import TensorBoardLogger

LOGGERS: dict[str, type[LoggerBase]] = {"tensorboard": TensorBoardLogger, "jsonl": JsonlLogger}
assert tuple(LOGGERS) == LOGGER_NAMES, "LoggerName in config.py lists the keys of LOGGERS"


def make_logger(log_dir: str | os.PathLike | None, names: Sequence[str]) -> LoggerBase:
    """The loggers called ``names`` writing to ``log_dir`` (a :class:`NullLogger` without one)."""
    if not log_dir:
        return NullLogger()
    return MultiLogger([LOGGERS[n](log_dir) for n in names])


__all__ = [
    "LOGGERS",
    "METRICS_FILE",
    "JsonlLogger",
    "Logger",
    "LoggerBase",
    "MultiLogger",
    "NullLogger",
    "TensorBoardLogger",
    "make_logger",
]
