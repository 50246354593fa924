"""AdaptedModel, directly: injection, ranks, pruning and export without any search."""

import pytest
import torch

from autolora import AdapterConfig, StateError
from autolora.adapted import AdaptedModel
from tests.conftest import MLP, load_peft


def _adapted() -> AdaptedModel:
    torch.manual_seed(0)
    return AdaptedModel(MLP(), AdapterConfig(max_rank=4, target_modules=("fc1", "fc2")), seed=0)


def test_fresh_adapters_have_uniform_gates_and_full_rank():
    m = _adapted()
    assert set(m.adapters) == {"fc1", "fc2"} and m.ranks() == {"fc1": 4, "fc2": 4}
    assert all(torch.allclose(g, torch.full((4,), 0.25)) for g in m.gates().values())
    counts = m.parameter_count()
    assert counts["adapter"] == counts["uniform"] and counts["uniform_rank"] == 4


def test_prune_shrinks_records_and_refuses_another_rule():
    m = _adapted()
    with torch.no_grad():  # fc2's update full rank, fc1's rank 1 (one B column)
        for a in m.adapters.values():
            a.lora_B.copy_(torch.eye(a.lora_B.shape[0], 4))
        m.adapters["fc1"].lora_B[:, 1:] = 0
    plan = m.prune()
    assert plan == {"fc1": 1, "fc2": 4} and m.ranks() == plan
    assert m.prune() == plan  # the same rule again: the same plan
    with pytest.raises(StateError, match="already called with other arguments"):
        m.prune(target_rank=2)
    record = m.rank_record()
    assert record["ranks"] == plan and record["rule"] == "threshold" and record["max_rank"] == 4


def test_export_loads_in_peft_with_the_same_outputs(tmp_path):
    m = _adapted()
    with torch.no_grad():
        for a in m.adapters.values():
            a.lora_B.normal_()
    m.model.eval()
    x = torch.randn(3, 6)
    want = m.model(x)
    m.export(tmp_path / "adapter")
    torch.manual_seed(0)
    peft_model = load_peft(MLP(), tmp_path / "adapter")
    torch.testing.assert_close(peft_model(x), want, rtol=1e-5, atol=1e-6)


def test_scores_of_mixed_shapes_equal_each_module_scored_alone():
    from autolora.plan.scores import spectrum_scores

    m = _adapted()  # fc1 and fc2 have different shapes: two groups, one host copy
    with torch.no_grad():
        for a in m.adapters.values():
            a.lora_B.normal_()
    scores = m.scores()
    assert list(scores) == ["fc1", "fc2"]
    for name, s in scores.items():
        assert s.device.type == "cpu" and s.dtype == torch.float32 and s.shape == (4,)
        a, b = m.adapters[name].folded_factors()
        torch.testing.assert_close(s, spectrum_scores(a, b, m._base_rms[name], 4), rtol=1e-5, atol=1e-7)
