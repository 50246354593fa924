"""Count the host-side operator calls of one training step: autolora's cases against PEFT LoRA.

A step of a small model on a fast GPU is bound by the host issuing kernels, and the number of
top-level aten calls per step is a count that does not depend on how busy the host is. This
script counts them under ``torch.profiler`` on CPU (a 12-layer, hidden-64 RoBERTa, batch 4 x 16,
bf16 autocast) and lists the operators autolora's step calls more often than a PEFT LoRA step::

    python experiments/host_ops.py                 # the plain (weights-only) step
    python experiments/host_ops.py --case darts    # any case of experiments/speedcases.py
    PYTHONPATH=<older autolora> python experiments/host_ops.py   # the same count for older code

Many modules (issue 18): ``--shape smollm2`` counts a narrow SmolLM2-shaped Llama instead (GQA
9/3 heads, all seven linear kinds adapted, 7 modules a layer, hidden 72). With several
``--layers`` it also gives the growth per adapted module between the smallest and the largest
depth, for the ops and for the host's CPU time per step (median of ``--timed`` unprofiled steps
on one thread; at this width a CPU step is almost all host work), which says whether autolora's per-module
work grows faster than PEFT's::

    python experiments/host_ops.py --shape smollm2 --case first_order --layers 10,30
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speedcases as speed  # the benchmark's cases and batches

SETUP = speed.Setup(
    "roberta-12x64",
    "roberta",
    {
        "hidden_size": 64,
        "num_hidden_layers": 12,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 1000,
    },
    batch=4,
    length=16,
    max_rank=8,
    n_train=4,
)
# SmolLM2-135M's structure (speedcases.SMOLLM2) at hidden 72 (9 heads of 8, 3 KV heads)
SMOLLM2_NARROW = speed.Setup(
    "smollm2-30x72",
    "llama",
    speed.SMOLLM2 | {"hidden_size": 72, "intermediate_size": 192, "vocab_size": 1000},
    batch=4,
    length=16,
    max_rank=16,
    targets=speed.LLAMA_TARGETS,
    n_train=4,
)
SHAPES = {"roberta": SETUP, "smollm2": SMOLLM2_NARROW}


def top_level_ops(runner: speed.Runner, step: int) -> collections.Counter:
    """aten calls made by the step itself (not those nested inside another aten call)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.step(step)
    return collections.Counter(
        e.name
        for e in prof.events()
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def host_ms(runner: speed.Runner, first: int, n: int) -> float:
    """Median CPU ms of this process over ``n`` unprofiled steps: with one torch thread (``main``
    sets it) that is the step's own work, which other processes' load on a shared machine moves
    far less than the wall time."""
    times = []
    for i in range(first, first + n):
        start = time.process_time()
        runner.step(i)
        times.append((time.process_time() - start) * 1e3)
    return statistics.median(times)


def measure(setup: speed.Setup, names: list[str], warmup: int, timed: int) -> dict[str, dict]:
    """{case: {"ops": Counter, "ms": median host ms}} on ``setup`` (bf16 autocast, as on the GPU)."""
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    train, val = speed.make_batches(setup, 4, gen, device), speed.make_batches(setup, 2, gen, device)
    bench = speed.Bench(setup, device, "bf16", 5e-4, 0, train, val, 1000)
    out = {}
    for name in names:
        runner = speed.CASES[name].build(bench)
        for i in range(warmup):
            runner.step(i)
        ops = top_level_ops(runner, warmup)
        out[name] = {"ops": ops, "ms": host_ms(runner, warmup + 1, timed) if timed else None}
        del runner
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="plain", choices=[c for c, v in speed.CASES.items() if v.kind == "autolora"])
    ap.add_argument("--shape", default="roberta", choices=list(SHAPES))
    ap.add_argument("--layers", default=None, help="comma-separated depths (default: the shape's own)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timed", type=int, default=0, help="also time this many unprofiled steps per case (1 thread)")
    args = ap.parse_args(argv)
    if args.timed:
        torch.set_num_threads(1)  # host_ms counts this process's CPU time
    base_setup = SHAPES[args.shape]
    depths = [int(x) for x in args.layers.split(",")] if args.layers else [base_setup.config["num_hidden_layers"]]
    names = ["peft_lora", args.case]
    results = {}
    for depth in depths:
        setup = speed.Setup(
            f"{base_setup.name.split('-')[0]}-{depth}x{base_setup.config['hidden_size']}",
            base_setup.arch,
            base_setup.config | {"num_hidden_layers": depth},
            batch=base_setup.batch,
            length=base_setup.length,
            max_rank=base_setup.max_rank,
            targets=base_setup.targets,
            n_train=base_setup.n_train,
        )
        results[depth] = measure(setup, names, args.warmup, args.timed)
        base, ours = results[depth]["peft_lora"]["ops"], results[depth][args.case]["ops"]
        total_base, total = sum(base.values()), sum(ours.values())
        modules = depth * len(setup.targets)
        print(f"{setup.name} ({modules} adapted modules): top-level aten calls per step: ", end="")
        print(f"PEFT LoRA r={setup.max_rank} {total_base}, {args.case} {total} ({total / total_base:.3f}x)", end="")
        if args.timed:
            ms_base, ms = results[depth]["peft_lora"]["ms"], results[depth][args.case]["ms"]
            print(f"; host CPU ms/step PEFT {ms_base:.1f}, {args.case} {ms:.1f} ({ms / ms_base:.2f}x)", end="")
        print()
        print("  called more often by autolora:", sorted((ours - base).items(), key=lambda kv: -kv[1])[:20])
        print("  called more often by PEFT:", sorted((base - ours).items(), key=lambda kv: -kv[1])[:20])
    if len(depths) > 1:
        lo, hi = min(depths), max(depths)
        added = (hi - lo) * len(base_setup.targets)
        print(f"growth per adapted module, {lo} -> {hi} layers ({added} modules added):")
        for name in names:
            ops = (sum(results[hi][name]["ops"].values()) - sum(results[lo][name]["ops"].values())) / added
            line = f"  {name}: {ops:.2f} top-level aten calls per module"
            if args.timed:
                line += f", {(results[hi][name]['ms'] - results[lo][name]['ms']) / added * 1e3:.0f} us host CPU time"
            print(line)
        diff = results[hi][args.case]["ops"] - results[lo][args.case]["ops"]
        diff_base = results[hi]["peft_lora"]["ops"] - results[lo]["peft_lora"]["ops"]
        per_module = {k: v / added for k, v in diff.items()}
        per_module_base = {k: v / added for k, v in diff_base.items()}
        extra = {k: round(v - per_module_base.get(k, 0.0), 2) for k, v in per_module.items()}
        print(
            "  per module, autolora minus PEFT:", sorted(((k, v) for k, v in extra.items() if v), key=lambda kv: -kv[1])
        )
        fewer = {k: round(v - per_module.get(k, 0.0), 2) for k, v in per_module_base.items()}
        print(
            "  per module, PEFT minus autolora:",
            sorted(((k, v) for k, v in fewer.items() if v > 0), key=lambda kv: -kv[1]),
        )


if __name__ == "__main__":
    main()
