"""Every hypergradient engine on a RoBERTa-base-shaped model with its default (SDPA) attention.

Checks that the exact engines (which need a double backward) run on the GPU without the fused
attention kernels' "derivative ... not implemented" errors, measures how well each engine's
direction agrees with the exact one on one shared state (eval mode, xi = inner_lr), and records
ms per search iteration and peak memory.

    python experiments/gpu_engines.py --out experiments/results/gpu_engines.jsonl

Random weights (no hub); batch 32 x 128 tokens; targets query/value; max_rank 64; fp32.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch
from transformers import RobertaConfig, RobertaForSequenceClassification

from autolora import ENGINES, AutoLoRATrainer


def batch(gen: torch.Generator, device: str, size: int, length: int) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(5, 50000, (size, length), generator=gen).to(device),
        "attention_mask": torch.ones(size, length, dtype=torch.long, device=device),
        "labels": torch.randint(0, 2, (size,), generator=gen).to(device),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    train = [batch(gen, device, args.batch, args.length) for _ in range(args.steps + 2)]
    val = [batch(gen, device, args.batch, args.length) for _ in range(2)]
    rows, reference = [], None
    for engine in ["unrolled", "higher", "darts", "first_order"]:
        torch.manual_seed(0)
        model = RobertaForSequenceClassification(RobertaConfig(num_labels=2)).to(device)
        attn = model.config._attn_implementation
        trainer = AutoLoRATrainer(
            model,
            max_rank=64,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
            hypergrad=engine,
            progress=False,
        )
        trainer.fit(train[:2], val_data=val, max_steps=2)  # warm-up; B != 0 from here on
        if reference is None:  # every engine on this one state, in eval mode (no dropout noise)
            model.eval()
            flat = {
                e: torch.cat([g.flatten() for g in trainer.hypergradient(train[2], val[0], engine=e).values()])
                for e in ENGINES
            }
            model.train()
            reference = {
                e: float(torch.nn.functional.cosine_similarity(h, flat["unrolled"], dim=0)) for e, h in flat.items()
            }
            print(json.dumps({"cosine_to_unrolled_same_state": reference}), flush=True)
        cos = reference[engine]
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for b in train[2:]:
            start = time.perf_counter()
            trainer.step(b, val[0])
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
        row = {
            "engine": engine,
            "attn_implementation": attn,
            "ms_per_iter_median": statistics.median(times),
            "peak_mib": peak,
            "cosine_to_unrolled": cos,
            "steps_timed": len(times),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        del trainer, model
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
