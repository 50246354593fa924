"""What the search shows on its dashboards at each logged step and at its end.

Functions take plain data (the step, metrics, gate values, ranks), never the trainer, so the
trainer decides what to read and when (a read of the gates costs a device sync).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence

from autolora.config import LoggingConfig
from autolora.logging import make_logger
from autolora.logging.base import LoggerBase, NullLogger
from autolora.logging.figures import figure_to_array, gate_heatmap, layer_grid, rank_heatmap, rank_table


def draws(logger: LoggerBase) -> bool:
    """Whether ``logger`` takes figures and histograms (a :class:`NullLogger` does not)."""
    return not isinstance(logger, NullLogger)


def custom_scalar_layout(names: Sequence[str], prefix: str = "rank/") -> dict:
    """TensorBoard custom-scalars layout: one multiline chart per module type, all its layers."""
    grid = layer_grid(names)
    charts = {}
    for j, col in enumerate(grid.cols):
        members = [n for n in names if grid.cells[n][1] == j]
        pattern = re.escape(prefix) + "(" + "|".join(re.escape(n) for n in members) + ")$"
        charts[f"{col} rank by layer"] = ["Multiline", [pattern]]
    return {"AutoLoRA ranks": charts}


def step_metrics(
    losses: Mapping[str, float],
    ranks: Mapping[str, int],
    adapter_params: int,
    skipped_steps: int,
    loss_scale: float | None = None,
    lrs: Mapping[str, float] | None = None,
    compiled: tuple[float, int] | None = None,
) -> dict[str, float]:
    """The scalars of a logged step: ``losses``, each module's rank, the summary counts, the
    float16 loss scale (if any), the learning rates (``{"weights": lr, ...}``) and, for a
    compiled search, (seconds spent compiling, graphs compiled) so far."""
    metrics = {k: float(v) for k, v in losses.items()}
    metrics.update({f"rank/{n}": float(r) for n, r in ranks.items()})
    metrics["summary/mean_rank"] = sum(ranks.values()) / max(len(ranks), 1)
    metrics["summary/components"] = float(sum(ranks.values()))
    metrics["summary/adapter_params"] = float(adapter_params)
    metrics["summary/skipped_steps"] = float(skipped_steps)
    if loss_scale is not None:
        metrics["summary/loss_scale"] = loss_scale
    metrics.update({f"lr/{k}": float(v) for k, v in (lrs or {}).items()})
    if compiled is not None:
        metrics["compile/seconds"], metrics["compile/graphs"] = float(compiled[0]), float(compiled[1])
    return metrics


def log_step(
    logger: LoggerBase,
    step: int,
    metrics: Mapping[str, float],
    gates: Mapping[str, Sequence[float]] | None = None,
    ranks: Mapping[str, int] | None = None,
    max_rank: int = 1,
) -> None:
    """Scalars, and with ``gates`` and ``ranks`` each module's gate histogram and the rank heatmap."""
    logger.log_dict(metrics, step)
    if gates is None or ranks is None:
        return
    for name, g in gates.items():
        logger.log_histogram(f"gates/{name}", g, step)
    if logger.takes_images:
        fig = rank_heatmap(ranks, max_rank, f"ranks at step {step}")
        logger.log_image("ranks/heatmap", figure_to_array(fig), step)


def log_summary(
    logger: LoggerBase,
    step: int,
    gates: Mapping[str, Sequence[float]],
    ranks: Mapping[str, int],
    adapter_params: int,
    hparams: Mapping[str, object],
    last: Mapping[str, float] | None,
) -> None:
    """The end of a search: final gate heatmap, the rank table and the hyperparameters."""
    if logger.takes_images:
        logger.log_image("gates/final", figure_to_array(gate_heatmap(gates)), step)
    logger.log_text("rank_plan", rank_table(ranks), step)
    final = {
        "hparam/mean_rank": sum(ranks.values()) / len(ranks),
        "hparam/adapter_params": float(adapter_params),
    }
    if last and "loss/val" in last:
        final["hparam/loss_val"] = last["loss/val"]
    logger.log_hparams(dict(hparams), final, step)


