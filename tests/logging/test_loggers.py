"""The logger protocol and its implementations: null, multi, JSONL and TensorBoard."""

import json

import numpy as np
import pytest

from autolora import JsonlLogger, Logger, NullLogger, TensorBoardLogger
from autolora.logging import LOGGERS, MultiLogger, make_logger


class Recorder:
    """A user's logger: the four protocol methods only."""

    def __init__(self):
        self.calls = []

    def log(self, name, value, step):
        self.calls.append(("log", name, value, step))

    def log_dict(self, values, step):
        self.calls.append(("log_dict", dict(values), step))

    def log_config(self, config):
        self.calls.append(("log_config", dict(config)))

    def close(self):
        self.calls.append(("close",))


def test_every_logger_satisfies_the_protocol(tmp_path):
    assert isinstance(Recorder(), Logger) and isinstance(NullLogger(), Logger)
    jsonl = JsonlLogger(tmp_path)
    assert isinstance(jsonl, Logger)
    jsonl.close()


def test_null_logger_takes_everything_and_writes_nothing(tmp_path):
    null = NullLogger()
    null.log("a", 1.0, 1)
    null.log_histogram("h", [1.0], 1)
    null.log_image("i", np.zeros((2, 2, 3), np.uint8), 1)
    null.close()
    assert isinstance(make_logger(None, ["jsonl"]), NullLogger)


def test_multi_logger_fans_out_and_skips_missing_rich_methods():
    rec = Recorder()
    multi = MultiLogger([rec, NullLogger()])
    multi.log("loss", 2.0, 3)  # LoggerBase.log routes through log_dict
    multi.log_histogram("h", [1.0], 3)  # the recorder has none: skipped
    multi.log_config({"lr": 1})
    multi.close()
    assert rec.calls == [("log_dict", {"loss": 2.0}, 3), ("log_config", {"lr": 1}), ("close",)]


def test_jsonl_records_scalars_and_kinds(tmp_path):
    logger = JsonlLogger(tmp_path)
    logger.log_dict({"loss": np.float32(0.5)}, 2)
    logger.log_config({"max_rank": 8})
    logger.log_histogram("gates/fc1", [0.25, 0.75], 2)
    logger.log_text("plan", "| a |", 2)
    logger.log_hparams({"lr": 1e-3}, {"hparam/x": 1.0}, 2)
    logger.log_image("img", np.zeros((2, 2, 3), np.uint8), 2)  # not stored
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"step": 2, "loss": 0.5}
    assert [r.get("kind") for r in records] == [None, "config", "histogram", "text", "hparams"]


def test_tensorboard_writes_scalars_layout_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path)
    logger.log_dict({"loss/train": 1.5}, 1)
    logger.log_layout({"ranks": {"chart": ["Multiline", ["rank/.*"]]}})
    logger.log_layout({"ignored": {}})  # one layout per writer
    logger.log_histogram("gates/fc1", [0.1, 0.9], 1)
    logger.log_hparams({"lr": 1e-3, "targets": ("q",)}, {"hparam/mean_rank": 2.0}, 1)
    logger.close()
    acc = EventAccumulator(str(tmp_path)).Reload()
    assert [e.value for e in acc.Scalars("loss/train")] == [1.5]
    assert "gates/fc1" in acc.Tags()["histograms"] and "hparam/mean_rank" in acc.Tags()["scalars"]


@pytest.mark.parametrize("names", [["jsonl"], ["tensorboard", "jsonl"]])
def test_make_logger_builds_the_named_loggers(tmp_path, names):
    logger = make_logger(tmp_path, names)
    assert [type(x) for x in logger.loggers] == [LOGGERS[n] for n in names]
    logger.close()
