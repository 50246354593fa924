import copy

import pytest
import torch

from autolora import AutoLoRATrainer, StateError, linear_warmup, peft_config
from tests.conftest import MLP, bert, gpt2, load_peft, mlp_batches, mlp_loss, token_batches


def _searched_bert():
    model = bert()
    base = copy.deepcopy(model)
    t = AutoLoRATrainer(
        model, max_rank=6, modules_to_save=["classifier"], hypergrad="first_order", selector_lr=0.1, selector_every=1
    )
    batches = token_batches(8)
    t.fit(batches, epochs=3)
    return t, base, batches


def test_retrain_reinitialises_trains_and_exports(tmp_path):
    t, base, batches = _searched_bert()
    with pytest.raises(StateError, match="call prune"):
        t.retrain(batches)
    plan = t.prune(target_rank=3)
    t.retrain(batches, epochs=1, max_steps=1, lr=5e-3)  # one step from the fresh init
    for name, adapter in t.adapters.items():
        assert adapter.rank == plan[name] and adapter.gate == "fixed"
        assert adapter.scale == pytest.approx(16 / plan[name])  # PEFT's lora_alpha / r_k
        assert not adapter.selector.requires_grad
    losses_before = [float(t.problem.loss(b)) for b in batches]
    t.retrain(batches, epochs=40, lr=2e-2)  # starts over, then trains
    losses_after = [float(t.problem.loss(b)) for b in batches]
    assert sum(losses_after) < 0.8 * sum(losses_before)
    t.export(tmp_path / "a")
    peft_model = load_peft(base, tmp_path / "a")
    t.model.eval()
    with torch.no_grad():
        b = batches[0]
        want = t.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        got = peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert float((got - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))


def test_retrain_starts_modules_to_save_over():
    t, base, batches = _searched_bert()
    initial = base.classifier.weight.detach().clone()  # the head as the search started
    t.prune()
    t.retrain(batches, max_steps=1, lr=1e-12)  # a negligible step: the head is back at its start
    torch.testing.assert_close(t.model.classifier.weight, initial, rtol=0, atol=1e-9)


def test_peft_config_builds_planned_shapes():
    from peft import get_peft_model

    t, base, _ = _searched_bert()
    plan = t.prune(target_rank=2)
    assert len(set(plan.values())) > 1  # ranks differ across layers
    model = get_peft_model(base, peft_config(plan, lora_alpha=16, modules_to_save=["classifier"]))
    for name, r in plan.items():
        layer = model.base_model.model.get_submodule(name)
        assert layer.lora_A["default"].weight.shape == (r, 32)
        assert layer.lora_B["default"].weight.shape == (32, r)
        assert layer.scaling["default"] == pytest.approx(16 / r)
    adapted = {n for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(plan)


def test_merged_export_matches_adapter_model(tmp_path):
    from transformers import BertForSequenceClassification

    t, _, batches = _searched_bert()
    t.prune()
    t.export_merged(tmp_path / "m")
    merged = BertForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    t.model.eval()
    b = batches[0]
    with torch.no_grad():
        want = t.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        got = merged(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert any(type(m).__name__ == "GatedLoRALinear" for m in t.model.modules())  # trainer.model untouched


def test_merged_export_of_a_tied_lm_head_leaves_embeddings_alone(tmp_path):
    from transformers import GPT2LMHeadModel

    model = gpt2()
    base = copy.deepcopy(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    t = AutoLoRATrainer(
        model, max_rank=4, target_modules=["c_attn", "lm_head"], hypergrad="first_order", lr=1e-2, selector_every=1
    )
    batches = token_batches(6, labels="lm")
    t.fit(batches, epochs=2)
    t.export_merged(tmp_path / "m")
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(merged.transformer.wte.weight, base.transformer.wte.weight)
    assert not torch.allclose(merged.lm_head.weight, base.lm_head.weight)
    t.model.eval()
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, t.model(ids).logits, rtol=1e-5, atol=1e-5)


def test_merged_export_plain_model(tmp_path):
    from safetensors.torch import load_file

    t = AutoLoRATrainer(MLP(), max_rank=3, target_modules=["fc1", "fc2"], loss_fn=mlp_loss, lr=1e-2, selector_every=1)
    batches = mlp_batches(6)
    t.fit(batches, epochs=2)
    t.export_merged(tmp_path / "m")
    fresh = MLP()
    fresh.load_state_dict(load_file(str(tmp_path / "m" / "model.safetensors")))
    t.model.eval()
    torch.testing.assert_close(fresh(batches[0][0]), t.model(batches[0][0]), rtol=1e-5, atol=1e-6)


def test_linear_warmup_rises_then_decays_to_zero():
    f = linear_warmup(total=10, warmup=2)
    assert [f(i) for i in range(4)] == [0.5, 1.0, 1.0, 7 / 8]
    assert f(10) == 0.0 and linear_warmup(5, 0)(0) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1e-3}, "lr=-0.001 is invalid"),
        ({"lr": float("nan")}, "lr=nan is invalid"),
        ({"warmup_ratio": 1.0}, r"warmup_ratio=1.0 is invalid; it must be a number in \[0, 1\)"),
        ({"warmup_ratio": -0.1}, "warmup_ratio=-0.1 is invalid"),
        ({"max_steps": 0}, "max_steps=0 is invalid"),
        ({"epochs": 0}, "epochs=0 is invalid"),
    ],
)
def test_retrain_arguments_are_checked_before_anything_changes(kwargs, message):
    from autolora import ConfigError

    t = AutoLoRATrainer(MLP(), loss_fn=mlp_loss, max_rank=2, target_modules=["fc1"], modules_to_save=["head"])
    t.fit(mlp_batches(4), max_steps=1)
    t.prune(target_rank=1)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    with pytest.raises(ConfigError, match=message):
        t.retrain(mlp_batches(4), **kwargs)
    assert all(torch.equal(p, before[n]) for n, p in t.model.named_parameters())
    assert not t.retrained


def test_a_finished_retrain_is_loaded_from_its_checkpoint_not_redone(tmp_path, monkeypatch):
    import autolora.trainer

    def searched():
        t = AutoLoRATrainer(MLP(), loss_fn=mlp_loss, max_rank=2, target_modules=["fc1"], modules_to_save=["head"])
        t.fit(mlp_batches(4), max_steps=2)
        t.prune(target_rank=1)
        return t

    first = searched().retrain(mlp_batches(4), epochs=2, checkpoint_dir=tmp_path)
    assert first.retrained and len(list(tmp_path.iterdir())) == 1
    monkeypatch.setattr(autolora.trainer, "retrain_loop", lambda *a, **k: pytest.fail("retrained again"))
    again = searched().retrain(mlp_batches(4), epochs=2, checkpoint_dir=tmp_path)
    assert again.retrained
    for (n, p), q in zip(first.model.named_parameters(), again.model.parameters()):
        assert torch.equal(p, q), n
    monkeypatch.undo()
    other = searched().retrain(mlp_batches(4), epochs=1, checkpoint_dir=tmp_path)  # other arguments: retrains
    assert other.retrained
