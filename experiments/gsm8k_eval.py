"""GSM8K exact match of a finished ``autolora train configs/smollm2-gsm8k.yaml`` run.

The run's dev rows (its ``data.dev_file`` and ``data.dev_limit`` subset, the rows its dev loss is
on) are answered greedily through the exported adapter loaded with stock PEFT, and, for the
baseline, by the same model with the adapter disabled. A prediction is right when the number
after its first ``#### `` equals the gold answer's (commas, ``$`` and a trailing ``.`` dropped);
an answer without ``#### `` is wrong. One JSON row is appended to ``--out``::

    python experiments/gsm8k_eval.py runs/smollm2-gsm8k --out experiments/results/gsm8k.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import time
from decimal import Decimal
from pathlib import Path

from autolora import generate_batch, load_adapted, load_run_config, load_run_split

_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def final_answer(text: str) -> str | None:
    """The number after the first ``####`` in ``text``, normalised (``"1,000."`` -> ``"1000"``,
    ``"3.50"`` -> ``"3.5"``), or None."""
    m = _ANSWER.search(text.replace("$", ""))
    if m is None:
        return None
    return format(Decimal(m.group(1).replace(",", "")).normalize(), "f")


def exact_match(predictions: list[str], golds: list[str]) -> float:
    """The share of predictions whose final answer equals the gold's."""
    answers = [(final_answer(p), final_answer(g)) for p, g in zip(predictions, golds)]
    return sum(a is not None and a == gold for a, gold in answers) / len(answers)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-base", action="store_true", help="skip the base model (adapter disabled) baseline")
    ap.add_argument("--out", type=Path, required=True, help="JSONL file; one row is appended")
    args = ap.parse_args(argv)

    cfg = load_run_config(args.run_dir)
    model, tokenizer = load_adapted(args.run_dir)
    dev = load_run_split(cfg, tokenizer, "dev")
    prompts = [cfg.data.prompt_template.format(prompt=row[cfg.data.prompt_column]) for row in dev.rows]
    golds = [str(row[cfg.data.completion_column]) for row in dev.rows]
    row = {"run_dir": str(args.run_dir), "dev_rows": len(prompts), "max_new_tokens": args.max_new_tokens}
    for name in ("adapter",) if args.no_base else ("adapter", "base"):
        start = time.perf_counter()
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            preds = generate_batch(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
        row[f"{name}_exact_match"] = exact_match(preds, golds)
        row[f"{name}_answered"] = sum(final_answer(p) is not None for p in preds) / len(preds)
        row[f"{name}_decode_s"] = round(time.perf_counter() - start, 1)
        row[f"{name}_sample"] = preds[0]
        print(f"{name}: exact match {row[f'{name}_exact_match']:.4f} on {len(preds)} rows", flush=True)
    metrics = args.run_dir / "metrics.json"
    if metrics.is_file():
        row["dev_loss"] = json.loads(metrics.read_text()).get("dev_loss")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
