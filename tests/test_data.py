"""Batch checks, the seeded split, cycling, device moves and the fit / retrain data rules."""

import pytest
import torch

from autolora import DataError, to_device
from autolora.data import Cycle, check_nonempty, check_reiterable, fit_data, lookahead, retrain_batches, split_batches


def test_reiterable_and_nonempty_checks():
    check_reiterable([1], "x")
    with pytest.raises(DataError, match="one-shot iterator"):
        check_reiterable(iter([1]), "x")
    with pytest.raises(DataError, match="re-iterable"):
        check_reiterable(None, "x")
    with pytest.raises(DataError, match="x is empty"):
        check_nonempty([], "x")


def test_split_is_seeded_ordered_and_needs_two_batches():
    train, val = split_batches(list(range(10)), 0.3, seed=0)
    assert len(val) == 3 and train == sorted(train) and val == sorted(val)
    assert split_batches(list(range(10)), 0.3, seed=0) == (train, val)
    with pytest.raises(DataError, match="at least 2"):
        split_batches([1], 0.3, seed=0)


def test_cycle_wraps_and_resumes_mid_cycle():
    c = Cycle([1, 2, 3])
    assert [c.next() for _ in range(4)] == [1, 2, 3, 1] and c.position == 1
    resumed = Cycle([1, 2, 3])
    resumed.position = 2
    assert resumed.next() == 3 and resumed.next() == 1


def test_lookahead_marks_the_last_item():
    assert list(lookahead("ab")) == [(0, "a", False), (1, "b", True)]
    assert list(lookahead([])) == []


def test_to_device_moves_nested_tensors_only():
    batch = {"x": torch.ones(2), "meta": ["a", (torch.zeros(1), 3)]}
    moved = to_device(batch, torch.device("cpu"))
    assert torch.equal(moved["x"], batch["x"]) and moved["meta"][0] == "a" and moved["meta"][1][1] == 3
    assert isinstance(moved["meta"][1], tuple)


def test_fit_and_retrain_data():
    _, val = fit_data(list(range(10)), None, 0.3, 0)
    assert len(val) == 3
    assert fit_data([1, 2], [3], 0.3, 0) == ([1, 2], [3])
    with pytest.raises(DataError, match="val_data is empty"):
        fit_data([1, 2], [], 0.3, 0)
    assert retrain_batches([1, 2], [3]) == [1, 2, 3] and retrain_batches([1], None) == [1]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (lambda: torch.tensor([0, 1, 2, 1]), r"train_data\[1\]: label 2 is out of range; the model has 2 classes"),
        (lambda: torch.tensor([0.0, 1.0, 1.0, 0.0]), "floats would make Hugging Face train it as multi-label"),
        (lambda: torch.tensor([[0], [1], [1], [0]]), r"class labels must be shaped \(batch,\)"),
        (lambda: torch.tensor([0, 1, 1]), "a batch of 4 examples has 3 labels"),
        (lambda: torch.tensor(1), "has a single value"),
    ],
)
def test_labels_that_do_not_fit_the_model_are_named_before_the_first_forward(labels, message, monkeypatch):
    from autolora import AutoLoRATrainer, DataError
    from tests.conftest import bert, token_batches

    batches = token_batches(3)
    batches[1]["labels"] = labels()
    t = AutoLoRATrainer(bert(), max_rank=2, modules_to_save=["classifier"])
    monkeypatch.setattr(t.model, "forward", lambda *a, **k: pytest.fail("a forward ran"))
    with pytest.raises(DataError, match=message):
        t.fit(batches, val_data=token_batches(1))


def test_regression_labels_must_be_floats():
    from autolora import DataError
    from autolora.data import check_labels
    from tests.conftest import bert, token_batches

    batch = token_batches(1)[0]
    with pytest.raises(DataError, match="one output"):
        check_labels(bert(num_labels=1), batch, "train_data")
    check_labels(bert(num_labels=1), {**batch, "labels": batch["labels"].float()}, "train_data")
