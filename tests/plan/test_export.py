import copy
import json

import pytest
import torch

from autolora import AutoLoRAError, AutoLoRATrainer, ExportError
from tests.conftest import MLP, load_peft, mlp_batches, mlp_loss


def _max_err(a, b):
    return float((a - b).abs().max()), float(max(1.0, b.abs().max()))


@pytest.mark.parametrize("pruned", [False, True], ids=["unpruned", "pruned"])
def test_peft_reload_reproduces_outputs(case, pruned, tmp_path):
    name, model, kwargs, batches, forward = case
    base = copy.deepcopy(model)
    t = AutoLoRATrainer(model, selector_lr=0.05, hypergrad="first_order", **kwargs)
    t.fit(batches, epochs=2)
    if pruned:
        t.prune()
    t.export(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "ranks.json"]
    peft_model = load_peft(base, tmp_path / "adapter")
    t.model.eval()
    with torch.no_grad():
        for batch in batches[:2]:
            got, want = forward(peft_model, batch), forward(t.model, batch)
            err, scale = _max_err(got, want)
            assert err <= 1e-5 * scale, (name, err)
            # the adapter matters: without it the outputs differ
            with peft_model.disable_adapter():
                assert _max_err(forward(peft_model, batch), want)[0] > 1e3 * err
    # PEFT built exactly the exported ranks (unpruned: every component)
    physical = {n: a.rank for n, a in t.adapters.items()}
    assert physical == (t.ranks() if pruned else dict.fromkeys(physical, kwargs["max_rank"]))
    for module_name, r in physical.items():
        lora = peft_model.base_model.model.get_submodule(module_name)
        assert lora.lora_A["default"].weight.shape[0] == r
        assert lora.scaling["default"] == 1.0


def test_config_uses_anchored_patterns(tmp_path):
    t = AutoLoRATrainer(MLP(), max_rank=4, target_modules=["fc1", "fc2"], modules_to_save=["head"], loss_fn=mlp_loss)
    t.export(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["target_modules"] == ["fc1", "fc2"]
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {"^fc1": 4, "^fc2": 4}
    assert cfg["modules_to_save"] == ["head"] and cfg["use_rslora"] is False
    record = json.loads((tmp_path / "a" / "ranks.json").read_text())
    assert record["ranks"] == {"fc1": 4, "fc2": 4} and len(record["gates"]["fc1"]) == 4


def test_rank_zero_module_left_out_and_loads(tmp_path):
    model = MLP()
    base = copy.deepcopy(model)
    t = AutoLoRATrainer(model, max_rank=4, target_modules=["fc1", "fc2"], loss_fn=mlp_loss)
    batches = mlp_batches(6)
    t.fit(batches, epochs=2)
    with torch.no_grad():  # fc2's update a millionth of fc1's: below any sensible cut
        t.adapters["fc2"].lora_B.mul_(1e-6)
    plan = t.prune(threshold=0.5, min_rank=0)
    assert plan["fc1"] >= 1 and plan["fc2"] == 0
    t.export(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    removed = [n for n, r in plan.items() if r == 0]
    assert removed and all(n not in cfg["target_modules"] for n in removed)
    peft_model = load_peft(base, tmp_path / "a")
    t.model.eval()
    x = batches[0][0]
    torch.testing.assert_close(peft_model(x), t.model(x), rtol=1e-5, atol=1e-6)


def test_export_refuses_non_empty_folder_and_files(tmp_path):
    t = AutoLoRATrainer(MLP(), max_rank=2, target_modules=["fc1"], loss_fn=mlp_loss)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="non-empty folder"):
        t.export(target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    t.export(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "ranks.json",
    ]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        t.export(tmp_path / "file")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_crash_mid_export_leaves_nothing(tmp_path, monkeypatch):
    import autolora.plan.export as export

    t = AutoLoRATrainer(MLP(), max_rank=2, target_modules=["fc1"], loss_fn=mlp_loss)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(AutoLoRAError, match="disk full"):  # one clear error naming the path
        t.export(tmp_path / "a")
    assert list(tmp_path.iterdir()) == []
    assert export.CONFIG_NAME == "adapter_config.json"


@pytest.mark.parametrize(
    "make, task_type", [("bert", "SEQ_CLS"), ("gpt2", "CAUSAL_LM"), ("llama", "CAUSAL_LM"), ("mlp", None)]
)
def test_task_type_and_base_model_name(make, task_type, tmp_path):
    from tests.conftest import CASES

    factory, kwargs, make_batches, forward = CASES[make]
    model = factory()
    base = copy.deepcopy(model)
    if make == "bert":
        kwargs = {"max_rank": 4}  # no modules_to_save: SEQ_CLS makes PEFT wrap the classifier anyway
    t = AutoLoRATrainer(model, hypergrad="first_order", **kwargs)
    if hasattr(model, "config"):
        model.config._name_or_path = "org/base"
    t.fit(make_batches(), epochs=1)
    t.export(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["task_type"] == task_type
    assert cfg["base_model_name_or_path"] == ("org/base" if make != "mlp" else None)
    if make == "bert":
        assert cfg["modules_to_save"] == ["classifier"]
    peft_model = load_peft(base, tmp_path / "a")  # fails on missing or unexpected keys
    t.model.eval()
    with torch.no_grad():
        batch = make_batches()[0]
        err, scale = _max_err(forward(peft_model, batch), forward(t.model, batch))
        assert err <= 1e-5 * scale
