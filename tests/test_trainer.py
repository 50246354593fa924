import pytest
import torch

from autolora import AutoLoRAError, AutoLoRATrainer, DataError, NonFiniteError
from autolora.data import split_batches
from tests.conftest import MLP, bert, mlp_batches, mlp_loss, token_batches


def _mlp(**kw):
    kw.setdefault("hypergrad", "darts")
    kw.setdefault("selector_every", 1)
    return AutoLoRATrainer(
        MLP(), max_rank=4, target_modules=["fc1", "fc2"], modules_to_save=["head"], loss_fn=mlp_loss, **kw
    )


def _params(t):
    return {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}


def test_epochs_and_max_steps():
    t = _mlp()
    t.fit(mlp_batches(10), epochs=2)  # 10 batches -> 7 train + 3 validation
    assert (t.state.step, t.state.epoch) == (14, 2)
    t = _mlp()
    t.fit(mlp_batches(10), epochs=5, max_steps=3)
    assert (t.state.step, t.state.epoch, t.state.batch_in_epoch) == (3, 0, 3)


def test_fit_continues_where_it_stopped():
    batches, val = mlp_batches(5), mlp_batches(2, seed=9)
    once = _mlp()
    once.fit(batches, val, epochs=2)
    twice = _mlp()
    twice.fit(batches, val, max_steps=3)
    twice.fit(batches, val, epochs=2, max_steps=7)  # finishes epoch 1, then 5 steps of epoch 2
    assert twice.state == once.state
    for (n, a), b in zip(_params(once).items(), _params(twice).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_split_is_seeded_and_thirty_percent():
    batches = list(range(10))
    train, val = split_batches(batches, 0.3, seed=0)
    assert len(val) == 3 and sorted(train + val) == batches
    assert split_batches(batches, 0.3, seed=0) == (train, val)
    assert len(split_batches(list(range(3)), 0.3, seed=0)[1]) == 1  # at least one


def test_training_moves_weights_selectors_and_lowers_loss():
    t = _mlp(selector_lr=0.05, lr=1e-2)
    batches = mlp_batches(8)
    before = _params(t)
    first = t.step(batches[0], batches[1])["loss/train"]
    t.fit(batches, epochs=15)
    after = _params(t)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert t.step(batches[0], batches[1])["loss/train"] < first


def test_selector_every_skips_selector_steps():
    t = _mlp(selector_every=3)
    batches = mlp_batches(10)
    sel = {n: a.selector.detach().clone() for n, a in t.adapters.items()}
    t.fit(batches, val_data=batches[:2], max_steps=2)
    assert all(torch.equal(a.selector, sel[n]) for n, a in t.adapters.items())
    t.fit(batches, val_data=batches[:2], max_steps=1)
    assert all(not torch.equal(a.selector, sel[n]) for n, a in t.adapters.items())


@pytest.mark.parametrize("bad", [[], iter(mlp_batches(3)), None])
def test_bad_train_data(bad):
    with pytest.raises(DataError):
        _mlp().fit(bad)


def test_bad_val_data_and_single_batch():
    with pytest.raises(DataError, match="val_data is empty"):
        _mlp().fit(mlp_batches(3), val_data=[])
    with pytest.raises(DataError, match="one-shot iterator"):
        _mlp().fit(mlp_batches(3), val_data=(b for b in mlp_batches(2)))
    with pytest.raises(DataError, match="at least 2"):
        _mlp().fit(mlp_batches(1))


def test_missing_labels_is_a_clear_error():
    t = AutoLoRATrainer(bert(), max_rank=4, selector_every=1)
    with pytest.raises(DataError, match="'labels'"):
        t.fit(token_batches(4, labels="none"))


@pytest.mark.parametrize("engine", ["first_order", "darts", "unrolled", "higher"])
def test_non_finite_loss_stops_before_any_update(engine):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = mlp_loss(model, batch)
        return loss * float("nan") if calls["n"] > 3 else loss

    t = AutoLoRATrainer(
        MLP(), max_rank=4, target_modules=["fc1", "fc2"], loss_fn=loss_fn, hypergrad=engine, selector_every=1
    )
    with pytest.raises(NonFiniteError, match=r"step \d+: the .* is not finite"):
        t.fit(mlp_batches(6), epochs=3)
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_nan_step_leaves_parameters_unchanged():
    t = _mlp()
    batches = mlp_batches(4)
    t.fit(batches, max_steps=1)
    before = _params(t)
    bad = (batches[0][0] * float("nan"), batches[0][1])
    with pytest.raises(NonFiniteError, match="step 2: the train loss"):
        t.step(bad, batches[1])
    assert all(torch.equal(before[n], p) for n, p in _params(t).items())
    assert t.state.step == 1


def test_bad_fit_arguments():
    with pytest.raises(AutoLoRAError, match="epochs=0"):
        _mlp().fit(mlp_batches(3), epochs=0)
    with pytest.raises(AutoLoRAError, match="max_steps=-1"):
        _mlp().fit(mlp_batches(3), max_steps=-1)


def test_tensorboard_logs_integer_ranks(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import (
        STORE_EVERYTHING_SIZE_GUIDANCE,
        EventAccumulator,
    )

    t = _mlp(log_dir=str(tmp_path), log_every=4, selector_lr=0.1)
    t.fit(mlp_batches(10), epochs=1)  # 7 steps: logged at 1, 4 and the last (7)
    t.close()
    acc = EventAccumulator(str(tmp_path), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE).Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss/train", "loss/val", "rank/fc1", "rank/fc2"} <= set(tags)
    assert [e.step for e in acc.Scalars("rank/fc1")] == [1, 4, 7]
    for name in ("fc1", "fc2"):
        values = [e.value for e in acc.Scalars(f"rank/{name}")]
        assert all(v == int(v) and 1 <= v <= 4 for v in values)
        assert values[-1] == t.ranks()[name]
