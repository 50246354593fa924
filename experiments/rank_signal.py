"""Why the searched ranks carry no signal, measured: a planted-rank study on CPU.

The case: ``M`` independent frozen linear maps ``y_i = (W0_i + dW_i) x_i + noise``, each with a
planted update ``dW_i`` of known rank ``k_i``. An adapter on each map has ``max_rank`` gated
components; a rank rule that means anything must recover ``k_i`` (Spearman to the planted
ranks) and give the same ranks on every seed (mean pairwise Spearman across seeds).

Each *variant* is one search recipe (engine, gate, selector lr, sparsity, epochs); each *score*
is one way to rank its components after the search:

- ``gate``: the gates alone, with the default threshold (1/r softmax, 0.5 sigmoid): today's rule.
- ``gate_norm``: ``g_j * ||b_j|| * ||a_j||`` (magnitude-aware), cut at 10% of the module's largest.
- ``svd``: the singular values of the module's whole update ``s * B diag(g) A``, cut at 10% of
  the largest (rotation-invariant, so it cannot be undone by A and B rescaling each other).
- ``svd_global``: the same scores (relative to the base weight's RMS singular value), cut at
  0.25 x the median module's top score.
- ``library``: ``trainer.ranks()``, autolora's default rule (those scores, cut at 0.1 x).

It also measures the signal-to-noise ratio of the selector hypergradient: at the end of a search,
the hypergradient of each of ``n_val`` validation batches against their mean
(``snr = ||mean||^2 / mean ||h_i - mean||^2``; under 1 a single batch is mostly noise).

    python experiments/rank_signal.py                      # the default grid (a few minutes on 2 cores)
    python experiments/rank_signal.py --variants base sig_l1 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autolora import AutoLoRATrainer

PLANTED = (1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6)


class PlantedMaps(nn.Module):
    """``M`` frozen square maps applied to their own slice of the input: x (B, M, d) -> (B, M, d)."""

    def __init__(self, n_maps: int, dim: int, seed: int = 1234) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.maps = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(n_maps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x[:, i]) for i, m in enumerate(self.maps)], dim=1)


def mse_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def planted_data(planted, dim: int, n: int, batch: int, noise: float, data_seed: int):
    """(model, train batches, val batches): targets from planted updates of the given ranks."""
    model = PlantedMaps(len(planted), dim)
    g = torch.Generator().manual_seed(data_seed)
    deltas = []
    for k in planted:
        u, _ = torch.linalg.qr(torch.randn(dim, k, generator=g))
        v, _ = torch.linalg.qr(torch.randn(dim, k, generator=g))
        s = 0.5 + torch.rand(k, generator=g)  # singular values in [0.5, 1.5]
        deltas.append(u @ torch.diag(s) @ v.T)
    x = torch.randn(n, len(planted), dim, generator=g)
    with torch.no_grad():
        y = model(x) + torch.stack([x[:, i] @ d.T for i, d in enumerate(deltas)], 1)
        y = y + noise * torch.randn(y.shape, generator=g)
    n_val = n * 3 // 10
    cut = lambda a, b: [(x[i : i + batch], y[i : i + batch]) for i in range(a, b, batch)]  # noqa: E731
    return model, cut(n_val, n), cut(0, n_val)


VARIANTS = {
    # name: trainer keyword arguments (on top of max_rank, targets and loss); every variant pins
    # selector_every, so the grid does not move with the library's defaults
    "base": {"hypergrad": "first_order", "selector_every": 1},  # softmax, selector lr 5e-3
    "base_every4": {"hypergrad": "first_order", "selector_every": 4},
    "darts": {"hypergrad": "darts", "selector_every": 1},
    "unrolled": {"hypergrad": "unrolled", "selector_every": 1},
    "slr_5e-2": {"hypergrad": "first_order", "selector_lr": 5e-2, "selector_every": 1},
    "entropy_1e-2": {"hypergrad": "first_order", "sparsity": 1e-2, "selector_every": 1},
    "entropy_1e-1": {"hypergrad": "first_order", "sparsity": 1e-1, "selector_lr": 5e-2, "selector_every": 1},
    "sigmoid": {"hypergrad": "first_order", "gate": "sigmoid", "selector_every": 1},
    "sig_l1": {
        "hypergrad": "first_order",
        "gate": "sigmoid",
        "sparsity": 1e-3,
        "selector_lr": 5e-2,
        "selector_every": 1,
    },
    "sig_l1_e4": {
        "hypergrad": "first_order",
        "gate": "sigmoid",
        "sparsity": 1e-3,
        "selector_lr": 5e-2,
        "selector_every": 4,
    },
    "sig_l1_3e-3": {
        "hypergrad": "first_order",
        "gate": "sigmoid",
        "sparsity": 3e-3,
        "selector_lr": 5e-2,
        "selector_every": 1,
    },
    "sig_l1_1e-2": {
        "hypergrad": "first_order",
        "gate": "sigmoid",
        "sparsity": 1e-2,
        "selector_lr": 5e-2,
        "selector_every": 1,
    },
    "sig_l1_slr1e-1": {
        "hypergrad": "first_order",
        "gate": "sigmoid",
        "sparsity": 1e-3,
        "selector_lr": 1e-1,
        "selector_every": 1,
    },
    "sig_l1_darts": {
        "hypergrad": "darts",
        "gate": "sigmoid",
        "sparsity": 1e-3,
        "selector_lr": 5e-2,
        "selector_every": 1,
    },
    "sig_l1_wd": {
        "hypergrad": "first_order",
        "gate": "sigmoid",
        "sparsity": 1e-3,
        "selector_lr": 5e-2,
        "weight_decay": 0.1,
        "selector_every": 1,
    },
}


def spearman(a, b) -> float:
    """Spearman's rho with average ranks for ties (nan when either side is constant)."""
    ra, rb = (_avg_ranks(np.asarray(v, dtype=float)) for v in (a, b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _avg_ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=float)
    for x in np.unique(v):
        idx = v == x
        ranks[idx] = ranks[idx].mean()
    return ranks


def mean_pairwise(rows) -> float:
    vals = [spearman(a, b) for a, b in itertools.combinations(rows, 2)]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def scores(trainer: AutoLoRATrainer) -> dict[str, dict[str, list[float]]]:
    """Per module, the component scores of each scoring rule (higher = more important)."""
    out: dict[str, dict[str, list[float]]] = {"gate": {}, "gate_norm": {}, "svd": {}}
    for name, a in trainer.adapters.items():
        g = a.gates().detach()
        out["gate"][name] = g.tolist()
        out["gate_norm"][name] = (g * a.lora_B.detach().norm(dim=0) * a.lora_A.detach().norm(dim=1)).tolist()
        b = a.lora_B.detach() * (a.scale * g)
        base = a.base_layer.weight.detach()
        base_rms = float(base.norm() / math.sqrt(min(base.shape)))  # the base weight's RMS singular value
        out["svd"][name] = (torch.linalg.svdvals(b @ a.lora_A.detach())[: a.rank] / base_rms).tolist()
    return out


def relative_ranks(module_scores: dict[str, list[float]], rel: float = 0.1) -> dict[str, int]:
    """Components whose score is >= rel x the module's largest, at least 1."""
    return {n: max(1, sum(s >= rel * max(v) for s in v)) for n, v in module_scores.items()}


def global_ranks(module_scores: dict[str, list[float]], rel: float = 0.25) -> dict[str, int]:
    """Components whose score is >= rel x the median over modules of their top score, at least 1."""
    ref = float(np.median([max(v) for v in module_scores.values()]))
    return {n: max(1, sum(s >= rel * ref for s in v)) for n, v in module_scores.items()}


def hypergrad_snr(trainer: AutoLoRATrainer, train, val) -> dict[str, float]:
    """Mean over modules of the single-batch hypergradient SNR and cosine to the mean."""
    hs = [trainer.hypergradient(train[0], v) for v in val]
    snr, cos = [], []
    for name in hs[0]:
        h = torch.stack([x[name] for x in hs])  # (n_val, r)
        mean = h.mean(0)
        if trainer.adapters[name].gate == "softmax":  # softmax is shift invariant: drop the mean direction
            h = h - h.mean(1, keepdim=True)
            mean = h.mean(0)
        noise = ((h - mean) ** 2).sum(1).mean()
        snr.append(float((mean**2).sum() / noise.clamp_min(1e-30)))
        cos.append(float(torch.nn.functional.cosine_similarity(h, mean.expand_as(h), dim=1).mean()))
    return {"snr": float(np.median(snr)), "cos_to_mean": float(np.mean(cos))}


def run_one(variant: str, seed: int, args) -> dict:
    model, train, val = planted_data(PLANTED, args.dim, args.n, args.batch, args.noise, data_seed=100 + seed)
    targets = [f"maps.{i}" for i in range(len(PLANTED))]
    kw = dict(VARIANTS[variant])
    t0 = time.perf_counter()
    trainer = AutoLoRATrainer(
        model,
        max_rank=args.max_rank,
        target_modules=targets,
        loss_fn=mse_loss,
        seed=seed,
        progress=False,
        lr=args.lr,
        **kw,
    )
    trainer.fit(train, val, epochs=args.epochs)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        val_loss = float(np.mean([float(mse_loss(model, b)) for b in val]))
    sc = scores(trainer)
    gate_rule = {  # the paper's rule: gates >= their uniform value (1/r softmax, 0.5 sigmoid), at least 1
        n: max(1, int((torch.tensor(g) >= (0.5 if a.gate == "sigmoid" else 1 / a.rank) * (1 - 1e-6)).sum()))
        for (n, g), a in zip(sc["gate"].items(), trainer.adapters.values())
    }
    ranks = {
        "gate": gate_rule,
        "gate_norm": relative_ranks(sc["gate_norm"]),
        "svd": relative_ranks(sc["svd"]),
        "svd_global": global_ranks(sc["svd"]),
        "library": trainer.ranks(),  # autolora's own default rule (the SVD scores, cut 0.1)
    }
    sc["svd_global"] = sc["library"] = sc["svd"]
    gates = np.array(list(sc["gate"].values()))
    row = {
        "variant": variant,
        "seed": seed,
        "kw": kw,
        "epochs": args.epochs,
        "val_mse": val_loss,
        "noise_floor": args.noise**2,
        "seconds": round(seconds, 2),
        "ranks": {k: [v[t] for t in targets] for k, v in ranks.items()},
        "gate_spread": float((gates.max(1) / gates.min(1)).mean()),  # mean over modules of max/min gate
        **hypergrad_snr(trainer, train, val[: args.snr_batches]),
    }
    row["planted_rho"] = {k: spearman(v, PLANTED) for k, v in row["ranks"].items()}
    # separation at the planted cut: log10(score_k / score_{k+1}) of the k-th and (k+1)-th largest
    row["planted_gap"] = {
        k: float(
            np.mean(
                [
                    np.log10(sorted(v, reverse=True)[p - 1] / max(sorted(v, reverse=True)[p], 1e-30))
                    for v, p in zip((sc[k][t] for t in targets), PLANTED)
                ]
            )
        )
        for k in sc
    }
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--max-rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--snr-batches", type=int, default=16)
    p.add_argument("--out", default="experiments/results/rank_signal.jsonl")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"{'variant':14} {'score':9} {'planted rho':>11} {'seed rho':>8} {'gap':>6} {'val mse':>8} {'snr':>6} {'gate max/min':>12}"
    )
    for variant in args.variants:
        rows = [run_one(variant, s, args) for s in args.seeds]
        with out.open("a") as f:
            for r in rows:
                f.write(json.dumps({**r, "date": time.strftime("%Y-%m-%d")}) + "\n")
        for score in rows[0]["ranks"]:
            planted = np.mean([r["planted_rho"][score] for r in rows])
            seed_rho = mean_pairwise([r["ranks"][score] for r in rows])
            print(
                f"{variant:14} {score:9} {planted:11.2f} {seed_rho:8.2f} "
                f"{np.mean([r['planted_gap'][score] for r in rows]):6.2f} {np.mean([r['val_mse'] for r in rows]):8.4f} "
                f"{np.mean([r['snr'] for r in rows]):6.2f} {np.mean([r['gate_spread'] for r in rows]):12.2f}",
                flush=True,
            )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
