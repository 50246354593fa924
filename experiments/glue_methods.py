"""Pieces of ``glue_bench.py``'s methods that are not training loops: target settings, the rank
controls (shuffled and uniform) built from an AutoLoRA row, PEFT LoRA at a per-module rank plan,
and a loss computed from the logits.

The controls answer one question: does AutoLoRA's *allocation* of ranks matter, at equal size?

- ``shuffled``: the AutoLoRA row's per-module ranks, randomly permuted over the same modules
  (a seeded RNG): the same multiset of ranks, so the same total, with the allocation destroyed.
- ``uniform``: every module at round(mean AutoLoRA rank): the same average rank, no allocation.

Both are PEFT LoRA trained exactly like AutoLoRA's ``retrain`` (the runner's ``train_peft``) with
PEFT's scaling ``lora_alpha / r_k`` per module, which is what ``retrain`` re-initialises its adapters
with (``adapter.reinit(alpha / adapter.rank)``): ``lora_alpha`` 16 and no ``alpha_pattern``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping

import torch
from torch import nn

# The encoder's linear layers by kind, as BERT-style models (all-MiniLM-L6-v2) name them inside
# ``bert.encoder.layer.<i>``; the pooler and the classifier are never targets.
TARGET_SETTINGS: dict[str, tuple[str, ...]] = {
    "qv": ("attention.self.query", "attention.self.value"),
    "all-linear": (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ),
}
ENCODER_LAYER = re.compile(r"(?:.*\.)?encoder\.layer\.\d+\.(.+)")


def target_names(model: nn.Module, setting: str) -> list[str]:
    """Full names of the ``nn.Linear`` modules of ``setting``, in model order.

    ``output.dense`` is matched as the whole path after ``layer.<i>.``, so it is the FFN output
    only, never ``attention.output.dense`` (that one has its own kind) nor ``pooler.dense``.

    Raises:
        ValueError: for an unknown setting, or if nothing matches (names a few real modules).
    """
    if setting not in TARGET_SETTINGS:
        raise ValueError(f"unknown target setting {setting!r}; choose one of {', '.join(TARGET_SETTINGS)}")
    kinds = set(TARGET_SETTINGS[setting])
    names = []
    for name, module in model.named_modules():
        m = ENCODER_LAYER.fullmatch(name)
        if m and m.group(1) in kinds and isinstance(module, nn.Linear):
            names.append(name)
    if not names:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:6]
        raise ValueError(f"no {setting} targets ({sorted(kinds)}) in the model; its Linear layers: {linear}")
    return names


def shuffle_seed(seed: int) -> int:
    """The permutation's seed for run seed ``seed`` (apart from every seed the training uses)."""
    return 7919 * (seed + 1)


def permuted_ranks(ranks: Mapping[str, int], seed: int, groups: Mapping[str, object] | None = None) -> dict[str, int]:
    """The same rank values, randomly reassigned to the same modules (``random.Random(seed)``);
    modules keep their order. Rank-0 modules of the plan take part like any other.

    Args:
        ranks: {module: rank}, in model order.
        seed: The permutation's seed.
        groups: {module: group}; ranks are then permuted within each group only (modules of one
            weight shape: the adapter size stays exactly the same). ``None``: one group.
    """
    rng = random.Random(seed)
    groups = groups or dict.fromkeys(ranks, 0)
    out = dict(ranks)
    for group in dict.fromkeys(groups[n] for n in ranks):  # first-seen order: deterministic
        names = [n for n in ranks if groups[n] == group]
        values = [ranks[n] for n in names]
        rng.shuffle(values)
        out.update(zip(names, values))
    return out


def uniform_rank(ranks: Mapping[str, int]) -> int:
    """round(mean rank), halves up, at least 1 (the rule AdaLoRA's ``target_r`` uses too)."""
    return max(1, int(sum(ranks.values()) / len(ranks) + 0.5))


def anchored(name: str) -> str:
    """A ``rank_pattern`` key that matches exactly one full module name (as ``autolora.export``):
    PEFT tests ``re.match(rf"(.*\\.)?({key})$", name)`` and the first match wins, so bare suffixes
    like ``"layer.1.attention.self.query"`` could also match ``layer.11``'s."""
    return "^" + re.escape(name)


def lora_plan_config(ranks: Mapping[str, int]) -> dict:
    """``LoraConfig`` keywords for a per-module rank plan: the modules with rank > 0 as a list of
    full names (PEFT rejects r = 0, so rank-0 modules are left out), each pinned to its rank by an
    anchored ``rank_pattern`` key; no ``alpha_pattern``, so PEFT's scaling is ``lora_alpha / r_k``."""
    live = {n: int(r) for n, r in ranks.items() if r > 0}
    if not live:
        raise ValueError("every module has rank 0: nothing to train")
    return {
        "r": max(live.values()),
        "target_modules": list(live),
        "rank_pattern": {anchored(n): r for n, r in live.items()},
    }


def peft_lora_ranks(peft_model: nn.Module) -> dict[str, int]:
    """{module: rank} as PEFT actually built it (``lora_A`` rows), names without PEFT's prefix."""
    ranks = {}
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and "default" in lora_a:
            ranks[name.removeprefix("base_model.model.")] = int(lora_a["default"].weight.shape[0])
    return ranks


def check_built(peft_model: nn.Module, wanted: Mapping[str, int]) -> None:
    """Raise unless PEFT built exactly the wanted ranks (rank-0 modules absent)."""
    built = peft_lora_ranks(peft_model)
    live = {n: r for n, r in wanted.items() if r > 0}
    if built != live:
        wrong = {n: (live.get(n), built.get(n)) for n in set(built) | set(live) if live.get(n) != built.get(n)}
        raise RuntimeError(f"PEFT built other ranks than planned (module: (planned, built)): {wrong}")


def adapter_size(ranks: Mapping[str, int], dims: Mapping[str, tuple[int, int]]) -> int:
    """LoRA parameters of a rank plan: sum of r_k * (in_k + out_k)."""
    return sum(r * (dims[n][0] + dims[n][1]) for n, r in ranks.items())


def linear_dims(model: nn.Module, names: list[str]) -> dict[str, tuple[int, int]]:
    return {n: (model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in names}


def logits_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The loss Hugging Face's sequence classifiers compute, from the logits of a forward pass
    without labels, so no wrapper can add terms to it (PEFT's ``AdaLoraModel.forward`` adds
    ``orth_reg_weight * orthogonality`` to ``outputs.loss`` whenever labels are passed).

    As ``BertForSequenceClassification``: ``num_labels == 1`` is regression,
    ``MSELoss(logits.squeeze(), labels.squeeze())``; integer labels are
    ``CrossEntropyLoss(logits.view(-1, n), labels.view(-1))``.
    """
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    if logits.shape[-1] == 1:
        return nn.functional.mse_loss(logits.squeeze().float(), labels.squeeze().float())
    if labels.dtype not in (torch.long, torch.int):
        raise ValueError(f"classification labels must be integers, got {labels.dtype}")
    return nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.view(-1))
