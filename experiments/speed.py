"""Speed and peak memory of autolora against PEFT LoRA and AdaLoRA: one process, one batch set.

GPU mode (the default on a CUDA machine): RoBERTa-base shape with random weights, batch 32 x 128
tokens, bf16 autocast over fp32 parameters, LoRA on query/value, max_rank 64. Every case builds
its own model, warms up, times ``--iters`` iterations (CUDA-synchronised, median ms) and records
the peak of ``torch.cuda.max_memory_allocated``; everything is freed between cases. The whole case
sequence runs ``--rounds`` times; ratios are taken within a round (the host's load moves between
rounds), and round 1 also counts each case's kernels and device busy time with torch.profiler.

    python experiments/speed.py --rounds 4 --out experiments/results/speed.md
    AUTOLORA_GIT_REV=<commit> python experiments/speed.py ...   # on a copy without current git metadata
    python experiments/speed.py --cases peft_lora,plain,first_order --iters 40
    python experiments/speed.py --profile darts --profile-out /tmp/profile_darts.txt

CPU mode (``--cpu-small``): a small BERT (hidden 128, 4 layers, 4 heads, intermediate 512),
batch 16 x 64, max_rank 16, fp32 on CPU; times ``trainer.fit(train, val, epochs=1)`` end to end
(30 train and 10 validation batches) against a plain PEFT LoRA r=16 loop over the same batches.

    python experiments/speed.py --cpu-small --out experiments/results/speed_cpu.md

Smoke test without a GPU (a tiny model, a few iterations, every case and code path except the
CUDA-only calls):

    python experiments/speed.py --device cpu --tiny
    python experiments/speed.py --device cpu --tiny --profile darts --profile-out /tmp/p.txt
    python experiments/speed.py --cpu-small --tiny

Both modes write a markdown table (``--out``) and the raw rows as JSONL next to it (same name,
``.jsonl``), with the date, device, library versions and the exact command.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import peft
import torch
import transformers
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

from autolora import AutoLoRATrainer, SearchConfig

Batch = dict[str, torch.Tensor]
MIB = 2**20
ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- setups


@dataclass(frozen=True)
class Setup:
    """A model shape and the batches it is timed on."""

    name: str
    arch: str  # "roberta" | "bert"
    config: dict[str, int]  # overrides of the architecture's default config
    batch: int
    length: int
    max_rank: int
    targets: tuple[str, ...] = ("query", "value")
    n_train: int = 8
    n_val: int = 4

    def model(self, seed: int) -> nn.Module:
        """A freshly initialised classifier (random weights, seeded), in train mode."""
        torch.manual_seed(seed)
        if self.arch == "roberta":
            model: nn.Module = RobertaForSequenceClassification(RobertaConfig(num_labels=2, **self.config))
        else:
            model = BertForSequenceClassification(BertConfig(num_labels=2, **self.config))
        return model.train()

    @property
    def vocab_size(self) -> int:
        default = RobertaConfig().vocab_size if self.arch == "roberta" else BertConfig().vocab_size
        return self.config.get("vocab_size", default)


TINY = {
    "vocab_size": 1000,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
SETUPS: dict[str, Setup] = {
    "roberta-base": Setup("roberta-base", "roberta", {}, batch=32, length=128, max_rank=64, n_train=10),
    "roberta-tiny": Setup("roberta-tiny", "roberta", TINY, batch=4, length=16, max_rank=8),
    "bert-small": Setup(
        "bert-small",
        "bert",
        {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512},
        batch=16,
        length=64,
        max_rank=16,
        n_train=30,
        n_val=10,
    ),
    "bert-tiny": Setup("bert-tiny", "bert", TINY, batch=4, length=16, max_rank=4, n_train=6, n_val=3),
}


def make_batches(setup: Setup, n: int, gen: torch.Generator, device: torch.device) -> list[Batch]:
    """``n`` random classification batches (ids avoid the special tokens), already on ``device``."""
    return [
        {
            "input_ids": torch.randint(5, setup.vocab_size, (setup.batch, setup.length), generator=gen).to(device),
            "attention_mask": torch.ones(setup.batch, setup.length, dtype=torch.long, device=device),
            "labels": torch.randint(0, 2, (setup.batch,), generator=gen).to(device),
        }
        for _ in range(n)
    ]


@dataclass
class Bench:
    """What every case shares: the setup, the device, precision, and the one batch set."""

    setup: Setup
    device: torch.device
    autocast: str | None  # "bf16" or None (fp32)
    lr: float
    seed: int
    train: list[Batch]
    val: list[Batch]
    total_steps: int  # steps a case may take (AdaLoRA's schedule, the plain step's selector_every)

    def model(self) -> nn.Module:
        return self.setup.model(self.seed).to(self.device)

    def autocast_ctx(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


def trainer_accepts_autocast() -> bool:
    """Whether this autolora's ``SearchConfig`` has the ``autocast`` field yet."""
    return "autocast" in {f.name for f in dataclasses.fields(SearchConfig)}


# ----------------------------------------------------------------------------- cases


