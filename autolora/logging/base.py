"""The logger protocol (``log``, ``log_dict``, ``log_config``, ``close``) and its plain kinds.

The trainer decides *what* and *when* to log; loggers only write. Beyond the protocol, loggers
may take histograms, images, text, hyperparameters and a chart layout (:class:`LoggerBase` has
no-op defaults); a user's own logger needs only the four protocol methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Logger(Protocol):
    """What ``fit`` needs of a logger."""

    def log(self, name: str, value: float, step: int) -> None: ...

    def log_dict(self, values: Mapping[str, float], step: int) -> None: ...

    def log_config(self, config: Mapping[str, object]) -> None: ...

    def close(self) -> None: ...


class LoggerBase:
    """The protocol plus optional rich records, all no-ops; subclasses override what they store.

    Attributes:
        takes_images: Whether :meth:`log_image` stores anything; figures are drawn (matplotlib,
            tens of milliseconds each) only for a logger that does.
    """

    takes_images: bool = False

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
        self.takes_images = any(getattr(logger, "takes_images", False) for logger in self.loggers)

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
