"""The model with its gated adapters: injection, gates, ranks, parameter counts, pruning and
export, without any search. :class:`~autolora.AutoLoRATrainer` is an ``AdaptedModel`` with a
bilevel search on top.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from autolora.config import AdapterConfig
from autolora.errors import ConfigError
from autolora.gates import default_threshold
from autolora.inject import inject_gated, shrink_adapters
from autolora.layers import GatedLoRALinear, layer_dims
from autolora.plan.export import adapter_files, merged_model, write_adapter, write_merged
from autolora.plan.prune import PrunePlan, choose_keep, kept_counts, parameter_summary, rank_record, same_plan
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
        self._saved_init = snapshot(model, self.modules_to_save)  # retraining starts them over
        self.retrained = False
        self.removed: list[str] = []  # modules pruned to rank 0
        self.plan: PrunePlan | None = None

    def _on_pruned(self) -> None:
        """Called once the adapters have been shrunk (the trainer rebuilds its optimisers)."""

    def gates(self) -> dict[str, torch.Tensor]:
        """{module: gate values (detached)}."""
        return {n: a.gates().detach() for n, a in self.adapters.items()}

    def _thresholds(self) -> dict[str, float]:
        return {n: default_threshold(a.gate, a.rank) for n, a in self.adapters.items()}

    def ranks(self) -> dict[str, int]:
        """{module: rank}. Before pruning: gates >= the default threshold (1/r for softmax,
        0.5 for sigmoid), at least 1. After pruning: the physical rank, 0 for removed modules."""
        if self.plan is not None:
            return {n: len(self.plan.keep[n]) for n in self.plan.keep}
        if not self.adapters:
            return {}
        # on the device, one sync for all layers (the rule of threshold_keep, min_rank 1)
        counts = kept_counts(list(self.gates().values()), list(self._thresholds().values()))
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
            threshold: Keep components whose gate is >= this (default: 1/r for softmax gates,
                0.5 for sigmoid).
            target_rank: A global budget of ``target_rank * (number of modules)`` components,
                allocated by gate value across modules (ties by module order, then index).
            min_rank: Components every module keeps at least; 0 lets a module be removed (its
                plain base layer is put back and it is left out of the export).
            max_rank_per_module: Components a module keeps at most.

        Kept gates and the scale are folded into ``lora_B`` (``gates()`` then returns ones).
        Calling ``prune()`` again with the same arguments returns the same plan.

        Raises:
            AutoLoRAError: if both rules are given, the budget cannot be met, or ``prune`` was
                already called with other arguments.
        """
        rule = {"threshold": threshold, "target_rank": target_rank, "min_rank": min_rank}
        rule["max_rank_per_module"] = max_rank_per_module
        if same_plan(self.plan, rule):
            return self.plan.ranks
        gates = self.gates()
        keep = choose_keep(gates, self._thresholds(), **rule)
        self.removed += shrink_adapters(self.model, self.adapters, keep)
        kind = "budget" if target_rank is not None else "threshold"
        self.plan = PrunePlan(keep=keep, rule=kind, gates={n: g.tolist() for n, g in gates.items()}, **rule)
        self._on_pruned()
        return self.plan.ranks

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
        config, tensors = adapter_files(self.model, self.adapters, self.modules_to_save, name_or_path)
        write_adapter(path, config, tensors, {"ranks.json": self.rank_record()}, overwrite=overwrite)
        return str(path)

    def rank_record(self) -> dict:
        """The rank plan as JSON-able data: ranks, the gates behind them, rule and budget."""
        gates = {} if self.plan else {n: g.tolist() for n, g in self.gates().items()}
        a = self.adapter_config
        return rank_record(
            self.plan,
            gates,
            self.ranks(),
            retrained=self.retrained,
            max_rank=a.max_rank,
            gate=a.gate,
            parameters=self.parameter_count(),
        )