class Runner(Protocol):
    """One case's resident model and optimiser state."""

    def step(self, i: int) -> None:
        """Training iteration number ``i`` (0-based) on the bench's batches."""

    def epoch(self, train: Sequence[Batch], val: Sequence[Batch]) -> None:
        """One epoch over ``train`` (``val`` for the selector steps where there are any)."""


class PeftRunner:
    """A plain PEFT training loop: autocast forward, backward, AdamW step (AdaLoRA: allocate)."""

    def __init__(self, bench: Bench, config: LoraConfig | AdaLoraConfig) -> None:
        self.bench = bench
        self.model = get_peft_model(bench.model(), config)
        self.adalora = isinstance(config, AdaLoraConfig)
        params = [p for p in self.model.parameters() if p.requires_grad]
        # fused on CUDA: the Hugging Face Trainer's default (optim="adamw_torch_fused" for torch >= 2.8),
        # and what autolora uses there; weight decay 0 as autolora's default
        fused = bench.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(params, lr=bench.lr, weight_decay=0.0, fused=fused)

    def _train_step(self, batch: Batch, global_step: int) -> None:
        with self.bench.autocast_ctx():
            loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        if self.adalora:  # after backward and the optimiser step, before zero_grad (PEFT's recipe)
            self.model.base_model.update_and_allocate(global_step)
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, i: int) -> None:
        self._train_step(self.bench.train[i % len(self.bench.train)], i)

    def epoch(self, train: Sequence[Batch], val: Sequence[Batch]) -> None:
        for i, batch in enumerate(train):
            self._train_step(batch, i)


class AutoLoRARunner:
    """An ``AutoLoRATrainer``; ``step`` is ``trainer.step(train, val)``, ``epoch`` is ``fit``."""

    def __init__(self, bench: Bench, engine: str, selector_every: int) -> None:
        self.bench = bench
        options: dict[str, Any] = {}
        self.outer_autocast = False
        if bench.autocast is not None:
            if trainer_accepts_autocast():
                options["autocast"] = bench.autocast
            else:  # until the trainer has the option: autocast around the whole step
                self.outer_autocast = True
        self.trainer = AutoLoRATrainer(
            bench.model(),
            max_rank=bench.setup.max_rank,
            target_modules=list(bench.setup.targets),
            modules_to_save=["classifier"],
            hypergrad=engine,
            lr=bench.lr,
            selector_every=selector_every,
            seed=bench.seed,
            log_dir=None,
            progress=False,
            **options,
        )

    def _ctx(self) -> contextlib.AbstractContextManager:
        return self.bench.autocast_ctx() if self.outer_autocast else contextlib.nullcontext()

    def step(self, i: int) -> None:
        train, val = self.bench.train, self.bench.val
        with self._ctx():
            self.trainer.step(train[i % len(train)], val[i % len(val)])

    def epoch(self, train: Sequence[Batch], val: Sequence[Batch]) -> None:
        with self._ctx():
            self.trainer.fit(list(train), list(val), epochs=1)


@dataclass(frozen=True)
class Case:
    """A named measurement.

    Attributes:
        label: What the table calls it ({r} is replaced by max_rank).
        build: Builds the case's model and optimisers on the bench.
        kind: ``"peft"`` or ``"autolora"``.
        block: Report the median over non-overlapping blocks of this many iterations, divided by
            it (the period of a case whose iterations differ, e.g. ``selector_every=4``).
        target: (time, memory) ratios to PEFT LoRA r=max_rank on the GPU, if any.
        cpu_target: Time ratio target in ``--cpu-small`` mode, if any.
    """

    label: str
    build: Callable[[Bench], Runner]
    kind: str  # "peft" | "autolora"
    block: int = 1
    target: tuple[float, float] | None = None
    cpu_target: float | None = None


def _lora(rank: int | None) -> Callable[[Bench], Runner]:
    def build(bench: Bench) -> Runner:
        r = bench.setup.max_rank if rank is None else rank
        config = LoraConfig(
            r=r,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=list(bench.setup.targets),
            modules_to_save=["classifier"],
        )
        return PeftRunner(bench, config)

    return build


def _adalora(bench: Bench) -> Runner:
    # tinit = tfinal = 0: every timed step is in the budgeting phase (importance scores and masks)
    config = AdaLoraConfig(
        init_r=12,
        target_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        tinit=0,
        tfinal=0,
        deltaT=1,
        total_step=bench.total_steps + 1,
        target_modules=list(bench.setup.targets),
        modules_to_save=["classifier"],
    )
    return PeftRunner(bench, config)


def _autolora(engine: str, selector_every: int | None) -> Callable[[Bench], Runner]:
    def build(bench: Bench) -> Runner:
        # None: never a selector step (selector_every beyond the steps the case takes)
        every = bench.total_steps + 1 if selector_every is None else selector_every
        return AutoLoRARunner(bench, engine, every)

    return build


