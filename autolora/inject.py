"""Find the layers to adapt, swap gated adapters in, and freeze the rest.

Matching follows PEFT so that a ``target_modules`` that works there works here:
- a list of names matches a module whose dotted name equals an entry or ends with ``"." + entry``;
- a string is a regular expression that must match the whole dotted name;
- ``"all-linear"`` takes every Linear / Conv1D except the output layer;
- ``None`` takes PEFT's default for the model's architecture (Hugging Face models only).
Modules inside ``modules_to_save`` are never adapted, as in PEFT.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import nn

from autolora.config import AdapterConfig
from autolora.errors import ConfigError, TargetError
from autolora.layers import ADAPTABLE_TYPES, GatedLoRALinear


def _matches_list(name: str, entries: Sequence[str]) -> bool:
    return any(name == e or name.endswith("." + e) for e in entries)


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return _matches_list(name, targets)


def _inside(name: str, parents: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in parents)


def _examples(model: nn.Module, limit: int = 6) -> str:
    names = [n for n, m in model.named_modules() if n and isinstance(m, ADAPTABLE_TYPES)]
    names = names or [n for n, _ in model.named_modules() if n]
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (", ..." if len(names) > limit else "")


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """PEFT's default LoRA targets for a Hugging Face model's architecture.

    Raises:
        TargetError: if the model is not a Hugging Face model, or PEFT has no default for it.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise TargetError(
            "target_modules=None only works for Hugging Face models (PEFT's per-architecture "
            f"default); pass target_modules explicitly, e.g. one of: {_examples(model)}."
        )
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    if model_type not in defaults:
        raise TargetError(
            f"PEFT has no default target_modules for model_type {model_type!r}; pass target_modules "
            f"explicitly (a list of names, a regex, or 'all-linear'), e.g. one of: {_examples(model)}."
        )
    return tuple(defaults[model_type])


