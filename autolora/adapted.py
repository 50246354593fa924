"""The model with its gated adapters: injection, gates, ranks, parameter counts, pruning and
export, without any search. :class:`~autolora.AutoLoRATrainer` is an ``AdaptedModel`` with a
bilevel search on top.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from torch import nn

from autolora.config import AdapterConfig
from autolora.errors import ConfigError, RankWarning, StateError
from autolora.inject import inject_gated, shrink_adapters
from autolora.layers import GatedLoRALinear, layer_dims
from autolora.plan.export import adapter_files, merged_model, peft_task_type, write_adapter, write_merged
from autolora.plan.prune import (
    TAIL_FRACTION,
    PrunePlan,
    assess,
    choose_keep,
    cut_level,
    kept_counts,
    parameter_summary,
    rank_record,
    same_plan,
)
from autolora.plan.scores import base_rms, spectrum_scores
from autolora.search.retrain import snapshot


class AdaptedModel:
    """``model`` with gated adapters injected in place (``self.model`` is the same object).

    Args:
        model: The model to adapt (a Hugging Face model or any ``nn.Module``).
        adapter: What is adapted and how.
        seed: Seeds the adapters' init.
        gradient_checkpointing: Turn on the model's (non-reentrant) gradient checkpointing.

    Raises:
        AutoLoRAError: for a non-module, bad targets or a ``max_rank`` the layers cannot hold.
    """

    def __init__(
        self, model: nn.Module, adapter: AdapterConfig, seed: int = 0, *, gradient_checkpointing: bool = False
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model, self.adapter_config = model, adapter
        self.adapters: dict[str, GatedLoRALinear]
        self.adapters, self.modules_to_save = inject_gated(
            model, adapter, seed, gradient_checkpointing=gradient_checkpointing
        )
        self._shapes = {n: layer_dims(a.base_layer) for n, a in self.adapters.items()}  # kept after pruning
        self._base_rms = {n: base_rms(a.base_layer.weight) for n, a in self.adapters.items()}
        # (step, {module: scores}) taken on logged steps of the search: the plans they give in the
        # last part of the search are what a rank's confidence is measured against
        self.snapshots: list[tuple[int, dict[str, torch.Tensor]]] = []
        self._saved_init = snapshot(model, self.modules_to_save)  # retraining starts them over
        self.retrained = False
        self.removed: list[str] = []  # modules pruned to rank 0
        self.plan: PrunePlan | None = None

    def _check_searchable(self, call: str) -> None:
        if self.plan is not None:
            raise StateError(
                f"{call} is not possible after prune(): the selectors are fixed. Retrain at the found ranks "
                "with a fresh PEFT LoRA (autolora exports the plan), or build a new trainer to search again."
            )

    def _on_pruned(self) -> None:
        """Called once the adapters have been shrunk (the trainer rebuilds its optimisers)."""

    def gates(self) -> dict[str, torch.Tensor]:
        """{module: gate values (detached)}."""
        return {n: a.gates().detach() for n, a in self.adapters.items()}

    def scores(self) -> dict[str, torch.Tensor]:
        """{module: component scores (max_rank,), descending}: the singular values of the module's
        gated update ``s * B diag(g) A`` relative to its base weight's RMS singular value (see
        :mod:`autolora.plan.scores`). Unlike a gate, a score cannot be undone by A and B growing.
        Float32 tensors on the CPU."""
        # The factors come to the CPU in one copy (one device sync): there a batch of (out, r) QRs
        # and (r, r) SVDs takes microseconds, while on a GPU each linalg call is a solver launch
        # and a sync (about 25 ms for the batched SVD on an H200, every logged step).
        factors = {n: a.folded_factors() for n, a in self.adapters.items()}
        flat = torch.cat([t.reshape(-1).float() for pair in factors.values() for t in pair]).cpu()
        pieces = iter(flat.split([t.numel() for pair in factors.values() for t in pair]))
        host = {n: tuple(next(pieces).view(t.shape) for t in pair) for n, pair in factors.items()}
        groups: dict[tuple, list[str]] = {}  # modules of one shape share one batched SVD
        for n, (a, b) in host.items():
            groups.setdefault((tuple(a.shape), tuple(b.shape)), []).append(n)
        out = {}
        for names in groups.values():
            a_fold, b_fold = torch.stack([host[n][0] for n in names]), torch.stack([host[n][1] for n in names])
            refs = torch.tensor([self._base_rms[n] for n in names])
            out.update(zip(names, spectrum_scores(a_fold, b_fold, refs, a_fold.shape[1]).unbind()))
        return {n: out[n] for n in self.adapters}

    def record_scores(self, step: int) -> dict[str, torch.Tensor]:
        """Take a snapshot of :meth:`scores` at ``step`` (the search does on logged steps) and
        return it; the newest 64 are kept."""
        scores = self.scores()
        self.snapshots = [*self.snapshots[-63:], (step, scores)]
        return scores

    def ranks(self, scores: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
        """{module: rank}. Before pruning: components scoring >= the default cut (``DEFAULT_CUT``
        times the median module's top score), at least 1, from ``scores`` if given. After pruning:
        the physical rank, 0 for removed modules."""
        if self.plan is not None:
            return {n: len(self.plan.keep[n]) for n in self.plan.keep}
        if not self.adapters:
            return {}
        scores = self.scores() if scores is None else scores
        level = cut_level(scores)
        # on the device, one sync for all layers (the rule of threshold_keep, min_rank 1)
        counts = kept_counts(list(scores.values()), [level] * len(scores))
        return dict(zip(self.adapters, counts.clamp_min(1).tolist()))

    def parameter_count(self, ranks: dict[str, int] | None = None) -> dict[str, int]:
        """Adapter parameters under ``ranks`` (default: ``ranks()``), and those of a uniform LoRA
        with the same number of components spread evenly (rounded to the nearest rank)."""
        return parameter_summary(self._shapes, self.ranks() if ranks is None else ranks)

    def prune(
        self,
        threshold: float | None = None,
        target_rank: int | None = None,
        *,
        min_rank: int = 1,
        max_rank_per_module: int | None = None,
    ) -> dict[str, int]:
        """Shrink every adapter to its final rank and return the plan ``{module: rank}``.

        Args:
            threshold: Keep components whose score (:meth:`scores`) is >= this times the
                reference score, the median over modules of each module's top score (default
                ``DEFAULT_CUT`` = 0.1).
            target_rank: A global budget of ``target_rank * (number of modules)`` components,
                allocated by score across modules (ties by module order, then index).
            min_rank: Components every module keeps at least; 0 lets a module be removed (its
                plain base layer is put back and it is left out of the export).
            max_rank_per_module: Components a module keeps at most.

        Each adapter is rotated into the SVD basis of its update and keeps its top singular
        directions (the best approximation of that rank), with the scale folded in (``gates()``
        then returns ones). The plan carries a confidence per module: the fraction of the plans
        the same rule gave over the last quarter of the search (:attr:`snapshots`, taken on
        logged steps) that agree with it. A ``RankWarning`` says when the search did not settle.
        Calling ``prune()`` again with the same arguments returns the same plan.

        Raises:
            AutoLoRAError: if both rules are given, the budget cannot be met, or ``prune`` was
                already called with other arguments.
        """
        rule = {"threshold": threshold, "target_rank": target_rank, "min_rank": min_rank}
        rule["max_rank_per_module"] = max_rank_per_module
        if same_plan(self.plan, rule):
            return self.plan.ranks
        gates, scores = self.gates(), self.scores()
        keep, level = choose_keep(scores, **rule)
        tail = [choose_keep(s, **rule)[0] for s in self._tail_scores()]
        confidence, margin, warning = assess(scores, keep, level, [{n: len(k) for n, k in p.items()} for p in tail])
        if warning:
            warnings.warn(warning, RankWarning, stacklevel=2)
        self.removed += shrink_adapters(self.model, self.adapters, keep)
        self.plan = PrunePlan(
            keep=keep,
            rule="budget" if target_rank is not None else "threshold",
            gates={n: g.tolist() for n, g in gates.items()},
            scores={n: [round(float(v), 6) for v in s] for n, s in scores.items()},
            level=level,
            confidence=confidence,
            margins={n: round(m, 4) if math.isfinite(m) else None for n, m in margin.items()},
            warning=warning,
            **rule,
        )
        self._on_pruned()
        return self.plan.ranks

    def _tail_scores(self) -> list[dict[str, torch.Tensor]]:
        """The snapshots of the last ``TAIL_FRACTION`` of the search (at least the newest 3)."""
        if not self.snapshots:
            return []
        last = self.snapshots[-1][0]
        tail = [s for step, s in self.snapshots if step >= (1 - TAIL_FRACTION) * last]
        return tail if len(tail) >= 3 else [s for _, s in self.snapshots[-3:]]

    def export_merged(self, path: str | os.PathLike, overwrite: bool = False) -> str:
        """Write the base model with the adapters merged in; ``trainer.model`` is left as it is.

        Hugging Face models via ``save_pretrained``, others as ``model.safetensors``. A tied base
        weight (GPT-2's ``lm_head`` and ``wte``) is untied first, so only the adapted layer changes.

        Raises:
            AutoLoRAError: if ``path`` is a file, or a non-empty folder and ``overwrite`` is False.
        """
        write_merged(path, merged_model(self.model, self.adapters), overwrite=overwrite)
        return str(path)

    def export(self, path: str | os.PathLike, overwrite: bool = False) -> str:
        """Write a stock PEFT LoRA adapter folder (``PeftModel.from_pretrained`` loads it).

        Before or after ``prune()``; scale and gates are folded into ``lora_B`` so the PEFT
        model's outputs equal this model's in eval mode. ``ranks.json`` beside it records the
        plan and the gates behind it.

        Raises:
            AutoLoRAError: if ``path`` is a file, or a non-empty folder and ``overwrite`` is False
                (the folder is then left untouched).
        """
        name_or_path = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
        task_type = peft_task_type(self.model)
        config, tensors = adapter_files(self.model, self.adapters, self.modules_to_save, name_or_path, task_type)
        write_adapter(path, config, tensors, {"ranks.json": self.rank_record()}, overwrite=overwrite)
        return str(path)

    def rank_record(self) -> dict:
        """The rank plan as JSON-able data: ranks, the gates behind them, rule and budget."""
        gates = {} if self.plan else {n: g.tolist() for n, g in self.gates().items()}
        a, ranks = self.adapter_config, self.ranks()  # one scoring pass for both
        return rank_record(
            self.plan,
            gates,
            ranks,
            retrained=self.retrained,
            max_rank=a.max_rank,
            gate=a.gate,
            parameters=self.parameter_count(ranks),
        )