BASELINE = "peft_lora"
CASES: dict[str, Case] = {
    "peft_lora": Case("PEFT LoRA r={r}", _lora(None), "peft"),
    "peft_lora_r8": Case("PEFT LoRA r=8", _lora(8), "peft"),
    "peft_adalora": Case("PEFT AdaLoRA 12→8", _adalora, "peft"),
    "plain": Case("autolora plain step", _autolora("first_order", None), "autolora", target=(1.05, 1.10)),
    "first_order": Case(
        "first_order iteration", _autolora("first_order", 1), "autolora", target=(2.0, 1.15), cpu_target=2.3
    ),
    "first_order_every4": Case(
        "first_order, selector every 4", _autolora("first_order", 4), "autolora", block=4, target=(1.3, 1.15)
    ),
    "darts": Case("darts iteration", _autolora("darts", 1), "autolora", target=(4.0, 1.20), cpu_target=4.3),
    "unrolled": Case("unrolled iteration", _autolora("unrolled", 1), "autolora", target=(4.0, 3.0)),
    "higher": Case("higher iteration", _autolora("higher", 1), "autolora"),
}
CPU_SMALL_CASES = ("peft_lora", "plain", "first_order", "first_order_every4", "darts")


# ----------------------------------------------------------------------------- device helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Drop everything unreferenced and reset the peak counter."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def allocated_mib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / MIB if device.type == "cuda" else None


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def git_revision() -> str:
    """The checkout's commit (+dirty), or ``$AUTOLORA_GIT_REV`` when set: a copy of the checkout on
    another machine may carry stale git metadata, so pass the revision from where it is known."""
    if os.environ.get("AUTOLORA_GIT_REV"):
        return os.environ["AUTOLORA_GIT_REV"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    if rev.returncode != 0:
        return "unknown"
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_info(device: torch.device, mode: str) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": mode,
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "autolora_git": git_revision(),
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "loadavg_start": load_average(),
    }


def load_average() -> str:
    """1/5/15-minute load averages: CPU timings are only meaningful on an otherwise idle machine."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


# ----------------------------------------------------------------------------- GPU-style timing


def block_means(times: Sequence[float], block: int) -> list[float]:
    """Per-iteration time of each non-overlapping block of ``block`` consecutive iterations."""
    return [sum(times[i : i + block]) / block for i in range(0, len(times) - block + 1, block)]


def block_median(times: Sequence[float], block: int) -> float:
    """Median over non-overlapping blocks of ``block`` consecutive iterations, per iteration."""
    return statistics.median(block_means(times, block))


def block_min(times: Sequence[float], block: int) -> float:
    """The fastest non-overlapping block of ``block`` iterations, per iteration."""
    return min(block_means(times, block))


def count_kernels(runner: Runner, first: int, n: int, device: torch.device) -> dict[str, float]:
    """Device kernels launched and device busy time per iteration over ``n`` iterations
    (torch.profiler). Both are properties of the code, not of how busy the host is."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(first, first + n):
            runner.step(i)
        sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {
        "kernels_per_iter": len(kernels) / n,
        "gpu_busy_ms_per_iter": sum(e.device_time for e in kernels) / 1e3 / n,
    }