def _output_layer_names(model: nn.Module) -> set[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    return {n for n, m in model.named_modules() if out is not None and m is out}


def resolve_modules_to_save(model: nn.Module, entries: Sequence[str] | None) -> list[str]:
    """Full names of the modules that ``modules_to_save`` entries select.

    Raises:
        TargetError: if an entry matches no module.
    """
    if not entries:
        return []
    names = [n for n, _ in model.named_modules() if n]
    found: list[str] = []
    for entry in entries:
        hits = [n for n in names if _matches_list(n, [entry])]
        if not hits:
            raise TargetError(
                f"modules_to_save entry {entry!r} matches no module of the model; "
                f"pass full or suffix names such as: {_examples(model)}."
            )
        found.extend(h for h in hits if not _inside(h, found))
    # keep only outermost modules: a module inside another saved module is saved with it
    return [n for n in found if not any(n != p and _inside(n, [p]) for p in found)]


def resolve_targets(
    model: nn.Module,
    target_modules: str | Sequence[str] | None,
    modules_to_save: Sequence[str] = (),
) -> list[str]:
    """Dotted names of the layers to adapt, in model order.

    Raises:
        TargetError: if nothing matches (naming a few real modules), a match is of a type that
            cannot be adapted, or the model already holds autolora or PEFT adapters.
    """
    if any(isinstance(m, GatedLoRALinear) for m in model.modules()):
        raise TargetError(
            "this model already holds autolora adapters; build the trainer on a fresh model, or keep "
            "using the trainer that injected them."
        )
    peft_layers = [n for n, m in model.named_modules() if type(m).__module__.startswith("peft.")]
    if peft_layers:
        raise TargetError(
            f"this model is already a PEFT model (e.g. {peft_layers[0] or type(model).__name__!r}); autolora "
            "adapts the base model: pass peft_model.get_base_model() of a fresh model, or "
            "peft_model.merge_and_unload() to adapt the merged weights."
        )
    if target_modules is None:
        target_modules = default_targets(model)
    if isinstance(target_modules, str) and target_modules == "all-linear":
        skip = _output_layer_names(model)
        names = [
            n
            for n, m in model.named_modules()
            if n and isinstance(m, ADAPTABLE_TYPES) and n not in skip and not _inside(n, modules_to_save)
        ]
    else:
        if isinstance(target_modules, str):
            try:
                re.compile(target_modules)
            except re.error as e:
                raise TargetError(f"target_modules={target_modules!r} is not a valid regex ({e}).") from None
        matched = [(n, m) for n, m in model.named_modules() if n and _matches(n, target_modules)]
        matched = [(n, m) for n, m in matched if not _inside(n, modules_to_save)]
        bad = [(n, type(m).__name__) for n, m in matched if not isinstance(m, ADAPTABLE_TYPES)]
        if bad:
            shown = ", ".join(f"{n!r} ({t})" for n, t in bad[:5])
            kinds = ", ".join(t.__name__ for t in ADAPTABLE_TYPES)
            raise TargetError(
                f"target_modules={target_modules!r} matches modules that cannot be adapted: {shown}. "
                f"Only {kinds} layers can be adapted; narrow the targets to those layers."
            )
        names = [n for n, _ in matched]
    if not names:
        raise TargetError(
            f"target_modules={target_modules!r} matches no adaptable module of this model; "
            f"some of its modules are: {_examples(model)}."
        )
    return names


def check_rank_fits(model: nn.Module, names: Sequence[str], rank: int) -> None:
    """Raise if ``rank`` exceeds a target layer's smaller dimension."""
    from autolora.layers import layer_dims

    too_small = [(n, layer_dims(model.get_submodule(n))) for n in names]
    too_small = [(n, d) for n, d in too_small if rank > min(d)]
    if too_small:
        n, (i, o) = too_small[0]
        raise TargetError(
            f"max_rank={rank} is larger than layer {n!r} allows (in={i}, out={o}); "
            f"use max_rank <= {min(min(d) for _, d in too_small)} or leave that layer out of target_modules."
        )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted path ``name`` (``get_submodule`` + ``setattr``)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_adapters(
    model: nn.Module, names: Sequence[str], make: Callable[[nn.Module], GatedLoRALinear]
) -> dict[str, GatedLoRALinear]:
    """Wrap each named layer with ``make(layer)`` in place; returns {name: adapter}."""
    adapters: dict[str, GatedLoRALinear] = {}
    for name in names:
        adapter = make(model.get_submodule(name))
        replace_module(model, name, adapter)
        adapters[name] = adapter
    return adapters


def freeze_base(model: nn.Module, adapters: dict[str, GatedLoRALinear], modules_to_save: Sequence[str]) -> None:
    """Freeze everything, then unfreeze what the adapters declare and the saved modules."""
    for p in model.parameters():
        p.requires_grad_(False)
    for adapter in adapters.values():
        for p in (adapter.lora_A, adapter.lora_B, adapter.selector):
            p.requires_grad_(True)
    for name in modules_to_save:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


def shrink_adapters(model: nn.Module, adapters: dict[str, GatedLoRALinear], keep: dict[str, list[int]]) -> list[str]:
    """Shrink each adapter to its kept components; one that keeps none is removed from
    ``adapters`` and its plain base layer put back. Returns the removed names."""
    import torch

    removed = []
    for name, idx in keep.items():
        adapter = adapters[name]
        if idx:
            adapter.shrink(torch.tensor(idx))
        else:  # rank 0: put the plain base layer back
            replace_module(model, name, adapter.base_layer)
            del adapters[name]
            removed.append(name)
    return removed


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """``model.gradient_checkpointing_enable`` with the non-reentrant implementation, which
    ``autograd.grad`` (every engine uses it) needs.

    Raises:
        ConfigError: if the model has no such method (Hugging Face models do).
    """
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise ConfigError(
            f"gradient_checkpointing=True calls model.gradient_checkpointing_enable(), which "
            f"{type(model).__name__} does not have (Hugging Face models do). Wrap your blocks in "
            "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) yourself and leave this off."
        )
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def inject_gated(
    model: nn.Module, adapter: AdapterConfig, seed: int, *, gradient_checkpointing: bool = False
) -> tuple[dict[str, GatedLoRALinear], list[str]]:
    """Put a gated adapter into every target of ``model`` and freeze the rest.

    Everything is checked before the model changes. Adapter inits draw from a generator seeded
    with ``seed``.

    Returns:
        ({module: adapter}, the resolved ``modules_to_save``).
    """
    import torch

    modules_to_save = resolve_modules_to_save(model, adapter.modules_to_save)
    names = resolve_targets(model, adapter.target_modules, modules_to_save)
    check_rank_fits(model, names, adapter.max_rank)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    gen = torch.Generator().manual_seed(seed)

    def make(layer: nn.Module) -> GatedLoRALinear:
        return GatedLoRALinear(
            layer, adapter.max_rank, adapter.effective_scale, adapter.gate, adapter.lora_dropout, generator=gen
        )

    adapters = inject_adapters(model, names, make)
    freeze_base(model, adapters, modules_to_save)
    _warn_untrained_head(model, adapters, modules_to_save)
    return adapters, modules_to_save


HEAD_NAMES = ("classifier", "score")  # a Hugging Face sequence classifier's freshly initialised head


def _warn_untrained_head(model: nn.Module, adapters: dict, modules_to_save: Sequence[str]) -> None:
    """Warn when a classification model's head stays random: neither saved nor adapted."""
    import warnings

    from autolora.errors import RunWarning

    if not type(model).__name__.endswith("ForSequenceClassification"):
        return
    heads = [n for n, _ in model.named_modules() if n.split(".")[-1] in HEAD_NAMES]
    trained = [h for h in heads if _inside(h, modules_to_save) or any(_inside(a, [h]) for a in adapters)]
    if heads and not trained:
        warnings.warn(
            f"the classification head {heads[0]!r} is neither in modules_to_save nor adapted, so it stays at its "
            f"random init and is not exported; pass modules_to_save=[{heads[0].split('.')[-1]!r}].",
            RunWarning,
            stacklevel=4,
        )
