"""Markdown tables from the rows of ``glue_bench.py``: dev metric per method x task, adapter
parameters, wall time, ranks, and a check of the four bars AutoLoRA has to clear.

    python experiments/glue_table.py experiments/results/glue.jsonl > experiments/results/glue.md

Rows are grouped by setting (``--epochs`` / ``--limit`` / ``--max-grad-norm`` of the pass), one
section per setting.
Cells are mean ± sample std over seeds, with the number of seeds (n). The five-task average is
the mean of the per-task means, shown only when all five tasks are present. The bar checks
compare methods on the (task, seed) pairs both have, so a partial pass compares like with like.

Bars, for every AutoLoRA method:
  1. five-task average above lora_r8's, with fewer adapter parameters;
  2. not below the best single fixed rank (lora_r2 / r4 / r8 / r16);
  3. above AdaLoRA;
  4. wall time at most 2.0x lora_r8's on every task.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TASKS: tuple[str, ...] = ("MRPC", "RTE", "CoLA", "STS-B", "SST-2")
METRIC_SHORT = {"accuracy": "acc", "mcc": "mcc", "pearson": "pearson"}
FAMILY_ORDER = {"lora": 0, "adalora": 1, "autolora": 2}
BASELINE = "lora_r8"
WALL_FACTOR = 2.0

Row = dict[str, Any]


def read_rows(path: str) -> list[Row]:
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"warning: {path}:{number} is not a JSON row; ignored", file=sys.stderr)
    return rows


def method_order(rows: Iterable[Row]) -> list[str]:
    """Fixed ranks (by rank), then AdaLoRA, then AutoLoRA variants (by name)."""
    keys = {}
    for r in rows:
        family = FAMILY_ORDER.get(r.get("family", ""), 9)
        keys[r["method"]] = (family, r.get("mean_rank", 0) if family == 0 else 0, r["method"])
    return sorted(keys, key=keys.__getitem__)


def by_method_task(rows: list[Row]) -> dict[str, dict[str, dict[int, Row]]]:
    """{method: {task: {seed: row}}}; a later row for the same key wins."""
    table: dict[str, dict[str, dict[int, Row]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        table[r["method"]][r["task"]][int(r["seed"])] = r
    return table


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt_metric(values: list[float]) -> str:
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{mean:.3f} ± {std:.3f} (n{len(values)})" if std is not None else f"{mean:.3f} (n1)"


def fmt_int(x: float) -> str:
    return f"{round(x):,}"


def params_cell(rows: list[Row]) -> str:
    values = [r["adapter_params"] for r in rows]
    lo, hi = min(values), max(values)
    cell = fmt_int(statistics.fmean(values)) if lo == hi else f"{fmt_int(statistics.fmean(values))} ({lo:,}–{hi:,})"
    raw = [r["adapter_params_raw"] for r in rows if "adapter_params_raw" in r]
    if raw:
        cell += f" [raw {fmt_int(statistics.fmean(raw))}]"
    return cell


def header(path: str, rows: list[Row]) -> list[str]:
    def distinct(key: str) -> str:
        values = sorted({str(r.get(key)) for r in rows})
        return ", ".join(values)

    dates = sorted(r.get("date", "") for r in rows)
    concurrency = sorted({int(r.get("concurrent_jobs") or 1) for r in rows})
    lines = [
        "# GLUE dev: AutoLoRA vs PEFT LoRA and AdaLoRA (all-MiniLM-L6-v2)",
        "",
        f"- rows: {len(rows)} from `{path}`, {dates[0][:16]} to {dates[-1][:16]} (UTC)",
        f"- machine: {distinct('device')}; torch {distinct('torch')}, transformers {distinct('transformers')}, "
        f"peft {distinct('peft')}; precision {distinct('precision')}; "
        f"{'/'.join(map(str, concurrency))} worker(s) at a time",
    ]
    lines += [f"- command: `{c}`" for c in sorted({r.get("command", "?") for r in rows})]
    return lines


def section(rows: list[Row]) -> list[str]:
    table = by_method_task(rows)
    methods = method_order(rows)
    tasks = [t for t in TASKS if any(t in table[m] for m in methods)]
    tasks += sorted({r["task"] for r in rows} - set(tasks))
    metric_of = {r["task"]: r["metric"] for r in rows}
    epochs = {t: sorted({r["epochs"] for r in rows if r["task"] == t}) for t in tasks}

    lines = ["", "### Dev metric (final epoch): mean ± std over seeds (n)", ""]
    cols = [f"{t} {METRIC_SHORT.get(metric_of[t], metric_of[t])}" for t in tasks]
    lines += [
        "| method | adapter params | " + " | ".join(cols) + " | 5-task avg |",
        "|---|---|" + "---|" * len(tasks) + "---|",
    ]
    for m in methods:
        per_task = table[m]
        cells = [fmt_metric([r["dev_metric"] for r in per_task.get(t, {}).values()]) for t in tasks]
        all_rows = [r for t in per_task for r in per_task[t].values()]
        avg = "—"
        if all(per_task.get(t) for t in TASKS):
            avg = f"{statistics.fmean(statistics.fmean(r['dev_metric'] for r in per_task[t].values()) for t in TASKS):.4f}"
        lines.append(f"| {m} | {params_cell(all_rows)} | " + " | ".join(cells) + f" | {avg} |")
    lines += [
        "",
        "Epochs per task: " + ", ".join(f"{t} {'/'.join(map(str, epochs[t]))}" for t in tasks) + ". "
        "Adapter params exclude the classifier head; for AdaLoRA they are the final effective budget "
        "(kept rank × (in + out) summed over matrices), its raw trainable count (A, E, B at init_r) in brackets; "
        "where they vary over tasks and seeds, the mean and (range).",
    ]

    base = table.get(BASELINE, {})
    lines += ["", f"### Wall time (s): mean over seeds (ratio to {BASELINE} on the same task)", ""]
    lines += ["| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in methods:
        cells = []
        for t in tasks:
            walls = [r["wall_s"] for r in table[m].get(t, {}).values()]
            if not walls:
                cells.append("—")
                continue
            cell = f"{statistics.fmean(walls):.1f}"
            base_walls = [r["wall_s"] for r in base.get(t, {}).values()]
            if base_walls and m != BASELINE:
                cell += f" ({statistics.fmean(walls) / statistics.fmean(base_walls):.2f}×)"
            searches = [r["search_s"] for r in table[m].get(t, {}).values() if "search_s" in r]
            if searches:
                retrains = [r["retrain_s"] for r in table[m][t].values()]
                cell += f" = {statistics.fmean(searches):.1f} search + {statistics.fmean(retrains):.1f} retrain"
            cells.append(cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Training only (search + prune + retrain for AutoLoRA); model load, tokenisation and the dev "
        "evaluation are excluded. Runs sharing a GPU slow each other down, so compare times taken "
        "with the same number of workers.",
    ]

    adaptive = [m for m in methods if any(r.get("ranks") for t in table[m] for r in table[m][t].values())]
    if adaptive:
        lines += ["", "### Mean rank found per matrix (mean over seeds; min–max over matrices and seeds)", ""]
        lines += ["| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for m in adaptive:
            cells = []
            for t in tasks:
                found = [r["ranks"] for r in table[m].get(t, {}).values() if r.get("ranks")]
                if not found:
                    cells.append("—")
                    continue
                every = [v for ranks in found for v in ranks.values()]
                mean = statistics.fmean(statistics.fmean(ranks.values()) for ranks in found)
                cells.append(f"{mean:.2f} ({min(every)}–{max(every)})")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "### Bars", "", *bars(table, methods)]
    return lines


def paired(table, a: str, b: str) -> dict[str, list[int]] | None:
    """{task: seeds both methods have} over the five tasks, or None if a task has no common seed."""
    common = {t: sorted(set(table[a].get(t, {})) & set(table[b].get(t, {}))) for t in TASKS}
    return common if all(common.values()) else None


def paired_avg(table, method: str, common: dict[str, list[int]], key: str = "dev_metric") -> float:
    return statistics.fmean(statistics.fmean(table[method][t][s][key] for s in seeds) for t, seeds in common.items())


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**FAIL**"


def bars(table, methods: list[str]) -> list[str]:
    auto = [m for m in methods if _family(table, m) == "autolora"]
    fixed = [m for m in methods if _family(table, m) == "lora"]
    ada = [m for m in methods if _family(table, m) == "adalora"]
    if not auto:
        return ["No AutoLoRA rows yet."]
    lines = []
    for m in auto:
        lines.append(f"**{m}** (paired on the (task, seed) runs both methods have; n = runs per task):")
        # 1. above lora_r8 with fewer adapter params
        common = paired(table, m, BASELINE) if BASELINE in table else None
        if common is None:
            lines.append(
                f"1. above {BASELINE} with fewer adapter params: n/a (needs all five tasks with a common seed)"
            )
        else:
            mine, theirs = paired_avg(table, m, common), paired_avg(table, BASELINE, common)
            p_mine = paired_avg(table, m, common, "adapter_params")
            p_theirs = paired_avg(table, BASELINE, common, "adapter_params")
            lines.append(
                f"1. above {BASELINE} with fewer adapter params: avg {mine:.4f} vs {theirs:.4f}, "
                f"{fmt_int(p_mine)} vs {fmt_int(p_theirs)} params ({_n(common)}) — "
                f"{verdict(mine > theirs and p_mine < p_theirs)}"
            )
        # 2. not below the best single fixed rank
        parts, ok, missing, theirs_by = [], True, [], {}
        for f in fixed:
            common = paired(table, m, f)
            if common is None:
                missing.append(f)
                continue
            mine, theirs_by[f] = paired_avg(table, m, common), paired_avg(table, f, common)
            ok &= mine >= theirs_by[f]
            parts.append(f"{mine:.4f} vs {f} {theirs_by[f]:.4f} ({_n(common)})")
        if parts:
            best = max(theirs_by, key=theirs_by.__getitem__)
            note = f"; no common seeds with {', '.join(missing)}" if missing else ""
            lines.append(f"2. not below the best fixed rank ({best}): {'; '.join(parts)}{note} — {verdict(ok)}")
        else:
            lines.append("2. not below the best fixed rank: n/a (needs all five tasks with a common seed)")
        # 3. above AdaLoRA
        parts, ok = [], True
        for a in ada:
            common = paired(table, m, a)
            if common is None:
                continue
            mine, theirs = paired_avg(table, m, common), paired_avg(table, a, common)
            ok &= mine > theirs
            parts.append(f"avg {mine:.4f} vs {a} {theirs:.4f} ({_n(common)})")
        lines.append(
            f"3. above AdaLoRA: {'; '.join(parts)} — {verdict(ok)}"
            if parts
            else "3. above AdaLoRA: n/a (needs all five tasks with a common seed)"
        )
        # 4. wall time <= 2x lora_r8 on every task
        ratios = {}
        for t in TASKS:
            seeds = sorted(set(table[m].get(t, {})) & set(table.get(BASELINE, {}).get(t, {})))
            if seeds:
                mine = statistics.fmean(table[m][t][s]["wall_s"] for s in seeds)
                ratios[t] = mine / statistics.fmean(table[BASELINE][t][s]["wall_s"] for s in seeds)
        if ratios:
            worst = max(ratios.values())
            listed = ", ".join(f"{t} {r:.2f}×" for t, r in ratios.items())
            partial = "" if len(ratios) == len(TASKS) else f" (only {len(ratios)} of {len(TASKS)} tasks)"
            lines.append(
                f"4. wall time ≤ {WALL_FACTOR:.1f}× {BASELINE} on every task: {listed}{partial} — "
                f"{verdict(worst <= WALL_FACTOR)}{' so far' if partial else ''}"
            )
        else:
            lines.append(f"4. wall time ≤ {WALL_FACTOR:.1f}× {BASELINE}: n/a")
        lines.append("")
    return lines


def _family(table, method: str) -> str:
    for runs in table[method].values():
        for r in runs.values():
            return r.get("family", "")
    return ""


def _n(common: dict[str, list[int]]) -> str:
    counts = sorted({len(s) for s in common.values()})
    return "n" + "/".join(map(str, counts))


def render(path: str, rows: list[Row]) -> str:
    groups: dict[tuple[Any, Any, Any], list[Row]] = defaultdict(list)
    for r in rows:
        groups[(r.get("epochs_arg"), r.get("limit"), r.get("max_grad_norm"))].append(r)
    lines = header(path, rows)
    for (epochs, limit, clip), group in sorted(groups.items(), key=lambda kv: (kv[0][1] is not None, str(kv[0]))):
        title = "default epochs (10; SST-2 1)" if epochs is None else f"--epochs {epochs}"
        title += ", full data" if limit is None else f", --limit {limit} (smoke test: metrics meaningless)"
        title += "" if clip is None else f", gradient norm clipped to {clip:g} (every method)"
        lines += ["", f"## {title}", *section(group)]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", help="JSONL written by glue_bench.py")
    args = ap.parse_args(argv)
    rows = read_rows(args.rows)
    if not rows:
        raise SystemExit(f"{args.rows} has no rows")
    sys.stdout.write(render(args.rows, rows))


if __name__ == "__main__":
    main()
