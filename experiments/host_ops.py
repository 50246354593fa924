"""Count the host-side operator calls of one training step: autolora's cases against PEFT LoRA.

A step of a small model on a fast GPU is bound by the host issuing kernels, and the number of
top-level aten calls per step is a count that does not depend on how busy the host is. This
script counts them under ``torch.profiler`` on CPU (a 12-layer, hidden-64 RoBERTa, batch 4 x 16,
bf16 autocast) and lists the operators autolora's step calls more often than a PEFT LoRA step::

    python experiments/host_ops.py                 # the plain (weights-only) step
    python experiments/host_ops.py --case darts    # any case of experiments/speedcases.py
    PYTHONPATH=<older autolora> python experiments/host_ops.py   # the same count for older code
"""

from __future__ import annotations

import argparse
import collections
import sys
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


def top_level_ops(runner: speed.Runner, step: int) -> collections.Counter:
    """aten calls made by the step itself (not those nested inside another aten call)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.step(step)
    return collections.Counter(
        e.name
        for e in prof.events()
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="plain", choices=[c for c, v in speed.CASES.items() if v.kind == "autolora"])
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    train, val = speed.make_batches(SETUP, 4, gen, device), speed.make_batches(SETUP, 2, gen, device)
    bench = speed.Bench(SETUP, device, "bf16", 5e-4, 0, train, val, 1000)  # bf16 autocast, as on the GPU
    counts = {}
    for name in ("peft_lora", args.case):
        runner = speed.CASES[name].build(bench)
        for i in range(args.warmup):
            runner.step(i)
        counts[name] = top_level_ops(runner, args.warmup)
    base, ours = counts["peft_lora"], counts[args.case]
    total_base, total = sum(base.values()), sum(ours.values())
    print(f"top-level aten calls per step: PEFT LoRA r={SETUP.max_rank} {total_base}, {args.case} {total} ", end="")
    print(f"({total / total_base:.3f}x)")
    print("called more often by autolora:", sorted((ours - base).items(), key=lambda kv: -kv[1])[:20])
    print("called more often by PEFT:", sorted((base - ours).items(), key=lambda kv: -kv[1])[:20])


if __name__ == "__main__":
    main()
