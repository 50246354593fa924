"""JSON lines logging: ``metrics.jsonl``, for machines without TensorBoard and for ``autolora report``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from autolora.logging.base import LoggerBase

METRICS_FILE = "metrics.jsonl"


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
