"""TensorBoard logging (the ``tensorboard`` package is imported only when a logger is made)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from autolora.errors import ConfigError
from autolora.logging.base import LoggerBase


class TensorBoardLogger(LoggerBase):
    """TensorBoard event files in ``log_dir`` (needs the ``tensorboard`` package)."""

    takes_images = True

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
