"""The fit loop's budget and micro-batch grouping."""

from autolora.search.loop import Budget, StableStop, micro_batches
from autolora.state import TrainerState


def test_budget_counts_from_the_call_start():
    budget = Budget(start_step=4, start_epoch=1, epochs=2, max_steps=3)
    assert not budget.out_of_steps(TrainerState(step=6)) and budget.out_of_steps(TrainerState(step=7))
    assert not budget.out_of_epochs(TrainerState(epoch=2)) and budget.out_of_epochs(TrainerState(epoch=3))
    assert budget.steps_left(TrainerState(step=4, epoch=1), n_batches=10, accum=1) == 3
    assert Budget(0, 0, epochs=2).steps_left(TrainerState(), n_batches=5, accum=2) == 6
    assert Budget(0, 0, epochs=1).steps_left(TrainerState(), n_batches=None, accum=1) is None


def test_micro_batches_group_skip_and_mark_the_epoch_end():
    assert list(micro_batches("abcde", 2, skip=0)) == [(1, ["a", "b"], False), (3, ["c", "d"], False), (4, ["e"], True)]
    assert list(micro_batches("abcde", 2, skip=2)) == [(3, ["c", "d"], False), (4, ["e"], True)]
    assert list(micro_batches("abc", 1, skip=3)) == []


def test_stable_stop_needs_patience_identical_plans_after_min_step():
    watch = StableStop(patience=3, min_step=10)
    a, b = {"m": 2}, {"m": 3}
    assert [watch.update(s, p) for s, p in [(2, a), (4, a), (6, b), (8, b)]] == [False] * 4
    assert not watch.update(9, b)  # three identical plans, but before min_step
    assert watch.update(10, b)
    assert not StableStop(patience=2).update(1, a)  # one plan is not a plateau
