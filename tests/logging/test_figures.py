"""TensorBoard dashboards read back with EventAccumulator, and the layer x type grid."""

import json

import numpy as np
import pytest
import torch

from autolora import AutoLoRATrainer
from autolora.logging.dashboard import custom_scalar_layout
from autolora.logging.figures import layer_grid, rank_table
from tests.conftest import bert, token_batches

NAMES = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]


def test_layer_grid_places_layers_and_types():
    grid = layer_grid(NAMES)
    assert grid.rows == ("0", "1")
    assert grid.cols == ("query", "value")
    assert grid.cells["bert.encoder.layer.1.attention.self.value"] == (1, 1)
    # same last component under two paths: the columns keep the full path
    grid = layer_grid(["m.layers.0.attention.output.dense", "m.layers.0.output.dense", "m.layers.10.output.dense"])
    assert grid.cols == ("attention.output.dense", "output.dense")
    assert grid.rows == ("0", "10")
    table = rank_table(dict(zip(NAMES, [3, 4, 1, 2])))
    assert table.splitlines()[2:] == ["| 0 | 3 | 4 |", "| 1 | 1 | 2 |"]


def test_custom_scalar_layout_groups_each_type():
    layout = custom_scalar_layout(NAMES)["AutoLoRA ranks"]
    assert set(layout) == {"query rank by layer", "value rank by layer"}
    import re

    pattern = layout["query rank by layer"][1][0]
    assert re.match(pattern, "rank/bert.encoder.layer.1.attention.self.query")
    assert not re.match(pattern, "rank/bert.encoder.layer.1.attention.self.value")


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A short search logged every step; ranks() recorded after each step."""
    log_dir = tmp_path_factory.mktemp("tb")
    t = AutoLoRATrainer(
        bert(),
        max_rank=4,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        hypergrad="first_order",
        selector_lr=0.5,
        log_dir=str(log_dir),
        log_every=1,
    )
    batches, val = token_batches(5), token_batches(2, seed=3)
    seen = {}
    for _ in range(5):
        t.fit(batches, val, max_steps=1)
        seen[t.state.step] = t.ranks()
    t.close()
    return t, log_dir, seen


def test_event_files_hold_the_dashboard(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import (
        STORE_EVERYTHING_SIZE_GUIDANCE,
        EventAccumulator,
    )

    t, log_dir, seen = logged_run
    acc = EventAccumulator(str(log_dir), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE).Reload()
    tags = acc.Tags()
    names = list(t.adapters)
    expected = {"loss/train", "loss/val", "summary/components", "summary/adapter_params", "lr/weights"}
    expected |= {"lr/selectors"} | {f"rank/{n}" for n in names}
    assert expected <= set(tags["scalars"])
    for name in names:  # integer ranks in [0, max_rank], equal to ranks() at the same step
        events = acc.Scalars(f"rank/{name}")
        assert sorted({e.step for e in events}) == sorted(seen)
        for e in events:
            assert e.value == int(e.value) and 0 <= e.value <= 4
            assert e.value == seen[e.step][name]
    total = {e.step: e.value for e in acc.Scalars("summary/components")}
    assert all(total[s] == sum(r.values()) for s, r in seen.items())
    params = acc.Scalars("summary/adapter_params")[-1].value
    assert params == t.parameter_count()["adapter"]
    assert {f"gates/{n}" for n in names} <= set(tags["histograms"])
    hist = acc.Histograms(f"gates/{names[0]}")
    assert len(hist) >= 5 and hist[-1].histogram_value.num == 4  # four gates
    assert {"ranks/heatmap", "gates/final"} <= set(tags["images"])
    image = acc.Images("ranks/heatmap")[-1]
    assert image.encoded_image_string.startswith(b"\x89PNG") and image.width > 100
    text = acc.Tensors("rank_plan/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| layer | query | value |" in text
    layout = acc.Tensors("custom_scalars__config__")  # custom-scalars layout, written once
    assert len(layout) == 1
    plugins = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins and "_hparams_/experiment" in plugins
    assert acc.Scalars("hparam/mean_rank")[-1].value == pytest.approx(np.mean(list(t.ranks().values())))


def test_jsonl_log_has_gates_and_ranks(logged_run):
    t, log_dir, seen = logged_run
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    scalars = [r for r in records if "kind" not in r]
    assert [r["step"] for r in scalars] == sorted(seen)
    hists = [r for r in records if r.get("kind") == "histogram"]
    final = {r["name"]: r["values"] for r in hists if r["step"] == 5}
    for name, g in t.gates().items():
        assert final[f"gates/{name}"] == pytest.approx(g.tolist())


def test_no_log_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = AutoLoRATrainer(bert(), max_rank=2, target_modules=["query"], hypergrad="first_order")
    t.fit(token_batches(3), max_steps=1)
    assert list(tmp_path.iterdir()) == []
    assert torch.isfinite(t.model.bert.encoder.layer[0].attention.self.query.lora_A).all()


def test_pruning_logs_each_ranks_confidence(tmp_path):
    """The plan's confidence reaches TensorBoard: one scalar per module, a heatmap, a table."""
    from tensorboard.backend.event_processing.event_accumulator import (
        STORE_EVERYTHING_SIZE_GUIDANCE,
        EventAccumulator,
    )

    t = AutoLoRATrainer(
        bert(), max_rank=4, target_modules=["query", "value"], modules_to_save=["classifier"], log_dir=str(tmp_path),
        log_every=1, progress=False,
    )  # fmt: skip
    t.fit(token_batches(6), token_batches(2, seed=3), epochs=2)
    t.prune()
    t.close()
    confidence = t.rank_record()["confidence"]
    assert set(confidence) == set(NAMES) and all(0 <= c <= 1 for c in confidence.values())
    acc = EventAccumulator(str(tmp_path), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE).Reload()
    tags = acc.Tags()
    for name, value in confidence.items():
        assert acc.Scalars(f"confidence/{name}")[-1].value == pytest.approx(value)
    assert "ranks/confidence" in tags["images"]
    texts = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("name") == "rank_confidence" for r in texts)
