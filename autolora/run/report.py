"""``autolora report RUN_DIR``: the rank picture as markdown and PNGs, without TensorBoard.

Reads what every run writes: ``metrics.jsonl`` (scalars and gate histograms, from the JSONL
logger) and, when the run was pruned or exported, ``ranks.json``. Writes into the run folder:
``report.md``, ``rank_heatmap.png``, ``gate_distribution.png``, ``gate_heatmap.png`` and
``rank_over_time.png``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from autolora.errors import DataError
from autolora.gates import default_threshold
from autolora.logging import figures
from autolora.logging.jsonl import METRICS_FILE

FIGURES = {
    "rank_heatmap.png": "Rank per layer and module type",
    "gate_distribution.png": "Distribution of the final gate values",
    "gate_heatmap.png": "Final gate values per module",
    "rank_over_time.png": "Ranks during the search",
    "rank_confidence.png": "Confidence of each rank",
}


def _find(run_dir: Path, name: str) -> Path | None:
    direct = run_dir / name
    if direct.is_file():
        return direct
    found = sorted(run_dir.rglob(name), key=lambda p: (len(p.parts), str(p)))
    return found[0] if found else None


def read_run(run_dir: str | os.PathLike) -> dict:
    """History, final ranks, gates, parameters and config of a run folder.

    Raises:
        DataError: if the folder has no ``metrics.jsonl`` (no run logged there).
    """
    run_dir = Path(run_dir)
    metrics_path = _find(run_dir, METRICS_FILE) if run_dir.is_dir() else None
    if metrics_path is None:
        raise DataError(
            f"{str(run_dir)!r} holds no {METRICS_FILE}: give the run folder of `autolora train`, or the log_dir "
            "of a trainer that logged with loggers=('jsonl', ...) (the default)."
        )
    history: dict[str, list[tuple[int, float]]] = {}
    gates: dict[str, list[float]] = {}
    config: dict = {}
    last: dict[str, float] = {}
    lines = metrics_path.read_text().splitlines()
    for line_no, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if line_no == len(lines):
                break  # a run killed mid-write leaves a partial last line
            raise DataError(f"{metrics_path}:{line_no} is not valid JSON.") from None
        kind = record.get("kind")
        if kind == "config":
            config = record["config"]
        elif kind == "histogram" and record["name"].startswith("gates/"):
            gates[record["name"][len("gates/") :]] = record["values"]
        elif kind is None:
            step = int(record["step"])
            for key, value in record.items():
                if key.startswith("rank/"):
                    history.setdefault(key[len("rank/") :], []).append((step, value))
            last.update({k: v for k, v in record.items() if k != "step"})
    ranks = {name: int(points[-1][1]) for name, points in history.items()}
    parameters = {"adapter": int(last.get("summary/adapter_params", 0))}
    ranks_path = _find(run_dir, "ranks.json")
    confidence, warning = {}, None
    if ranks_path is not None:
        try:
            record = json.loads(ranks_path.read_text())
            ranks, gates = record["ranks"], record.get("gates", gates)
            confidence, warning = record.get("confidence") or {}, record.get("warning")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(
                f"{ranks_path} is corrupt or truncated ({type(e).__name__}: {e}); re-export the adapter "
                "(trainer.export or `autolora export RUN_DIR`), or delete the file to report from metrics.jsonl."
            ) from None
        parameters = record.get("parameters", parameters)
    if not ranks:
        raise DataError(f"{metrics_path} has no rank/<module> scalars; was the search run with log_dir set?")
    return {
        "history": history,
        "ranks": ranks,
        "gates": gates,
        "parameters": parameters,
        "config": config,
        "max_rank": int(config.get("max_rank", max(ranks.values()))),
        "gate": config.get("gate", "softmax"),
        "last": last,
        "confidence": confidence,
        "warning": warning,
    }


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write ``report.md`` and the PNGs into ``run_dir``; returns the report's path."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    ranks, gates, max_rank = run["ranks"], run["gates"], run["max_rank"]
    kept = {n: r for n, r in ranks.items()}
    drawn = {"rank_heatmap.png": figures.rank_heatmap(kept, max_rank, "final rank per layer")}
    if gates:
        thresholds = {n: default_threshold(run["gate"], len(g)) for n, g in gates.items()}
        drawn["gate_distribution.png"] = figures.gate_histogram(gates, thresholds)
        drawn["gate_heatmap.png"] = figures.gate_heatmap(gates, "final gate values")
    if run["history"]:
        drawn["rank_over_time.png"] = figures.rank_curves(run["history"])
    confidence = {n: c for n, c in run["confidence"].items() if n in ranks}
    if confidence:
        drawn["rank_confidence.png"] = figures.rank_heatmap(
            confidence, 1.0, "confidence of each rank", label="confidence", fmt="{:.2f}"
        )
    for name, fig in drawn.items():
        fig.savefig(run_dir / name)
    total = sum(ranks.values())
    params = run["parameters"]
    lines = [
        f"# AutoLoRA rank report: {run_dir.name}",
        "",
        f"- adapted modules: {len(ranks)} (removed at rank 0: {sum(1 for r in ranks.values() if r == 0)})",
        f"- kept components: {total} of {max_rank * len(ranks)} (max_rank {max_rank}); mean rank "
        f"{total / max(len(ranks), 1):.2f}",
        f"- adapter parameters: {params.get('adapter', 0):,}"
        + (
            f" (a uniform LoRA at rank {params['uniform_rank']} would have {params['uniform']:,})"
            if "uniform" in params
            else ""
        ),
    ]
    if "loss/val" in run["last"]:
        lines.append(f"- last validation loss: {run['last']['loss/val']:.4f}")
    scores = _score_lines(run_dir)
    if not scores and "dev/loss" in run["last"]:  # a causal-LM run without its metrics.json: the logged loss
        lines.append(f"- dev loss: {run['last']['dev/loss']:.4f} (perplexity {run['last']['dev/perplexity']:.2f})")
    lines += scores
    if run["warning"]:
        lines += ["", f"**Warning:** {run['warning']}"]
    lines += ["", "## Ranks (layer x module type)", "", figures.rank_table(ranks), ""]
    if confidence:
        mean = sum(confidence.values()) / len(confidence)
        lines += [
            "## How sure each rank is",
            "",
            f"The fraction of the plans over the last quarter of the search that gave each module its final rank "
            f"(mean {mean:.2f}); low values mean the rank moved while the search ended.",
            "",
            figures.rank_table(confidence, "{:.2f}"),
            "",
        ]
    for name, caption in FIGURES.items():
        if name in drawn:
            lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _score_lines(run_dir: Path) -> list[str]:
    """The dev score next to its baseline, and the run's warnings, from ``metrics.json``."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        base = metrics["baseline"]
        if metrics["metric"] == "dev_loss":  # causal LM: NLL per completion token on the dev file
            score = f"- dev loss: {metrics['dev']:.4f} (perplexity {metrics['perplexity']:.2f}; "
        else:
            score = f"- dev {metrics['metric']}: {metrics['dev']:.4f} ("
        lines = [score + f"{base['name']}: {base['dev']:.4f})"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return lines + [f"- **warning:** {w}" for w in metrics.get("warnings", [])]
