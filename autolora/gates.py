"""Gate functions, their default rank thresholds and their sparsity regularisers.

A layer's selector holds raw logits beta, one per rank-1 component. Its gates are
``softmax(beta)`` (the paper: gates compete within the layer and sum to 1) or ``sigmoid(beta)``
(independent gates in (0, 1)). After pruning, gates are fixed at 1 ("fixed").
"""

from __future__ import annotations

import torch

# Gate kinds a layer can be in. "fixed" is the state after pruning or for retraining.
GATES = ("softmax", "sigmoid", "fixed")


def gate_values(selector: torch.Tensor, kind: str) -> torch.Tensor:
    """Gate values g for a selector (shape (r,)) -> (r,)."""
    if kind == "softmax":
        return torch.softmax(selector, dim=-1)
    if kind == "sigmoid":
        return torch.sigmoid(selector)
    if kind == "fixed":
        return torch.ones_like(selector)
    raise AssertionError(f"unknown gate kind {kind!r}")


def default_threshold(kind: str, rank: int) -> float:
    """The gate value at or above which a component counts towards a layer's rank.

    Softmax gates use the paper's 1/r (the uniform value), sigmoid gates 0.5.
    """
    if kind == "softmax":
        return 1.0 / rank
    if kind == "sigmoid":
        return 0.5
    return 0.0


def sparsity_penalty(selector: torch.Tensor, kind: str) -> torch.Tensor:
    """A regulariser that rewards fewer active components in one layer (a scalar); for stacked
    selectors (n, r), the sum of the n layers' penalties.

    With softmax gates an L1 term is constant (the gates sum to 1), so it does nothing. The
    entropy ``-sum g log g`` is largest for uniform gates and zero for a single active
    component, so minimising it concentrates each layer on few components. With sigmoid gates
    the L1 norm ``sum g`` is used.
    """
    if kind == "softmax":
        log_g = torch.log_softmax(selector, dim=-1)
        return -(log_g.exp() * log_g).sum()
    if kind == "sigmoid":
        return torch.sigmoid(selector).sum()
    return selector.new_zeros(())
