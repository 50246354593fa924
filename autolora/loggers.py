"""Logging behind a four-method protocol: ``log``, ``log_dict``, ``log_config``, ``close``.

TensorBoard is one implementation (imported lazily, only when used); JSON lines another, for
machines without TensorBoard and for ``autolora report``. The trainer decides *what* and *when*
to log; loggers only write. Beyond the protocol, loggers may take histograms, images, text,
hyperparameters and a chart layout (:class:`LoggerBase` has no-op defaults); a user's own
logger needs only the four protocol methods.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from autolora.errors import ConfigError

METRICS_FILE = "metrics.jsonl"


@runtime_checkable
class Logger(Protocol):
    def log(self, name: str, value: float, step: int) -> None: ...

    def log_dict(self, values: Mapping[str, float], step: int) -> None: ...

    def log_config(self, config: Mapping[str, object]) -> None: ...

    def close(self) -> None: ...


class LoggerBase:
    """The protocol plus optional rich records, all no-ops; subclasses override what they store."""

    def log(self, name: str, value: float, step: int) -> None:
        self.log_dict({name: value}, step)

    def log_dict(self, values: Mapping[str, float], step: int) -> None:
        pass

    def log_config(self, config: Mapping[str, object]) -> None:
        pass

    def log_histogram(self, name: str, values: Sequence[float], step: int) -> None:
        pass

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        """``image``: (H, W, 3) uint8."""

    def log_text(self, name: str, text: str, step: int) -> None:
        pass

    def log_hparams(self, hparams: Mapping[str, object], metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_layout(self, layout: Mapping[str, object]) -> None:
        pass

    def close(self) -> None:
        pass


class NullLogger(LoggerBase):
    """Logs nothing."""


class MultiLogger(LoggerBase):
    """Sends every record to each of ``loggers`` (those without a rich method skip it)."""

    def __init__(self, loggers: Sequence[Logger]) -> None:
        self.loggers = list(loggers)

    def _each(self, method: str, *args) -> None:
        for logger in self.loggers:
            fn = getattr(logger, method, None)
            if fn is not None:
                fn(*args)

    def log_dict(self, values, step):
        self._each("log_dict", values, step)

    def log_config(self, config):
        self._each("log_config", config)

    def log_histogram(self, name, values, step):
        self._each("log_histogram", name, values, step)

    def log_image(self, name, image, step):
        self._each("log_image", name, image, step)

    def log_text(self, name, text, step):
        self._each("log_text", name, text, step)

    def log_hparams(self, hparams, metrics, step):
        self._each("log_hparams", hparams, metrics, step)

    def log_layout(self, layout):
        self._each("log_layout", layout)

    def close(self):
        self._each("close")


class JsonlLogger(LoggerBase):
    """One JSON object per record in ``<log_dir>/metrics.jsonl``, flushed at once.

    Scalars: ``{"step": s, name: value, ...}``. Other records carry a ``"kind"`` key
    (``config``, ``histogram``, ``text``, ``hparams``). Images are not stored (the report
    redraws them from the data).
    """

    def __init__(self, log_dir: str | os.PathLike) -> None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(log_dir) / METRICS_FILE
        self._file = self.path.open("a")

    def _write(self, record: Mapping[str, object]) -> None:
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def log_dict(self, values: Mapping[str, float], step: int) -> None:
        self._write({"step": step, **{k: float(v) for k, v in values.items()}})

    def log_config(self, config: Mapping[str, object]) -> None:
        self._write({"kind": "config", "config": dict(config)})

    def log_histogram(self, name: str, values: Sequence[float], step: int) -> None:
        self._write({"kind": "histogram", "name": name, "step": step, "values": [float(v) for v in values]})

    def log_text(self, name: str, text: str, step: int) -> None:
        self._write({"kind": "text", "name": name, "step": step, "text": text})

    def log_hparams(self, hparams: Mapping[str, object], metrics: Mapping[str, float], step: int) -> None:
        self._write({"kind": "hparams", "step": step, "hparams": dict(hparams), "metrics": dict(metrics)})

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger(LoggerBase):
    """TensorBoard event files in ``log_dir`` (needs the ``tensorboard`` package)."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(
                f"TensorBoard logging needs the 'tensorboard' package ({e}); pip install tensorboard, "
                "or log with loggers=('jsonl',)."
            ) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self._layout_written = False

    def log_dict(self, values: Mapping[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def log_config(self, config: Mapping[str, object]) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in config.items())  # indented: markdown code block
        self.writer.add_text("config", text, 0)

    def log_histogram(self, name: str, values: Sequence[float], step: int) -> None:
        self.writer.add_histogram(name, np.asarray(values, dtype=np.float64), step)

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(name, image, step, dataformats="HWC")

    def log_text(self, name: str, text: str, step: int) -> None:
        self.writer.add_text(name, text, step)

    def log_hparams(self, hparams: Mapping[str, object], metrics: Mapping[str, float], step: int) -> None:
        # the summary triple in *this* run (add_hparams would start a sub-run folder)
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        for summary in hparams_summary(clean, dict(metrics)):
            self.writer.file_writer.add_summary(summary)
        self.log_dict(metrics, step)

    def log_layout(self, layout: Mapping[str, object]) -> None:
        if not self._layout_written:  # TensorBoard expects one layout per writer
            self.writer.add_custom_scalars(dict(layout))
            self._layout_written = True

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


LOGGERS = {"tensorboard": TensorBoardLogger, "jsonl": JsonlLogger}


def make_logger(log_dir: str | os.PathLike | None, names: Sequence[str]) -> LoggerBase:
    """The loggers called ``names`` writing to ``log_dir`` (a :class:`NullLogger` without one)."""
    if not log_dir:
        return NullLogger()
    return MultiLogger([LOGGERS[n](log_dir) for n in names])