def log_stopped(logger: LoggerBase, step: int, patience: int, log_every: int) -> None:
    """Say that the search ended early because its plan had stopped changing."""
    logger.log_dict({"summary/stopped_at": float(step)}, step)
    logger.log_text(
        "search/stopped",
        f"search stopped at step {step}: the rank plan was the same at the last {patience} logged steps "
        f"(every {log_every} steps); stop_when_stable={patience}.",
        step,
    )


def log_confidence(logger: LoggerBase, step: int, confidence: Mapping[str, float], warning: str | None) -> None:
    """The pruned plan's confidence: one ``confidence/<module>`` scalar each, their layer x type
    heatmap and table, and the warning when the components were not separated (nothing for a
    logger that does not draw)."""
    if not draws(logger):
        return
    logger.log_dict({f"confidence/{n}": float(c) for n, c in confidence.items()}, step)
    if not confidence:
        return
    if logger.takes_images:
        fig = rank_heatmap(confidence, 1.0, "confidence of each rank", label="confidence", fmt="{:.2f}")
        logger.log_image("ranks/confidence", figure_to_array(fig), step)
    text = rank_table(confidence, "{:.2f}")
    logger.log_text("rank_confidence", f"**warning:** {warning}\n\n{text}" if warning else text, step)


class SearchLog:
    """The search's logger, opened on first use, and the step at which it last logged.

    Args:
        config: Where and how often to log.
        hparams: The run's settings, logged once when the logger opens.
    """

    def __init__(self, config: LoggingConfig, hparams: Mapping[str, object]) -> None:
        self.config, self.hparams = config, dict(hparams)
        self.logged_step = -1
        self._logger: LoggerBase | None = None

    def logger(self, main: bool, modules: Sequence[str]) -> LoggerBase:
        """The logger (a :class:`NullLogger` off the main process or without ``log_dir``)."""
        if self._logger is None:
            self._logger = make_logger(self.config.log_dir if main else None, self.config.loggers)
            self._logger.log_config(self.hparams)
            if modules:
                self._logger.log_layout(custom_scalar_layout(list(modules)))
        return self._logger

    def due(self, step: int) -> bool:
        return step == 1 or step % self.config.log_every == 0

    def step(
        self,
        logger: LoggerBase,
        step: int,
        metrics: Mapping[str, float],
        figures: Callable[[], tuple[dict[str, list[float]], dict[str, int]]] | None,
        max_rank: int,
    ) -> None:
        """Log step ``step``; ``figures()`` gives (gates, ranks), read only if the logger draws."""
        self.logged_step = step
        if figures is None or not draws(logger):
            log_step(logger, step, metrics)
            return
        gates, ranks = figures()
        log_step(logger, step, metrics, gates, ranks, max_rank)

    def close(self) -> None:
        if self._logger is not None:
            self._logger.close()
            self._logger = None


def progress_bar(enabled: bool, total: int | None, desc: str):
    """A tqdm bar when ``enabled`` and attached to a terminal, else ``None``."""
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step")


def progress_iter(items: Sequence, desc: str, enabled: bool = True) -> Iterable:
    """``items`` through a tqdm bar (one tick per batch, cleared when done) when ``enabled`` and
    stderr is a terminal, else ``items`` as they are: evaluation and generation loops."""
    if not (enabled and sys.stderr.isatty()):
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="batch", leave=False)


def postfix(metrics: Mapping[str, float]) -> dict[str, str]:
    """The progress bar's short view of a step's metrics."""
    shown = {"train": "loss/train", "val": "loss/val", "mean_rank": "summary/mean_rank"}
    return {k: f"{metrics[m]:.4g}" for k, m in shown.items() if m in metrics}
