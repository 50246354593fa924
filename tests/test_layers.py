import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from autolora import AdapterConfig, GatedLoRALinear
from autolora.gates import default_threshold, gate_values, sparsity_penalty


def _filled(layer: GatedLoRALinear, seed: int = 0) -> GatedLoRALinear:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.selector):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_output_is_base_plus_gated_update(gate):
    base = nn.Linear(5, 7, dtype=torch.float64)
    layer = _filled(GatedLoRALinear(base, rank=3, scale=2.5, gate=gate))
    x = torch.randn(4, 5, dtype=torch.float64)
    g = torch.softmax(layer.selector, 0) if gate == "softmax" else torch.sigmoid(layer.selector)
    # hand-written: base(x) + s * B diag(g) A x
    want = base(x) + 2.5 * x @ (layer.lora_B @ torch.diag(g) @ layer.lora_A).T
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


def test_init_shapes_dtype_and_zero_update():
    base = nn.Linear(5, 7, dtype=torch.float64)
    layer = GatedLoRALinear(base, rank=3, scale=16)
    assert layer.lora_A.shape == (3, 5) and layer.lora_B.shape == (7, 3) and layer.selector.shape == (3,)
    assert all(p.dtype == torch.float64 for p in (layer.lora_A, layer.lora_B, layer.selector))
    assert layer.base_layer is base  # wrapped, not copied
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.selector) == 0
    assert torch.count_nonzero(layer.lora_A) > 0
    x = torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x))
    torch.testing.assert_close(layer.gates(), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_conv1d_matches_hand_written():
    base = Conv1D(7, 5)  # nf=out=7, nx=in=5; weight stored (in, out)
    layer = _filled(GatedLoRALinear(base, rank=2, scale=1.5))
    assert (layer.in_features, layer.out_features) == (5, 7) and layer.fan_in_fan_out
    x = torch.randn(3, 4, 5)
    g = torch.softmax(layer.selector, 0)
    want = x @ base.weight + base.bias + 1.5 * x @ (layer.lora_B @ torch.diag(g) @ layer.lora_A).T
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_default_scale_matches_standard_lora_at_init():
    # s * g_init == alpha / r, the per-component scale of a standard LoRA of rank r
    for gate, g0 in (("softmax", 1 / 64), ("sigmoid", 0.5)):
        cfg = AdapterConfig(max_rank=64, lora_alpha=16, gate=gate)
        assert cfg.effective_scale * g0 == pytest.approx(16 / 64)
    assert AdapterConfig(max_rank=64, lora_alpha=16).effective_scale == 16


def test_shrink_keeps_the_top_singular_directions():
    base = nn.Linear(5, 7, dtype=torch.float64)
    layer = _filled(GatedLoRALinear(base, rank=4, scale=3.0))
    delta = 3.0 * layer.lora_B.detach() @ torch.diag(layer.gates().detach()) @ layer.lora_A.detach()  # (out, in)
    u, s, vh = torch.linalg.svd(delta)
    want_delta = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]  # the best rank-2 approximation
    x = torch.randn(3, 5, dtype=torch.float64)
    layer.shrink(torch.tensor([0, 1]))
    assert layer.rank == 2 and layer.gate == "fixed" and layer.scale == 1.0
    torch.testing.assert_close(layer.gates(), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(layer(x), base(x) + x @ want_delta.T, rtol=1e-10, atol=1e-10)


def test_shrink_to_every_direction_keeps_output():
    base = nn.Linear(5, 7, dtype=torch.float64)
    layer = _filled(GatedLoRALinear(base, rank=4, scale=3.0))
    x = torch.randn(3, 5, dtype=torch.float64)
    want = layer(x).detach()
    layer.shrink(torch.arange(4))
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)


def test_gate_helpers():
    beta = torch.tensor([0.0, 1.0, -1.0])
    torch.testing.assert_close(gate_values(beta, "softmax").sum(), torch.tensor(1.0))
    assert default_threshold("softmax", 8) == 1 / 8 and default_threshold("sigmoid", 8) == 0.5
    # entropy: maximal (log r) when uniform, smaller when concentrated
    uniform = sparsity_penalty(torch.zeros(4), "softmax")
    assert uniform == pytest.approx(torch.log(torch.tensor(4.0)).item())
    assert sparsity_penalty(torch.tensor([5.0, 0, 0, 0]), "softmax") < uniform
    assert sparsity_penalty(torch.zeros(4), "sigmoid") == pytest.approx(2.0)
