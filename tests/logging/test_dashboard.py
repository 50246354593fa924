"""What a search logs per step and at its end, from plain data."""

import json

import pytest

from autolora import JsonlLogger, LoggingConfig, NullLogger
from autolora.logging.dashboard import SearchLog, draws, log_step, log_summary, postfix, step_metrics


def test_step_metrics_hold_losses_ranks_counts_and_rates():
    m = step_metrics({"loss/train": 0.5}, {"a": 2, "b": 4}, 96, 1, loss_scale=None, lrs={"weights": 1e-3})
    assert m == {
        "loss/train": 0.5,
        "rank/a": 2.0,
        "rank/b": 4.0,
        "summary/mean_rank": 3.0,
        "summary/components": 6.0,
        "summary/adapter_params": 96.0,
        "summary/skipped_steps": 1.0,
        "lr/weights": 1e-3,
    }
    assert step_metrics({}, {}, 0, 0, loss_scale=1024.0)["summary/loss_scale"] == 1024.0
    assert postfix(m) == {"train": "0.5", "mean_rank": "3"}


def test_log_step_and_summary_write_plain_data(tmp_path):
    logger = JsonlLogger(tmp_path)
    gates, ranks = {"layer.0.q": [0.5, 0.5], "layer.1.q": [0.9, 0.1]}, {"layer.0.q": 2, "layer.1.q": 1}
    log_step(logger, 3, {"loss/train": 1.0}, gates, ranks, max_rank=2)
    log_summary(logger, 3, gates, ranks, 48, {"max_rank": 2}, {"loss/val": 0.7})
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kinds = [r.get("kind") for r in records]
    assert kinds == [None, "histogram", "histogram", "text", "hparams"]
    assert records[-1]["metrics"] == {"hparam/mean_rank": 1.5, "hparam/adapter_params": 48.0, "hparam/loss_val": 0.7}


def test_figures_are_drawn_only_for_a_logger_that_stores_images(tmp_path, monkeypatch):
    from autolora.logging import dashboard
    from autolora.logging.base import LoggerBase, MultiLogger

    drawn = []
    monkeypatch.setattr(dashboard, "figure_to_array", lambda fig: drawn.append(fig) or fig)
    images = []

    class ImageLogger(LoggerBase):
        takes_images = True

        def log_image(self, name, image, step):
            images.append(name)

    gates, ranks = {"layer.0.q": [0.5, 0.5]}, {"layer.0.q": 2}
    for logger in (JsonlLogger(tmp_path), NullLogger()):
        log_step(logger, 1, {"loss/train": 1.0}, gates, ranks, max_rank=2)
        log_summary(logger, 1, gates, ranks, 8, {}, None)
        dashboard.log_confidence(logger, 1, {"layer.0.q": 0.9}, None)
    assert drawn == []  # matplotlib costs tens of ms a figure: none for loggers that drop them
    both = MultiLogger([JsonlLogger(tmp_path / "b"), ImageLogger()])
    assert both.takes_images
    log_step(both, 1, {"loss/train": 1.0}, gates, ranks, max_rank=2)
    log_summary(both, 1, gates, ranks, 8, {}, None)
    dashboard.log_confidence(both, 1, {"layer.0.q": 0.9}, None)
    assert images == ["ranks/heatmap", "gates/final", "ranks/confidence"] and len(drawn) == 3


def test_search_log_opens_once_and_reads_figures_only_when_it_draws(tmp_path):
    log = SearchLog(LoggingConfig(log_every=2), {"lr": 1})
    null = log.logger(main=True, modules=["fc1"])
    assert isinstance(null, NullLogger) and not draws(null) and log.logger(True, []) is null

    def figures():
        raise AssertionError("a NullLogger must not cost a gate read")

    log.step(null, 4, {"loss/train": 1.0}, figures, max_rank=2)
    assert log.logged_step == 4 and [log.due(s) for s in (1, 2, 3)] == [True, True, False]
    log.close()
    real = SearchLog(LoggingConfig(log_dir=str(tmp_path), loggers=("jsonl",)), {"lr": 1}).logger(True, ["fc1"])
    assert draws(real)
    real.close()


@pytest.mark.parametrize("enabled", [True, False])
def test_no_progress_bar_off_a_terminal(enabled):
    from autolora.logging.dashboard import progress_bar

    assert progress_bar(enabled, 10, "x") is None  # pytest captures stderr: not a terminal


def test_evaluation_loops_get_a_bar_on_a_terminal_only(monkeypatch):
    import sys

    from tqdm.auto import tqdm

    from autolora.logging.dashboard import progress_iter

    items = [1, 2, 3]
    assert progress_iter(items, "x") is items  # captured stderr: not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = progress_iter(items, "dev loss")
    assert isinstance(bar, tqdm) and list(bar) == items and bar.total == 3
    assert progress_iter(items, "x", enabled=False) is items