def _measure(case: Case, bench: Bench, iters: int, warmup: int, kernels: bool = False) -> dict[str, Any]:
    """Build, warm up and time one case (with ``kernels``, then count its kernels). Everything
    it allocates dies with this frame."""
    device = bench.device
    start = time.perf_counter()
    runner = case.build(bench)
    sync(device)
    build_s = time.perf_counter() - start
    resident = allocated_mib(device)
    for i in range(warmup):
        runner.step(i)
    sync(device)
    peak_warmup = peak_mib(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the peak of the timed window alone, too
    times = []
    for i in range(warmup, warmup + iters):
        t0 = time.perf_counter()
        runner.step(i)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak_timed = peak_mib(device)
    peak = None if peak_timed is None or peak_warmup is None else max(peak_warmup, peak_timed)
    counted = count_kernels(runner, warmup + iters, case.block * 2, device) if kernels and device.type == "cuda" else {}
    return counted | {
        "ms_per_iter": block_median(times, case.block),
        "ms_min_block": block_min(times, case.block),
        "ms_median": statistics.median(times),
        "ms_mean": statistics.fmean(times),
        "ms_min": min(times),
        "ms_max": max(times),
        "times_ms": [round(t, 4) for t in times],
        "build_s": build_s,
        "resident_after_build_mib": resident,
        "peak_mib": peak,
        "peak_warmup_mib": peak_warmup,
        "peak_timed_mib": peak_timed,
        "autocast_mode": autocast_mode(case, bench),
    }


def autocast_mode(case: Case, bench: Bench) -> str:
    if bench.autocast is None:
        return "none (fp32)"
    if case.kind == "peft":
        return f"PEFT: torch.autocast({bench.autocast}) around the forward"
    if trainer_accepts_autocast():
        return f"autolora: AutoLoRATrainer(autocast={bench.autocast!r})"
    return f"autolora: torch.autocast({bench.autocast}) around trainer.step (the trainer has no autocast= yet)"


def run_case(name: str, bench: Bench, iters: int, warmup: int, kernels: bool = False) -> dict[str, Any]:
    case = CASES[name]
    free_memory(bench.device)
    row: dict[str, Any] = {
        "case": name,
        "label": case.label.format(r=bench.setup.max_rank),
        "block": case.block,
        "iters": iters,
        "warmup": warmup,
        "baseline_mib": allocated_mib(bench.device),
    }
    try:
        row |= _measure(case, bench, iters, warmup, kernels)
        row["error"] = None
    except Exception as e:  # record and go on: one failing case must not lose the others
        row["error"] = f"{type(e).__name__}: {e}"
        row["peak_mib"] = peak_mib(bench.device)
    free_memory(bench.device)
    row["after_mib"] = allocated_mib(bench.device)
    return row


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def mark(value: float | None, limit: float) -> str:
    if value is None:
        return "n/a"
    return "pass" if value <= limit else "**miss**"


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per case over the rounds: median ms/iter, the median of the per-round time ratios
    to the round's PEFT LoRA baseline, and the largest peak (peaks barely move between rounds)."""
    base = {r["round"]: r for r in rows if r["case"] == BASELINE and r["error"] is None}
    base_mib = max((r["peak_mib"] for r in base.values() if r["peak_mib"] is not None), default=None)
    summary = []
    for name in dict.fromkeys(r["case"] for r in rows):
        runs = [r for r in rows if r["case"] == name]
        ok = [r for r in runs if r["error"] is None]
        row: dict[str, Any] = {"summary": True, "case": name, "label": runs[0]["label"], "rounds": len(runs)}
        if not ok:
            summary.append(row | {"error": runs[-1]["error"]})
            continue
        ratios = [ratio(r["ms_per_iter"], base[r["round"]]["ms_per_iter"]) for r in ok if r["round"] in base]
        fastest = min(r["ms_min_block"] for r in ok)
        base_fastest = min((r["ms_min_block"] for r in base.values()), default=None)
        counted = next((r for r in ok if "kernels_per_iter" in r), {})
        base_counted = next((r for r in base.values() if "kernels_per_iter" in r), {})
        peaks = [r["peak_mib"] for r in ok if r["peak_mib"] is not None]
        peak = max(peaks) if peaks else None
        row |= {
            "error": None,
            "ms_per_iter": statistics.median(r["ms_per_iter"] for r in ok),
            "ms_per_round": [round(r["ms_per_iter"], 3) for r in ok],
            "time_ratio": statistics.median(ratios) if ratios else None,
            "time_ratio_per_round": [None if x is None else round(x, 4) for x in ratios],
            "peak_mib": peak,
            "peak_ratio": ratio(peak, base_mib),
            "ms_fastest": fastest,
            "fastest_ratio": ratio(fastest, base_fastest),
            "kernels_per_iter": counted.get("kernels_per_iter"),
            "kernels_ratio": ratio(counted.get("kernels_per_iter"), base_counted.get("kernels_per_iter")),
            "gpu_busy_ms_per_iter": counted.get("gpu_busy_ms_per_iter"),
            "gpu_busy_ratio": ratio(counted.get("gpu_busy_ms_per_iter"), base_counted.get("gpu_busy_ms_per_iter")),
        }
        summary.append(row)
    return summary


def gpu_table(summary: list[dict[str, Any]], max_rank: int) -> list[str]:
    ref = f"LoRA r={max_rank}"
    lines = [
        f"| case | ms/iter (median) | × {ref} time | time ratio per round | peak MiB | × {ref} peak "
        "| target (time / memory) | pass/miss |",
        "|---|---:|---:|---|---:|---:|---|---|",
    ]
    for r in summary:
        case = CASES[r["case"]]
        if r["error"] is not None:
            lines.append(f"| {r['label']} | error | | | | | | {r['error'][:120]} |")
            continue
        t, m = r["time_ratio"], r["peak_ratio"]
        spread = ", ".join(fmt(x, ".2f") for x in r["time_ratio_per_round"])
        if case.target is None:
            target, verdict = "—", "—"
        else:
            target = f"≤ {case.target[0]:g}× / ≤ {case.target[1]:g}×"
            verdict = f"time {mark(t, case.target[0])}, memory {mark(m, case.target[1])}"
        lines.append(
            f"| {r['label']} | {fmt(r['ms_per_iter'], '.1f')} | {fmt(t, '.2f', '×')} | {spread} | "
            f"{fmt(r['peak_mib'], ',.0f')} | {fmt(m, '.2f', '×')} | {target} | {verdict} |"
        )
    return lines


def bounds_table(summary: list[dict[str, Any]], max_rank: int) -> list[str]:
    """What the time is made of: the fastest block, kernels launched and device busy time."""
    ref = f"LoRA r={max_rank}"
    lines = [
        f"| case | fastest ms/iter | × {ref} (fastest) | kernels/iter | × {ref} kernels | GPU busy ms/iter "
        f"| × {ref} busy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        if r["error"] is not None:
            continue
        lines.append(
            f"| {r['label']} | {fmt(r['ms_fastest'], '.1f')} | {fmt(r['fastest_ratio'], '.2f', '×')} | "
            f"{fmt(r['kernels_per_iter'], ',.0f')} | {fmt(r['kernels_ratio'], '.2f', '×')} | "
            f"{fmt(r['gpu_busy_ms_per_iter'], '.1f')} | {fmt(r['gpu_busy_ratio'], '.2f', '×')} |"
        )
    return lines


def run_gpu_mode(args: argparse.Namespace, bench: Bench, names: list[str], info: dict[str, Any]) -> None:
    rows = []
    for round_ in range(args.rounds):  # all cases back to back, the whole sequence `rounds` times
        for name in names:
            case = CASES[name]
            iters = -(-args.iters // case.block) * case.block  # whole blocks
            warmup = max(args.warmup, case.block)  # every kind of iteration is warm, optimisers built
            row = {"round": round_} | run_case(name, bench, iters, warmup, kernels=round_ == 0)
            print(json.dumps({k: v for k, v in row.items() if k != "times_ms"}), flush=True)
            rows.append(row)
    summary = summarise(rows)
    info["loadavg_end"] = load_average()
    s = bench.setup
    lines = [
        "# autolora speed and memory",
        "",
        *header_lines(info),
        f"- setup: `{s.name}` random weights, batch {s.batch} × {s.length} tokens, targets "
        f"{'/'.join(s.targets)}, max_rank {s.max_rank}, lr {bench.lr:g}, "
        f"{'bf16 autocast over fp32 parameters' if bench.autocast else 'fp32'}, {len(bench.train)} train / "
        f"{len(bench.val)} validation batches cycled, ≥ {args.iters} timed iterations after ≥ {args.warmup} "
        f"warm-up, synchronised per iteration; the whole case sequence run {args.rounds} times",
        "",
        *gpu_table(summary, s.max_rank),
        "",
        "What bounds the time (fastest block of iterations over all rounds; kernels and device busy time "
        "from torch.profiler over two more iterations, or two 4-step blocks, in round 1):",
        "",
        *bounds_table(summary, s.max_rank),
        "",
        "Notes:",
        "",
        "- Each round runs every case once, in the order of the table. ms/iter is the median over the "
        "rounds of each round's median; the time ratio is the median over the rounds of the ratio to that "
        "round's PEFT LoRA step (listed per round). A step of this size is bound by the host launching "
        "kernels, so a shared host's load moves every case by 10–30% from one minute to the next; ratios "
        "within a round cancel most of it.",
        "- Within a round, ms/iter is the median over the timed iterations. For `first_order, selector every 4` the "
        "iterations differ (one in four carries the selector step), so the timed window is a whole "
        "number of 4-step blocks and the figure is the median of the per-block times / 4 (any 4 "
        "consecutive steps hold exactly one selector step); the plain mean over the window is in the "
        "JSONL (`ms_mean`).",
        "- peak MiB is `torch.cuda.max_memory_allocated` over the whole case (model build, warm-up and "
        "timed steps); each case builds its own model and everything is freed (gc, `empty_cache`, "
        "`reset_peak_memory_stats`) in between. Allocated before each case, round 1 (MiB): "
        + ", ".join(f"{r['case']} {fmt(r['baseline_mib'], '.1f')}" for r in rows if r["round"] == 0)
        + ".",
        "- autocast: " + "; ".join(sorted({f"{r['autocast_mode']}" for r in rows if r.get("autocast_mode")})) + ".",
        "- AdaLoRA: init_r 12 → target_r 8, tinit = tfinal = 0 (every timed step is in the budgeting phase), "
        "`update_and_allocate(step)` after each backward and optimiser step.",
        "- autolora plain step: `trainer.step(train, val)` with `selector_every` beyond the number of steps, "
        "so only the weight step runs. Every autolora row times the public `trainer.step`, which returns the "
        "step's losses (as `fit` does per step; ranks and counts are built on logged steps only).",
        *NOTES,
    ]
    write_outputs(args.out, lines, rows + summary, info)


# What each change to the step was predicted to do before it was measured, and what it did.
# "Host ops" are top-level aten calls per step under torch.profiler on CPU (a 12-layer, hidden-64
# RoBERTa), a count that does not depend on how busy the host is; the GPU figures are this script's
# runs of 2026-11-23 on an H100 (experiments/results/speed*.md).
NOTES = [
    "- Changes to the step, each with its predicted effect and what was measured (host ops: top-level "
    "aten calls per plain step, `python experiments/host_ops.py`, PEFT LoRA: 2,310; 2,434 after change 6):",
    "  1. Non-finite guard: 4 fused infinity-norm checks (`get_total_norm`) instead of one "
    "`isfinite().all()` per tensor. Predicted −3 to −5% per step. Measured with 2: host ops 2,652 → 2,431 "
    "(1.15× → 1.05× PEFT's).",
    "  2. `trainer.step` returns the step's losses only; ranks and counts are built on logged steps. "
    "Predicted −3 to −4%. Measured: included in 1's count (`_step` alone went 2,529 → 2,430).",
    "  3. Gated layer: the scale rides on the residual add (`torch.add(..., alpha=s)`). Predicted about "
    "−1%. Measured: 0 host ops in the search step (the add's backward multiplies by alpha instead); "
    "it does drop the gating multiply for fixed gates (retrain).",
    "  4. `value_and_grad` skips multiplying by 1 and dividing by 1. Predicted < 0.5%; not separable in the counts.",
    "  5. `unrolled`: the validation pass at a detached w' (fused attention) and the mixed term "
    "−ξ ∇_β⟨g, v⟩ after its graph is freed; only the train forward, differentiated twice, on math "
    "attention. Predicted −0.5 to −1 GiB peak. Measured on the H100: 6,657 → 5,885 MiB (3.43× → 3.03×).",
    "  6. Fused AdamW/Adam on CUDA, taking the guard's `found_inf` (a bad step is skipped on the device); "
    "the host reads each step's verdict one step later, so `fit` never waits for the step it just "
    "queued. PEFT's loop here uses fused AdamW too (the Hugging Face Trainer's default since torch 2.8). "
    "Predicted: fewer optimiser kernels for both; `fit` faster where the host would wait for the device. "
    "This script synchronises every iteration, so the second part shows in `fit` (GLUE wall times), not here.",
]


# ----------------------------------------------------------------------------- --cpu-small


def cpu_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have spent busy (``/proc/stat``), or None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def foreign_load() -> Iterator[dict[str, float | None]]:
    """Measure the CPU other processes used during the block, in cores (busy - our own CPU) / wall."""
    result: dict[str, float | None] = {"foreign_cores": None}
    busy0, own0, wall0 = cpu_busy_seconds(), time.process_time(), time.perf_counter()
    yield result
    busy1, own1, wall1 = cpu_busy_seconds(), time.process_time(), time.perf_counter()
    if busy0 is not None and busy1 is not None and wall1 > wall0:
        result["foreign_cores"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)


def wait_for_quiet(limit: float, max_wait_s: float) -> bool:
    """Wait until other processes use < ``limit`` cores for 3 s in a row; False on timeout."""
    deadline, quiet = time.monotonic() + max_wait_s, 0
    while time.monotonic() < deadline:
        with foreign_load() as load:
            time.sleep(1.0)
        busy = load["foreign_cores"]
        if busy is None:
            return True  # no /proc/stat: cannot tell
        quiet = quiet + 1 if busy < limit else 0
        if quiet >= 3:
            return True
    return False


def timed_fit(name: str, bench: Bench, limit: float, retries: int, max_wait_s: float) -> dict[str, Any]:
    """One end-to-end epoch of a fresh case; re-run (after waiting for quiet) while others load the CPU."""
    attempts = []
    for _ in range(retries + 1):
        wait_for_quiet(limit, max_wait_s)
        runner = CASES[name].build(bench)
        gc.collect()
        with foreign_load() as load:
            start = time.perf_counter()
            runner.epoch(bench.train, bench.val)
            sync(bench.device)
            seconds = time.perf_counter() - start
        del runner
        gc.collect()
        busy = load["foreign_cores"]
        attempts.append({"s": seconds, "foreign_cores": busy, "clean": busy is None or busy < limit})
        if attempts[-1]["clean"]:
            break
    return attempts[-1] | {"attempts": attempts}


def run_cpu_small(args: argparse.Namespace, bench: Bench, names: list[str], info: dict[str, Any]) -> None:
    """``fit`` end to end against a PEFT LoRA loop over the same batches, repeats interleaved."""
    # warm-up: one small fit per case so imports, first calls and allocator growth do not count
    for name in names:
        runner = CASES[name].build(bench)
        runner.epoch(bench.train[:2], bench.val[:2])
        del runner
        gc.collect()
    limit = args.foreign_limit
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:
            run = timed_fit(name, bench, limit, args.retries, args.quiet_wait)
            runs[name].append(run)
            print(json.dumps({"case": name} | {k: v for k, v in run.items() if k != "attempts"}), flush=True)
    info["loadavg_end"] = load_average()
    n_steps = len(bench.train)
    rows = []
    for name in names:
        clean = [r["s"] for r in runs[name] if r["clean"]]
        used = clean or [r["s"] for r in runs[name]]
        total = statistics.median(used)
        row = {
            "case": name,
            "label": CASES[name].label.format(r=bench.setup.max_rank),
            "fit_s_median": total,
            "fit_s_min": min(used),
            "fit_s": [r["s"] for r in runs[name]],
            "foreign_cores": [r["foreign_cores"] for r in runs[name]],
            "clean_runs": len(clean),
            "runs": runs[name],
            "ms_per_step": total / n_steps * 1e3,
            "steps": n_steps,
            "val_batches": len(bench.val),
            "repeats": args.repeats,
        }
        rows.append(row)
    base = next((r for r in rows if r["case"] == BASELINE), None)
    s = bench.setup
    lines = [
        "# autolora speed on CPU (`--cpu-small`)",
        "",
        *header_lines(info),
        f"- setup: `{s.name}` random weights ({', '.join(f'{k} {v}' for k, v in s.config.items())}), batch "
        f"{s.batch} × {s.length} tokens, targets {'/'.join(s.targets)}, max_rank {s.max_rank}, lr {bench.lr:g}, "
        f"fp32; {n_steps} train and {len(bench.val)} validation batches, seed {bench.seed}",
        f"- each figure is the median of {args.repeats} end-to-end runs (cases interleaved, a fresh model "
        "each, model build not timed) after one small warm-up fit per case",
        "",
        f"| case | fit s (median) | ms/step | × PEFT LoRA r={s.max_rank} | × (min of runs) | runs (s) | target "
        "| pass/miss |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        t = ratio(r["fit_s_median"], base["fit_s_median"] if base else None)
        t_min = ratio(r["fit_s_min"], base["fit_s_min"] if base else None)
        r["time_ratio"], r["time_ratio_min"] = t, t_min
        target = CASES[r["case"]].cpu_target
        shown = ", ".join(f"{x['s']:.2f}" + ("" if x["clean"] else "*") for x in r["runs"])
        lines.append(
            f"| {r['label']} | {r['fit_s_median']:.2f} | {r['ms_per_step']:.1f} | {fmt(t, '.2f', '×')} | "
            f"{fmt(t_min, '.2f', '×')} | {shown} | {'—' if target is None else f'≤ {target:g}×'} | "
            f"{'—' if target is None else mark(t, target)} |"
        )
    flagged = sum(r["clean_runs"] < r["repeats"] for r in rows)
    lines += [
        "",
        "Notes:",
        "",
        f"- PEFT LoRA: `get_peft_model` with r={s.max_rank}, lora_alpha 16, the same targets, "
        "`modules_to_save=['classifier']`, AdamW (lr as above, no weight decay) over the same train batches.",
        "- autolora: `AutoLoRATrainer(...).fit(train, val, epochs=1)` (one weight step per train batch, "
        "validation batches cycled); `plain` has `selector_every` beyond the number of steps (weight steps only).",
        f"- shared machine guard: before every run the script waits until other processes use < {limit:g} "
        "cores for 3 s (`/proc/stat`), measures the CPU other processes took during the run, and re-runs "
        f"(up to {args.retries} times) a run they disturbed; the median is over undisturbed runs. "
        + (
            f"{flagged} case(s) kept a disturbed run (marked *)."
            if flagged
            else "Every run shown was undisturbed (foreign CPU per run in the JSONL)."
        ),
        "- no peak memory on CPU (torch has no CPU allocator statistics); the GPU table has it.",
    ]
    write_outputs(args.out, lines, rows, info)


# ----------------------------------------------------------------------------- --profile


def run_profile(args: argparse.Namespace, bench: Bench, info: dict[str, Any]) -> None:
    """torch.profiler over a few iterations of one case; key_averages tables to a text file."""
    from torch.profiler import ProfilerActivity, profile, record_function

    name = args.profile
    case = CASES[name]
    device = bench.device
    cuda = device.type == "cuda"
    out = Path(args.profile_out) if args.profile_out else Path(os.environ.get("OUT") or ROOT / "experiments/results")
    if out.suffix != ".txt":
        out = out / f"profile_{name}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    free_memory(device)
    runner = case.build(bench)
    warmup = max(args.warmup, case.block)
    for i in range(warmup):
        runner.step(i)
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda and args.memory_snapshot:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    n = args.profile_iters
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=args.trace) as prof:
        for i in range(warmup, warmup + n):
            with record_function(f"iteration {i}"):
                runner.step(i)
            sync(device)
    peak = peak_mib(device)
    if cuda and args.memory_snapshot:
        snapshot = out.with_suffix(".memory.pickle")
        torch.cuda.memory._dump_snapshot(str(snapshot))
        torch.cuda.memory._record_memory_history(enabled=None)
        print(f"memory snapshot: {snapshot} (open at https://pytorch.org/memory_viz)")
    if args.trace:
        prof.export_chrome_trace(str(out.with_suffix(".trace.json")))
    averages = prof.key_averages()
    by_shape = prof.key_averages(group_by_input_shape=True)
    mem_key = "self_device_memory_usage" if cuda else "self_cpu_memory_usage"
    time_key = "device_time_total" if cuda else "cpu_time_total"
    sections = [
        f"# profile of `{name}` ({case.label.format(r=bench.setup.max_rank)}), {n} iterations after {warmup} warm-up",
        *(f"# {k}: {v}" for k, v in info.items()),
        f"# setup: {bench.setup.name}, batch {bench.setup.batch} x {bench.setup.length}, autocast {bench.autocast}",
        f"# peak allocated during the profiled iterations: {fmt(peak, ',.0f', ' MiB')}",
        "",
        f"## sorted by {mem_key}",
        averages.table(sort_by=mem_key, row_limit=args.profile_rows),
        f"## sorted by {mem_key}, grouped by input shape",
        by_shape.table(sort_by=mem_key, row_limit=args.profile_rows),
        f"## sorted by {time_key}",
        averages.table(sort_by=time_key, row_limit=args.profile_rows),
    ]
    if cuda:
        sections += ["## sorted by cpu_time_total", averages.table(sort_by="cpu_time_total", row_limit=40)]
    out.write_text("\n".join(sections) + "\n")
    print(f"profile written to {out} (peak {fmt(peak, ',.0f', ' MiB')})")


# ----------------------------------------------------------------------------- output


def header_lines(info: dict[str, Any]) -> list[str]:
    return [
        f"- date: {info['date']}",
        f"- device: {info['device']}",
        f"- versions: torch {info['torch']} (CUDA {info['cuda']}), transformers {info['transformers']}, "
        f"peft {info['peft']}, python {info['python']}, autolora {info['autolora_git']}",
        f"- command: `{info['command']}`",
        f"- load average at start (1/5/15 min): {info['loadavg_start']}"
        + (f"; at end: {info['loadavg_end']}" if "loadavg_end" in info else ""),
    ]


def write_outputs(out: str | None, lines: list[str], rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if out is None:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    with path.with_suffix(".jsonl").open("w") as f:
        f.writelines(json.dumps(info | row) + "\n" for row in rows)
    print(f"wrote {path} and {path.with_suffix('.jsonl')}")


# ----------------------------------------------------------------------------- main


@dataclass
class Plan:
    """Resolved options: mode, setup and case list."""

    mode: str  # "gpu" | "cpu-small" | "profile"
    setup: Setup
    device: torch.device
    autocast: str | None
    cases: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=None, help=f"comma-separated subset of: {', '.join(CASES)}")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per case (default 20; tiny 4)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up iterations per case (default 5; tiny 1)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--autocast", choices=["bf16", "none"], default=None, help="default: bf16 on CUDA, none on CPU")
    ap.add_argument("--tiny", action="store_true", help="a tiny model for a quick smoke run (no output file)")
    ap.add_argument("--cpu-small", action="store_true", help="small BERT on CPU, fit end to end (see above)")
    ap.add_argument("--rounds", type=int, default=3, help="GPU mode: run the whole case sequence this many times")
    ap.add_argument("--repeats", type=int, default=5, help="--cpu-small: end-to-end runs per case")
    ap.add_argument("--retries", type=int, default=4, help="--cpu-small: re-runs of a run other processes disturbed")
    ap.add_argument(
        "--foreign-limit", type=float, default=0.15, help="--cpu-small: CPU cores other processes may use in a run"
    )
    ap.add_argument("--quiet-wait", type=float, default=300, help="--cpu-small: max seconds to wait for quiet")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="markdown table (JSONL next to it); default under experiments/results")
    ap.add_argument("--profile", default=None, metavar="CASE", help="profile a few iterations of one case")
    ap.add_argument("--profile-out", default=None, help="profile text file (default: $OUT/profile_CASE.txt)")
    ap.add_argument("--profile-iters", type=int, default=3)
    ap.add_argument("--profile-rows", type=int, default=60)
    ap.add_argument("--memory-snapshot", action="store_true", help="--profile on CUDA: also dump a memory snapshot")
    ap.add_argument("--trace", action="store_true", help="--profile: also export a chrome trace (with stacks)")
    args = ap.parse_args(argv)
    if args.iters is None:
        args.iters = 4 if args.tiny else 20
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 5
    if args.iters < 1 or args.warmup < 0 or args.repeats < 1 or args.rounds < 1 or args.profile_iters < 1:
        ap.error("--iters, --repeats and --profile-iters must be >= 1, --warmup >= 0")
    if args.profile is not None and args.profile not in CASES:
        ap.error(f"--profile {args.profile!r}: choose one of {', '.join(CASES)}")
    return args


def resolve(args: argparse.Namespace) -> Plan:
    mode = "profile" if args.profile else "cpu-small" if args.cpu_small else "gpu"
    if args.cpu_small:
        device = torch.device(args.device or "cpu")
        setup = SETUPS["bert-tiny" if args.tiny else "bert-small"]
        default_cases = list(CPU_SMALL_CASES)
        default_out = None if args.tiny else "experiments/results/speed_cpu.md"
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        setup = SETUPS["roberta-tiny" if args.tiny else "roberta-base"]
        default_cases = list(CASES)
        default_out = None if args.tiny else "experiments/results/speed.md"
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; use --device cpu (with --tiny for a smoke run)")
    cases = default_cases if args.cases is None else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.out is None and default_out is not None:
        args.out = str(ROOT / default_out)
    autocast = args.autocast or ("bf16" if device.type == "cuda" and not args.cpu_small else "none")
    return Plan(mode, setup, device, None if autocast == "none" else autocast, cases)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    plan = resolve(args)
    setup, device = plan.setup, plan.device
    if plan.mode == "gpu" and device.type == "cpu" and not args.tiny:
        print("warning: the full RoBERTa-base setup on CPU is very slow; use --tiny for a smoke run", file=sys.stderr)
    if plan.autocast is not None and not trainer_accepts_autocast():
        print(
            "note: AutoLoRATrainer has no autocast= option yet; autolora cases run under an outer "
            "torch.autocast around trainer.step / fit instead",
            file=sys.stderr,
        )
    gen = torch.Generator().manual_seed(args.seed)
    # steps any case may take: warm-up + timed (rounded to blocks), or one epoch for --cpu-small
    total = setup.n_train if plan.mode == "cpu-small" else max(args.warmup, 4) + args.iters + 4
    if plan.mode == "profile":
        total += args.profile_iters
    bench = Bench(
        setup=setup,
        device=device,
        autocast=plan.autocast,
        lr=args.lr,
        seed=args.seed,
        train=make_batches(setup, setup.n_train, gen, device),
        val=make_batches(setup, setup.n_val, gen, device),
        total_steps=total,
    )
    info = run_info(device, plan.mode)
    if plan.mode == "profile":
        run_profile(args, bench, info)
    elif plan.mode == "cpu-small":
        run_cpu_small(args, bench, plan.cases, info)
    else:
        run_gpu_mode(args, bench, plan.cases, info)


if __name__ == "__main__":
    main()
