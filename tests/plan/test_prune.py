import pytest
import torch

from autolora import AutoLoRAError, AutoLoRATrainer, StateError
from autolora.plan.prune import budget_keep, threshold_keep
from tests.conftest import MLP, bert, mlp_batches, mlp_loss


def _gates(*rows):
    return {f"m{i}": torch.tensor(r) for i, r in enumerate(rows)}


def test_threshold_rule_with_floor():
    gates = _gates([0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1])
    keep = threshold_keep(gates, dict.fromkeys(gates, 0.25))
    assert keep == {"m0": [0, 1], "m1": [0, 1, 2, 3], "m2": [0]}
    keep = threshold_keep(gates, dict.fromkeys(gates, 0.8))  # nothing passes: min_rank 1 keeps the top one
    assert keep == {"m0": [0], "m1": [0], "m2": [0]}
    keep = threshold_keep(gates, dict.fromkeys(gates, 0.8), min_rank=0)
    assert keep == {"m0": [], "m1": [], "m2": []}
    assert threshold_keep(gates, dict.fromkeys(gates, 0.0), max_rank_per_module=2)["m1"] == [0, 1]


def test_budget_rule_global_order_and_ties():
    gates = _gates([0.5, 0.3, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2], [0.9, 0.05, 0.03, 0.02])
    # top-1 per module first: m0[0], m1[0] (tie with m1[1] -> lower index), m2[0]; then 0.3s by module order
    keep = budget_keep(gates, 5)
    assert keep == {"m0": [0, 1], "m1": [0, 1], "m2": [0]}
    assert sum(map(len, budget_keep(gates, 7).values())) == 7
    with pytest.raises(AutoLoRAError, match="between 3 and 12"):
        budget_keep(gates, 2)
    with pytest.raises(AutoLoRAError, match="between 0 and 6"):
        budget_keep(gates, 7, min_rank=0, max_rank_per_module=2)


def _searched(**kw):
    t = AutoLoRATrainer(
        MLP(), max_rank=4, target_modules=["fc1", "fc2"], loss_fn=mlp_loss, selector_lr=0.2, **kw, selector_every=1
    )
    t.fit(mlp_batches(6), epochs=3)
    return t


def test_ranks_before_pruning_use_the_default_cut():
    from autolora.plan.prune import DEFAULT_CUT
    from autolora.plan.scores import reference_score

    t = _searched()
    scores = t.scores()
    level = DEFAULT_CUT * reference_score(scores)
    for name, r in t.ranks().items():
        assert r == max(1, int((scores[name] >= level * (1 - 1e-6)).sum()))
    assert t.prune() == t.ranks()  # prune() without arguments keeps what ranks() counted


def test_prune_default_equals_ranks_and_is_idempotent():
    t = _searched()
    expected = t.ranks()
    plan = t.prune()
    assert plan == expected == t.ranks()
    assert all(t.adapters[n].rank == r for n, r in plan.items())
    assert all(torch.equal(a.gates(), torch.ones(a.rank)) for a in t.adapters.values())
    assert t.prune() == plan
    with pytest.raises(StateError, match="already called"):
        t.prune(target_rank=1)
    with pytest.raises(StateError, match="after prune"):
        t.fit(mlp_batches(4))


def test_prune_keeps_outputs():
    t = _searched()
    x = mlp_batches(1)[0][0]
    t.model.eval()
    gates = {n: a.gates().detach() for n, a in t.adapters.items()}
    # a threshold of 0 keeps everything: the function must not change at all
    before = t.model(x)
    t.prune(threshold=0.0)
    torch.testing.assert_close(t.model(x), before, rtol=1e-6, atol=1e-6)
    assert all(t.adapters[n].rank == len(g) for n, g in gates.items())


def test_budget_prune_and_errors():
    t = _searched()
    with pytest.raises(AutoLoRAError, match="not both"):
        t.prune(threshold=0.1, target_rank=1)
    with pytest.raises(AutoLoRAError, match="target_rank=5 is invalid"):
        t.prune(target_rank=5)
    plan = t.prune(target_rank=2)
    assert sum(plan.values()) == 4 and all(r >= 1 for r in plan.values())


def test_rank_zero_removes_module():
    t = _searched()
    plan = t.prune(threshold=1e9, min_rank=0)
    assert set(plan.values()) == {0}
    assert isinstance(t.model.fc1, torch.nn.Linear) and not t.adapters
    assert t.ranks() == {"fc1": 0, "fc2": 0}


def test_budget_varies_ranks_and_count_matches_export(tmp_path):
    from safetensors.torch import load_file

    t = AutoLoRATrainer(bert(), max_rank=6, hypergrad="first_order", selector_lr=0.2, selector_every=1)
    from tests.conftest import token_batches

    t.fit(token_batches(8), epochs=3)
    plan = t.prune(target_rank=2, max_rank_per_module=4)
    assert sum(plan.values()) <= 2 * len(plan) and len(set(plan.values())) > 1 and max(plan.values()) <= 4
    t.export(tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    counts = t.parameter_count(plan)
    assert counts["adapter"] == sum(v.numel() for k, v in tensors.items() if "lora_" in k)
    assert counts["uniform"] == 2 * len(plan) * (32 + 32)  # a uniform r=2 LoRA on the same modules
