"""Logging behind a four-method protocol: ``log``, ``log_dict``, ``log_config``, ``close``.

TensorBoard is one implementation (imported lazily, only when used); JSON lines another, for
machines without TensorBoard. The trainer decides *when* to log; loggers only write.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class Logger(Protocol):
    def log(self, name: str, value: float, step: int) -> None: ...

    def log_dict(self, values: Mapping[str, float], step: int) -> None: ...

    def log_config(self, config: Mapping[str, object]) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    """Logs nothing."""

    def log(self, name: str, value: float, step: int) -> None:
        pass

    def log_dict(self, values: Mapping[str, float], step: int) -> None:
        pass

    def log_config(self, config: Mapping[str, object]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger:
    """One JSON object per ``log_dict`` call in ``<log_dir>/metrics.jsonl``, flushed at once."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(log_dir) / "metrics.jsonl"
        self._file = self.path.open("a")

    def log(self, name: str, value: float, step: int) -> None:
        self.log_dict({name: value}, step)

    def log_dict(self, values: Mapping[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")
        self._file.flush()

    def log_config(self, config: Mapping[str, object]) -> None:
        self._file.write(json.dumps({"config": config}, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger:
    """Scalars to TensorBoard event files in ``log_dir`` (needs the ``tensorboard`` package)."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # pragma: no cover - tensorboard is a dependency
            from autolora.errors import ConfigError

            raise ConfigError(f"log_dir needs the 'tensorboard' package ({e}); pip install tensorboard.") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, name: str, value: float, step: int) -> None:
        self.writer.add_scalar(name, value, step)

    def log_dict(self, values: Mapping[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def log_config(self, config: Mapping[str, object]) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in config.items())  # indented: markdown code block
        self.writer.add_text("config", text, 0)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
