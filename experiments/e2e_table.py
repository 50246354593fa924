"""Markdown tables from the rows of ``e2e_bench.py``: per method the dev NLL per token, BLEU and
ROUGE-L (mean ± sample std over seeds), size and wall times; AutoLoRA against uniform LoRA at the
same size (``lora-r4``) and against its shuffled control, paired by seed; AutoLoRA's seed
agreement and where its rank went, per module kind; the pipeline ratio.

    python experiments/e2e_table.py experiments/results/e2e.jsonl

A later row for the same (method, seed) replaces an earlier one.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script: the repo root, for `experiments`
from experiments.e2e_bench import KINDS, METHODS
from experiments.glue_table import Row, seed_agreement, table_cli

MATCHED = "lora-r4"  # AutoLoRA prunes to mean rank 4: the uniform LoRA of the same size
METRICS = (("dev_nll", "dev NLL / token", 4), ("bleu", "BLEU", 1), ("rouge_l", "ROUGE-L", 1))


def by_method(rows: list[Row]) -> dict[str, dict[int, Row]]:
    table: dict[str, dict[int, Row]] = defaultdict(dict)
    for r in rows:
        table[r["method"]][int(r["seed"])] = r
    return table


def cell(values: list[float], digits: int) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f} (n1)"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def results(table: dict[str, dict[int, Row]]) -> list[str]:
    lines = [
        "| method | seeds | " + " | ".join(label for _, label, _ in METRICS) + " | components | train s | eval s |",
        "|---|---:|" + "---:|" * len(METRICS) + "---:|---:|---:|",
    ]
    for m in [m for m in METHODS if m in table]:
        runs = list(table[m].values())
        metrics = [cell([r[k] for r in runs], d) for k, _, d in METRICS]
        train = cell([r["train_seconds"] for r in runs], 1)
        if m == "autolora":
            train += f" (search {cell([r['search_seconds'] for r in runs], 1)})"
        lines.append(
            f"| {m} | {len(runs)} | " + " | ".join(metrics) + f" | {runs[0]['total_rank']:,} | {train} | "
            f"{cell([r['eval_seconds'] for r in runs], 1)} |"
        )
    return lines


def paired(table: dict[str, dict[int, Row]], other: str) -> str | None:
    """AutoLoRA minus ``other`` per seed, for each metric, with how many seeds AutoLoRA is better."""
    seeds = sorted(set(table.get("autolora", {})) & set(table.get(other, {})))
    if not seeds:
        return None
    cells = []
    for key, label, digits in METRICS:
        diffs = [table["autolora"][s][key] - table[other][s][key] for s in seeds]
        better = sum(d < 0 if key == "dev_nll" else d > 0 for d in diffs)
        shown = ", ".join(f"{d:+.{digits}f}" for d in diffs)
        cells.append(f"{label} {shown} (better on {better}/{len(seeds)})")
    return f"- AutoLoRA − {other}, seeds {', '.join(map(str, seeds))}: " + "; ".join(cells)


def kinds(table: dict[str, dict[int, Row]]) -> list[str]:
    runs = [r for _, r in sorted(table.get("autolora", {}).items()) if r.get("ranks")]
    if not runs:
        return []
    lines = ["| seed | " + " | ".join(k.removesuffix("_proj") for k in KINDS) + " | lowest confidence |"]
    lines.append("|---:|" + "---:|" * (len(KINDS) + 1))
    for r in runs:
        means = []
        for kind in KINDS:
            ranks = [v for n, v in r["ranks"].items() if n.rsplit(".", 1)[-1] == kind]
            means.append(f"{statistics.fmean(ranks):.2f}" if ranks else "—")
        low = min(r.get("confidence", {}).values(), default=float("nan"))
        lines.append(f"| {r['seed']} | " + " | ".join(means) + f" | {low:.1f} |")
    return lines


def pipeline(table: dict[str, dict[int, Row]]) -> str | None:
    seeds = sorted(set(table.get("autolora", {})) & set(table.get(MATCHED, {})))
    if not seeds:
        return None
    ratios = [table["autolora"][s]["train_seconds"] / table[MATCHED][s]["train_seconds"] for s in seeds]
    shown = ", ".join(f"{x:.2f}×" for x in ratios)
    return (
        f"- Pipeline (search + retrain) over one `{MATCHED}` training, same seed and concurrency: {shown} "
        f"(mean {statistics.fmean(ratios):.2f}×)"
    )


def render(path: str, rows: list[Row]) -> str:
    table = by_method(rows)
    settings = sorted({(r.get("train_rows"), r.get("dev_mrs"), r.get("device")) for r in rows}, key=str)
    lines = [f"Rows: {len(rows)} from `{path}`; (train rows, dev MRs, device): {settings}.", "", *results(table)]
    notes = [paired(table, MATCHED), paired(table, "shuffled"), pipeline(table)]
    lines += ["", *[n for n in notes if n]]
    if "autolora" in table:
        lines += ["", f"AutoLoRA seed agreement (per-module ranks, Spearman): {seed_agreement(table['autolora'])}"]
        lines += ["", "AutoLoRA's mean rank per module kind:", "", *kinds(table)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    table_cli(__doc__, "e2e_bench.py", render, argv)


if __name__ == "__main__":
    main()
