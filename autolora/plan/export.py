"""Write a stock PEFT LoRA adapter folder that reproduces the gated model exactly.

PEFT scales each module's update by ``lora_alpha / r``. Each module's scale s and gates g are
folded into B (``B' = B * s * g``), and ``rank_pattern[k] = alpha_pattern[k] = r_k`` so that
PEFT's scaling is exactly 1.0 (which also suits tools that read one global alpha / r). Pattern
keys are anchored full names, which never overlap however PEFT orders them. All key renaming
to PEFT's layout lives here.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from autolora.errors import ExportError
from autolora.inject import replace_module
from autolora.layers import GatedLoRALinear
from autolora.plan.atomic import atomic_dir, recover

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _anchored(name: str) -> str:
    # PEFT tests re.match(rf"(.*\.)?({key})$", module_name); "^" pins the key to the full name.
    return "^" + re.escape(name)


def peft_saved_modules(model: nn.Module, modules_to_save: Sequence[str]) -> list[str]:
    """Every module PEFT will wrap for ``modules_to_save`` (it matches by a bare ``endswith``)."""
    names = [n for n, _ in model.named_modules() if n]
    return [n for n in names if any(n.endswith(t) for t in modules_to_save)]


def _target_modules(model: nn.Module, names: Sequence[str]) -> list[str] | str:
    """Full names as a list, unless a list would also catch other modules (then an exact regex)."""
    wanted = set(names)
    others = [n for n, _ in model.named_modules() if n and n not in wanted]
    if any(o.endswith("." + t) for o in others for t in names):
        return "(" + "|".join(re.escape(n) for n in names) + ")"
    return list(names)


SEQ_CLS_HEADS = ("classifier", "score")  # what PEFT adds to modules_to_save for SEQ_CLS


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a Hugging Face model class: ``CAUSAL_LM`` or ``SEQ_CLS``, else None."""
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return None


def adapter_files(
    model: nn.Module,
    adapters: Mapping[str, GatedLoRALinear],
    modules_to_save: Sequence[str],
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The PEFT config dict and the tensors of an exact export.

    Modules of rank 0 are left out (PEFT rejects r = 0 for LoRA). With ``task_type="SEQ_CLS"``
    PEFT also wraps any ``classifier`` / ``score`` head as a module to save, so such heads are
    saved too (at their current values), as PEFT's own ``save_pretrained`` does.
    """
    if task_type == "SEQ_CLS":
        heads = []
        for head in SEQ_CLS_HEADS:
            found = peft_saved_modules(model, [head])
            # PEFT adapts nothing inside a module to save: a head holding an adapter stays as it is
            if found and not any(a == n or a.startswith(n + ".") for n in found for a in adapters):
                heads.append(head)
        modules_to_save = list(dict.fromkeys([*modules_to_save, *heads]))
    live = {n: a for n, a in adapters.items() if a.rank > 0}
    tensors: dict[str, torch.Tensor] = {}
    for name, adapter in live.items():
        a, b = adapter.folded_factors()  # (r, in), (out, r); b holds s * g
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
    saved = peft_saved_modules(model, modules_to_save) if modules_to_save else []
    for name in saved:
        for key, value in model.get_submodule(name).state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = value.detach().clone().contiguous()
    ranks = {n: a.rank for n, a in live.items()}
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    patterns = {_anchored(n): r for n, r in ranks.items()}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": common,
        "lora_alpha": common,
        "rank_pattern": patterns,
        "alpha_pattern": dict(patterns),
        "target_modules": _target_modules(model, list(live)),
        "modules_to_save": list(modules_to_save) or None,
        "lora_dropout": 0.0,
        "fan_in_fan_out": any(a.fan_in_fan_out for a in live.values()),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return config, tensors


def check_target_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a file, or a non-empty folder unless ``overwrite``; nothing is touched."""
    path = Path(path)
    recover(path)  # an earlier export killed mid-replacement is put back first
    if path.exists() and not path.is_dir():
        raise ExportError(f"export path {str(path)!r} is a file; give a folder path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ExportError(
            f"export path {str(path)!r} is a non-empty folder; choose an empty or new folder, or pass "
            "overwrite=True to replace it."
        )
    return path


def write_adapter(
    path: str | os.PathLike,
    config: dict,
    tensors: Mapping[str, torch.Tensor],
    extra_json: Mapping[str, dict] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``adapter_config.json``, ``adapter_model.safetensors`` and extra JSON files atomically."""
    from safetensors.torch import save_file

    check_target_dir(path, overwrite)
    with atomic_dir(path) as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, payload in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2) + "\n")
    return Path(path)


def peft_config(
    plan: Mapping[str, int],
    lora_alpha: float = 16,
    modules_to_save: Sequence[str] | None = None,
    **kwargs: object,
):
    """A PEFT ``LoraConfig`` that builds fresh LoRA adapters at the planned ranks.

    Use it to retrain at the found ranks in your own PEFT or HF Trainer pipeline:
    ``get_peft_model(base_model, autolora.peft_config(trainer.ranks()))``. Each module gets
    its rank through an anchored ``rank_pattern`` key and PEFT's usual scaling
    ``lora_alpha / r_k``; modules of rank 0 are left out.

    Args:
        plan: {module name: rank}, e.g. ``trainer.prune()`` or ``trainer.ranks()``.
        lora_alpha: LoRA alpha of the new adapters.
        modules_to_save: Modules to train fully (e.g. ``["classifier"]``).
        **kwargs: Any other ``LoraConfig`` field (``lora_dropout``, ``task_type``, ...).

    Raises:
        ExportError: if the plan keeps no module.
    """
    from peft import LoraConfig

    live = {n: int(r) for n, r in plan.items() if r > 0}
    if not live:
        raise ExportError("the plan keeps no module (every rank is 0); there is nothing for PEFT to adapt.")
    common = Counter(live.values()).most_common(1)[0][0]
    return LoraConfig(
        r=common,
        lora_alpha=lora_alpha,
        target_modules=list(live),
        rank_pattern={_anchored(n): r for n, r in live.items()},
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        **kwargs,
    )


def merged_model(model: nn.Module, adapters: Mapping[str, GatedLoRALinear]) -> nn.Module:
    """A copy of ``model`` with every adapter merged into its base weight and removed.

    A base weight shared with another parameter (GPT-2 ties ``lm_head`` to ``wte``) is copied
    before merging, so the update lands only in the adapted layer; the copy's config is marked
    untied so ``save_pretrained`` / ``from_pretrained`` keep the two apart.
    """
    merged = copy.deepcopy(model)
    params = [p for _, p in merged.named_parameters(remove_duplicate=False)]
    untied = False
    for name in adapters:
        layer = merged.get_submodule(name)
        base = layer.base_layer
        weight = base.weight
        if sum(p is weight for p in params) > 1:
            base.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
            untied = True
        with torch.no_grad():
            base.weight.add_(layer.delta_weight().to(base.weight.dtype))
        replace_module(merged, name, base)
    config = getattr(merged, "config", None)
    if untied and config is not None and hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
    return merged


def write_merged(path: str | os.PathLike, merged: nn.Module, overwrite: bool = False) -> Path:
    """``save_pretrained`` for Hugging Face models, else ``model.safetensors`` of the state_dict."""
    from safetensors.torch import save_file

    check_target_dir(path, overwrite)
    with atomic_dir(path) as tmp:
        if hasattr(merged, "save_pretrained"):
            merged.save_pretrained(str(tmp))
        else:
            state = {k: v.detach().cpu().clone().contiguous() for k, v in merged.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Path(path)
