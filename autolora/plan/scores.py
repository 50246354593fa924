"""Component scores: how much each direction of a module's update carries, comparable across modules.

A gate alone is not a component's importance: in ``s * g_j * b_j a_j^T`` the weights can grow to
undo a small gate (the weight step sees the product, not the gate), and the components are not
even orthogonal. What is identifiable is the module's whole gated update
``dW = s * B diag(g) A``: its singular values do not change when A and B rescale or rotate each
other. So a module's components are scored by the singular values of ``dW``, divided by the RMS
singular value of the frozen base weight (``||W0||_F / sqrt(min(in, out))``) so that a score reads
"this direction of the update, relative to the layer's own typical direction" and modules of
different shapes and scales can share one cut. The validation-trained gates shape ``dW`` (with
sigmoid gates and an L1 step they shrink the directions the validation loss does not defend), so
the selectors still decide; the score only reads their decision in a form that cannot be undone.

Every function here is pure: tensors in, tensors or dicts out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


@torch.no_grad()
def update_svd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of ``b @ a`` without forming the (out, in) product.

    Args:
        a: (r, in), or a batch (..., r, in) of modules of one shape.
        b: (out, r) (or (..., out, r)), with scale and gates already folded in.

    Returns:
        ``(u, s, vh)`` with ``u`` (..., out, k), ``s`` (..., k) descending, ``vh`` (..., k, in),
        k = min(r, in, out), so that ``u @ diag(s) @ vh == b @ a`` up to rounding. Computed in
        float32 at least.
    """
    dtype = torch.promote_types(a.dtype, torch.float32)
    qb, rb = torch.linalg.qr(b.to(dtype))  # (out, k1), (k1, r)
    qa, ra = torch.linalg.qr(a.to(dtype).mT)  # (in, k2), (k2, r)
    uc, s, vhc = torch.linalg.svd(rb @ ra.mT, full_matrices=False)  # (k1, k), (k,), (k, k2)
    return qb @ uc, s, vhc @ qa.mT


def base_rms(weight: torch.Tensor) -> float:
    """The RMS singular value of a base weight, ``||W||_F / sqrt(min(shape))`` (1.0 for a zero weight)."""
    value = float(weight.detach().float().norm()) / math.sqrt(min(weight.shape))
    return value if value > 0 else 1.0


@torch.no_grad()
def spectrum_scores(a: torch.Tensor, b: torch.Tensor, reference: float | torch.Tensor, rank: int) -> torch.Tensor:
    """Scores of a module's components: the singular values of ``b @ a`` / ``reference``, padded
    with zeros to ``rank`` entries, descending (shape (rank,), float32 on a's device). Batched
    inputs (``a`` (m, r, in), ``b`` (m, out, r), ``reference`` (m,)) give (m, rank)."""
    _, s, _ = update_svd(a, b)
    out = torch.zeros((*s.shape[:-1], rank), dtype=torch.float32, device=a.device)
    k = min(rank, s.shape[-1])
    ref = torch.as_tensor(reference, dtype=torch.float32, device=a.device)
    out[..., :k] = s[..., :k].float() / ref.unsqueeze(-1) if ref.dim() else s[..., :k].float() / ref
    return out


def reference_score(scores: Mapping[str, torch.Tensor]) -> float:
    """The score a cut is measured against: the median over modules of each module's top score.

    Robust to one module with an outsized update, and shared by every module, so the cut is one
    global level rather than a per-module fraction (which would keep noise in a module whose
    strongest direction is itself noise).
    """
    tops = sorted(float(s.max()) for s in scores.values() if s.numel())
    if not tops:
        return 0.0
    mid = len(tops) // 2
    return tops[mid] if len(tops) % 2 else 0.5 * (tops[mid - 1] + tops[mid])


def margins(scores: Mapping[str, torch.Tensor], ranks: Mapping[str, int], threshold: float) -> dict[str, float]:
    """How far each module's cut lies from the threshold, in natural-log units of score.

    ``min(log(s_k / t), log(t / s_{k+1}))`` for rank k (descending scores): positive when the kept
    components are above the threshold and the dropped ones below, small when a component sits
    near it, negative when ``min_rank`` / ``max_rank_per_module`` forced a component across it.
    ``inf`` where nothing is on one side of the cut and the other side is clear.
    """
    out: dict[str, float] = {}
    tiny = 1e-12
    for name, s in scores.items():
        k = ranks[name]
        vals = s.tolist()
        upper = math.log(max(vals[k - 1], tiny) / threshold) if k >= 1 and threshold > 0 else math.inf
        lower = math.log(threshold / max(vals[k], tiny)) if k < len(vals) and threshold > 0 else math.inf
        out[name] = min(upper, lower)
    return out


def agreement(final: Mapping[str, int], snapshots: Sequence[Mapping[str, int]]) -> dict[str, float]:
    """Per module, the fraction of ``snapshots`` (plans taken during the search) that gave it the
    final rank; 1.0 for every module when there are no snapshots to compare with."""
    if not snapshots:
        return dict.fromkeys(final, 1.0)
    return {n: sum(s.get(n) == r for s in snapshots) / len(snapshots) for n, r in final.items()}
