"""Markdown tables from the rows of ``glue_bench.py``: dev metric per method x task, adapter
parameters, wall time, ranks, and a check of the four bars AutoLoRA has to clear.

    python experiments/glue_table.py experiments/results/glue.jsonl > experiments/results/glue.md

Rows are grouped by setting (``--targets`` / ``--epochs`` / ``--limit`` / ``--max-grad-norm`` of
the pass), one section per setting.
Cells are mean ± sample std over seeds, with the number of seeds (n). The five-task average is
the mean of the per-task means, shown only when all five tasks are present. The bar checks
compare methods on the (task, seed) pairs both have, so a partial pass compares like with like.

Bars, for every AutoLoRA method:
  1. five-task average above lora_r8's, with fewer adapter parameters;
  2. not below the best single fixed rank (lora_r2 / r4 / r8 / r16);
  3. above AdaLoRA;
  4. wall time at most 2.0x lora_r8's on every task.

Per setting also: adapter parameters per task; AutoLoRA's seed agreement (mean pairwise Spearman
of the per-module rank vectors over seeds); the controls (AutoLoRA minus the shuffled and uniform
rank plans it produced, paired by seed, with a sign count); the pipeline cost (search + retrain
over lora_r8's wall time, same task and seed).
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

import numpy as np

TASKS: tuple[str, ...] = ("MRPC", "RTE", "CoLA", "STS-B", "SST-2")
METRIC_SHORT = {"accuracy": "acc", "mcc": "mcc", "pearson": "pearson"}
FAMILY_ORDER = {"lora": 0, "adalora": 1, "control": 2, "autolora": 3}
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
        "# GLUE dev: AutoLoRA vs PEFT LoRA, AdaLoRA and rank controls (all-MiniLM-L6-v2)",
        "",
        f"- rows: {len(rows)} from `{path}`, {dates[0][:16]} to {dates[-1][:16]} (UTC)",
        f"- machine: {distinct('device')}; torch {distinct('torch')}, transformers {distinct('transformers')}, "
        f"peft {distinct('peft')}; precision {distinct('precision')}; "
        f"{'/'.join(map(str, concurrency))} worker(s) at a time",
    ]
    lines.append(f"- code revision: {distinct('git_rev')}")
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
        if _family(table, m) == "autolora":  # the seed agreement of the ranks next to the score
            cells = [
                c if c == "—" else f"{c}; ρ {seed_agreement(per_task[t]).split(' (')[0]}" for c, t in zip(cells, tasks)
            ]
        all_rows = [r for t in per_task for r in per_task[t].values()]
        avg = "—"
        if all(per_task.get(t) for t in TASKS):
            avg = f"{statistics.fmean(statistics.fmean(r['dev_metric'] for r in per_task[t].values()) for t in TASKS):.4f}"
        lines.append(f"| {m} | {params_cell(all_rows)} | " + " | ".join(cells) + f" | {avg} |")
    lines += [
        "",
        "Epochs per task: " + ", ".join(f"{t} {'/'.join(map(str, epochs[t]))}" for t in tasks) + ". "
        "ρ: AutoLoRA's seed agreement (see below). "
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
    lines += sizes(table, methods, tasks)
    lines += agreement(table, methods, tasks)
    lines += controls(table, methods, tasks)
    lines += pipeline_cost(table, methods, tasks)
    lines += ["", "### Bars", "", *bars(table, methods)]
    return lines


def sizes(table, methods: list[str], tasks: list[str]) -> list[str]:
    """Adapter parameters per method and task (mean over seeds; range if they differ)."""
    lines = ["", "### Adapter parameters per task (mean over seeds; min–max where seeds differ)", ""]
    lines += ["| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in methods:
        cells = [params_cell(list(table[m][t].values())) if table[m].get(t) else "—" for t in tasks]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``, ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rho (Pearson of average ranks); None if either vector is constant."""
    x, y = average_ranks(np.asarray(a, float)), average_ranks(np.asarray(b, float))
    x, y = x - x.mean(), y - y.mean()
    denom = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return None if denom == 0 else float((x * y).sum() / denom)


def seed_agreement(runs: dict[int, Row]) -> str:
    """Mean pairwise Spearman of the per-module rank vectors over seeds, as a cell."""
    vectors = {s: r["ranks"] for s, r in sorted(runs.items()) if r.get("ranks")}
    if len(vectors) < 2:
        return f"n/a ({len(vectors)} seed)"
    seeds = list(vectors)
    names = sorted(vectors[seeds[0]])
    if any(sorted(v) != names for v in vectors.values()):
        return "n/a (module sets differ)"
    rhos, constant = [], 0
    for i, s in enumerate(seeds):
        for t in seeds[i + 1 :]:
            rho = spearman([vectors[s][n] for n in names], [vectors[t][n] for n in names])
            if rho is None:
                constant += 1
            else:
                rhos.append(rho)
    if not rhos:
        return "n/a (constant)"
    note = f", {constant} pair(s) constant" if constant else ""
    return f"{statistics.fmean(rhos):.2f} ({len(rhos)} pairs{note})"


