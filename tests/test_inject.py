import pytest
import torch
from torch import nn

from autolora import AutoLoRAError, AutoLoRATrainer, GatedLoRALinear, TargetError
from tests.conftest import MLP, bert, gpt2, llama, mlp_loss


def _names(trainer):
    return list(trainer.adapters)


def test_default_targets_follow_peft():
    assert all(n.endswith(("query", "value")) for n in _names(AutoLoRATrainer(bert(), max_rank=4)))
    assert len(_names(AutoLoRATrainer(bert(), max_rank=4))) == 4
    assert all(n.endswith("c_attn") for n in _names(AutoLoRATrainer(gpt2(), max_rank=4)))
    names = _names(AutoLoRATrainer(llama(), max_rank=4))
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)


def test_list_regex_and_all_linear():
    t = AutoLoRATrainer(bert(), max_rank=4, target_modules=["layer.0.attention.self.key", "dense"])
    names = _names(t)
    assert "bert.encoder.layer.0.attention.self.key" in names
    assert all(n.endswith(("key", "dense")) for n in names) and "bert.pooler.dense" in names
    t = AutoLoRATrainer(bert(), max_rank=4, target_modules=r".*layer\.1\.attention\.self\.(query|key)")
    assert _names(t) == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.key"]
    t = AutoLoRATrainer(llama(), max_rank=4, target_modules="all-linear")
    names = _names(t)
    assert "lm_head" not in names and len(names) == 2 * 7  # q k v o gate up down per layer


def test_modules_to_save_excluded_from_targets_and_trainable():
    t = AutoLoRATrainer(bert(), max_rank=4, target_modules="all-linear", modules_to_save=["classifier"])
    assert "classifier" not in t.adapters and t.modules_to_save == ["classifier"]
    trainable = {n for n, p in t.model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(("lora_" in n or "selector" in n or n.startswith("classifier")) for n in trainable)
    assert not any(p.requires_grad for n, p in t.model.named_parameters() if "base_layer" in n)


def test_injection_in_place_and_get_submodule():
    model = bert()
    t = AutoLoRATrainer(model, max_rank=4)
    assert t.model is model
    for name in t.ranks():
        assert isinstance(model.get_submodule(name), GatedLoRALinear)


def test_custom_model_needs_explicit_targets():
    with pytest.raises(TargetError, match="only works for Hugging Face models"):
        AutoLoRATrainer(MLP(), max_rank=2, loss_fn=mlp_loss)


def test_no_match_lists_real_names():
    with pytest.raises(TargetError, match="matches no adaptable module") as e:
        AutoLoRATrainer(bert(), max_rank=4, target_modules=["qkv"])
    assert "bert.encoder.layer.0.attention.self.query" in str(e.value)


def test_unadaptable_type_is_named():
    with pytest.raises(TargetError, match=r"cannot be adapted: 'bert.embeddings.word_embeddings' \(Embedding\)"):
        AutoLoRATrainer(bert(), max_rank=4, target_modules=["word_embeddings"])


@pytest.mark.parametrize("rank", [0, -1, 33])
def test_bad_max_rank(rank):
    with pytest.raises(AutoLoRAError, match="max_rank"):
        AutoLoRATrainer(bert(), max_rank=rank)


def test_unknown_engine_and_option():
    with pytest.raises(AutoLoRAError, match="'secant' is not an engine"):
        AutoLoRATrainer(bert(), max_rank=4, hypergrad="secant")
    with pytest.raises(AutoLoRAError, match="unknown argument 'max_ranks'"):
        AutoLoRATrainer(bert(), max_rank=4, max_ranks=3)
    assert issubclass(AutoLoRAError, ValueError)


def test_double_injection_refused():
    model = bert()
    AutoLoRATrainer(model, max_rank=4)
    with pytest.raises(TargetError, match="already holds autolora adapters"):
        AutoLoRATrainer(model, max_rank=4)


def test_float64_model_gets_float64_adapters():
    t = AutoLoRATrainer(MLP(dtype=torch.float64), max_rank=2, target_modules=["fc1"], loss_fn=mlp_loss)
    assert t.adapters["fc1"].lora_A.dtype == torch.float64
    assert isinstance(t.model.fc1.base_layer, nn.Linear)


def test_a_peft_model_is_refused_with_how_to_get_its_base():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(bert(), LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(TargetError, match=r"already a PEFT model.*get_base_model\(\)"):
        AutoLoRATrainer(peft_model, max_rank=2)


def test_a_classifier_whose_head_stays_random_gets_a_warning():
    import warnings

    from autolora import RunWarning

    with pytest.warns(RunWarning, match=r"head 'classifier' is neither in modules_to_save nor adapted"):
        AutoLoRATrainer(bert(), max_rank=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunWarning)
        AutoLoRATrainer(bert(), max_rank=2, modules_to_save=["classifier"])