def agreement(table, methods: list[str], tasks: list[str]) -> list[str]:
    auto = [m for m in methods if _family(table, m) == "autolora"]
    if not auto:
        return []
    lines = ["", "### Seed agreement of AutoLoRA's ranks (mean pairwise Spearman over seeds)", ""]
    lines += ["| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in auto:
        lines.append(f"| {m} | " + " | ".join(seed_agreement(table[m].get(t, {})) for t in tasks) + " |")
    lines += [
        "",
        "1 = the seeds rank the modules in the same order; about 0 = no agreement. "
        "`n/a (constant)`: every rank vector is constant (Spearman is undefined).",
    ]
    return lines


def controls(table, methods: list[str], tasks: list[str]) -> list[str]:
    """AutoLoRA minus each method that took its ranks from it (controls and AdaLoRA), paired by
    seed: the mean difference per task and how many (task, seed) pairs AutoLoRA wins."""
    lines = []
    for a in (m for m in methods if _family(table, m) == "autolora"):
        others = [
            m
            for m in methods
            if _family(table, m) in ("control", "adalora")
            and any(r.get("rank_from") == a for t in table[m] for r in table[m][t].values())
        ]
        if not others:
            continue
        lines += ["", f"### Controls: {a} minus each method that took its ranks from it (paired by seed)", ""]
        lines += ["| minus | " + " | ".join(tasks) + " | wins (pairs) |", "|---|" + "---|" * len(tasks) + "---|"]
        for c in others:
            cells, wins, pairs = [], 0, 0
            for t in tasks:
                seeds = [
                    s for s, r in table[c].get(t, {}).items() if r.get("rank_from") == a and s in table[a].get(t, {})
                ]
                if not seeds:
                    cells.append("—")
                    continue
                diffs = [table[a][t][s]["dev_metric"] - table[c][t][s]["dev_metric"] for s in seeds]
                wins += sum(d > 0 for d in diffs)
                pairs += len(diffs)
                cells.append(f"{statistics.fmean(diffs):+.3f} (n{len(diffs)})")
            lines.append(f"| {c} | " + " | ".join(cells) + f" | {wins}/{pairs} |")
        lines += [
            "",
            f"Positive: {a} is better. Wins: the (task, seed) pairs where {a} is strictly better (a sign count, "
            "no test). shuffled = the found ranks permuted over the modules; shuffled_shape = permuted among "
            "modules of one weight shape (exactly the same adapter size); uniform = round(mean rank) everywhere. "
            f"If {a} does not beat the shuffled control, the search adds nothing over its rank multiset.",
        ]
    return lines


def pipeline_cost(table, methods: list[str], tasks: list[str]) -> list[str]:
    """AutoLoRA's search + retrain over lora_r8's wall time, per task, paired by seed."""
    lines = []
    if BASELINE not in table:
        return ["", f"Pipeline cost: n/a (no {BASELINE} rows in this setting)."]
    for a in (m for m in methods if _family(table, m) == "autolora"):
        parts, ratios, jobs = [], [], set()
        for t in tasks:
            seeds = sorted(set(table[a].get(t, {})) & set(table[BASELINE].get(t, {})))
            mine = [table[a][t][s] for s in seeds if "search_s" in table[a][t][s]]
            if not mine:
                continue
            per_seed = [(r["search_s"] + r["retrain_s"]) / table[BASELINE][t][r["seed"]]["wall_s"] for r in mine]
            jobs |= {int(r.get("concurrent_jobs") or 1) for r in mine}
            jobs |= {int(table[BASELINE][t][r["seed"]].get("concurrent_jobs") or 1) for r in mine}
            ratios += per_seed
            parts.append(f"{t} {statistics.fmean(per_seed):.2f}× (n{len(per_seed)})")
        if parts:
            lines += [
                "",
                f"**Pipeline cost** of {a} (search + retrain) / {BASELINE} wall time, same task and seed: "
                + ", ".join(parts)
                + f"; mean {statistics.fmean(ratios):.2f}× (goal ≤ 1.5×); "
                f"--jobs {'/'.join(map(str, sorted(jobs)))} concurrent run(s).",
            ]
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
    groups: dict[tuple[Any, Any, Any, Any], list[Row]] = defaultdict(list)
    for r in rows:
        groups[(r.get("targets", "qv"), r.get("epochs_arg"), r.get("limit"), r.get("max_grad_norm"))].append(r)
    lines = header(path, rows)
    for (targets, epochs, limit, clip), group in sorted(
        groups.items(), key=lambda kv: (kv[0][2] is not None, str(kv[0]))
    ):
        title = f"targets {targets}, "
        title += "default epochs (10; SST-2 1)" if epochs is None else f"--epochs {epochs}"
        title += ", full data" if limit is None else f", --limit {limit} (smoke test: metrics meaningless)"
        title += "" if clip is None else f", gradient norm clipped to {clip:g} (every method)"
        lines += ["", f"## {title}", *section(group)]
    return "\n".join(lines).rstrip() + "\n"


def table_cli(doc: str, bench: str, render_rows, argv: list[str] | None = None) -> None:
    """``python <table>.py ROWS.jsonl``: the markdown of ``render_rows(path, rows)`` on stdout."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", help=f"JSONL written by {bench}")
    args = ap.parse_args(argv)
    rows = read_rows(args.rows)
    if not rows:
        raise SystemExit(f"{args.rows} has no rows")
    sys.stdout.write(render_rows(args.rows, rows))


def main(argv: list[str] | None = None) -> None:
    table_cli(__doc__, "glue_bench.py", render, argv)


if __name__ == "__main__":
    main()
