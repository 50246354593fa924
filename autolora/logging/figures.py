"""The rank figures: the layer x module-type grid, and the heatmaps, histograms and tables on it.

Adapted modules are placed on a grid like the AdaLoRA paper's rank figure: one row per layer
index (the last integer in the dotted name) and one column per module type (the part of the name
after that index, shortened to its last component when that is unambiguous). The same grid
feeds TensorBoard images during the search and the PNGs of ``autolora report``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Grid:
    """Rows (layer labels), columns (module types) and each module's cell."""

    rows: tuple[str, ...]
    cols: tuple[str, ...]
    cells: dict[str, tuple[int, int]]

    def fill(self, values: Mapping[str, float]) -> np.ndarray:
        """A rows x cols matrix of ``values`` by module; NaN where no module sits."""
        out = np.full((len(self.rows), len(self.cols)), np.nan)
        for name, value in values.items():
            if name in self.cells:
                out[self.cells[name]] = value
        return out


def _split(name: str) -> tuple[str, str]:
    """(layer label, module type path) of a dotted module name."""
    matches = list(_INDEX.finditer(name))
    if not matches:
        return "-", name
    last = matches[-1]
    return last.group(1), name[last.end() :] or name


def layer_grid(names: Sequence[str]) -> Grid:
    """Place modules on a layer x type grid (rows in numeric order, columns in first-seen order)."""
    split = {n: _split(n) for n in names}
    paths = list(dict.fromkeys(p for _, p in split.values()))
    short = {p: p.rsplit(".", 1)[-1] for p in paths}
    if len(set(short.values())) < len(paths):  # e.g. attention.output.dense and output.dense
        short = {p: p for p in paths}
    rows = sorted({r for r, _ in split.values()}, key=lambda r: (not r.isdigit(), int(r) if r.isdigit() else 0, r))
    cols = [short[p] for p in paths]
    cells = {n: (rows.index(r), cols.index(short[p])) for n, (r, p) in split.items()}
    return Grid(tuple(rows), tuple(cols), cells)


def rank_table(ranks: Mapping[str, float], fmt: str = "{:.0f}") -> str:
    """The rank plan (or any per-module value, formatted with ``fmt``) as a markdown table,
    layers x module types (``-`` where nothing is adapted)."""
    grid = layer_grid(list(ranks))
    matrix = grid.fill(ranks)
    lines = ["| layer | " + " | ".join(grid.cols) + " |", "|---" * (len(grid.cols) + 1) + "|"]
    for label, row in zip(grid.rows, matrix):
        lines.append(f"| {label} | " + " | ".join("-" if np.isnan(v) else fmt.format(v) for v in row) + " |")
    return "\n".join(lines)


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def rank_heatmap(
    ranks: Mapping[str, float], max_rank: float, title: str = "rank per layer", label: str = "rank", fmt: str = "{:.0f}"
):
    """A matplotlib Figure: ranks (or another per-module value in [0, max_rank]) on the layer x
    type grid, annotated with their values."""
    grid = layer_grid(list(ranks))
    matrix = grid.fill(ranks)
    fig = _figure(1.6 + 1.1 * len(grid.cols), 1.2 + 0.42 * len(grid.rows))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0, vmax=max_rank, aspect="auto")
    ax.set_xticks(range(len(grid.cols)), grid.cols, rotation=30, ha="right")
    ax.set_yticks(range(len(grid.rows)), grid.rows)
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    ax.set_title(title)
    for (i, j), v in np.ndenumerate(matrix):
        if not np.isnan(v):
            ax.text(j, i, fmt.format(v), ha="center", va="center", color="w" if v < 0.6 * max_rank else "k")
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    return fig


def gate_heatmap(gates: Mapping[str, Sequence[float]], title: str = "gate values"):
    """A matplotlib Figure: one row per module, its gates sorted high to low."""
    names = list(gates)
    width = max((len(g) for g in gates.values()), default=1)
    matrix = np.full((len(names), width), np.nan)
    for i, n in enumerate(names):
        matrix[i, : len(gates[n])] = sorted(gates[n], reverse=True)
    fig = _figure(2.5 + 0.18 * width, 1.2 + 0.22 * len(names))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap="magma", aspect="auto", vmin=0)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("component (sorted by gate)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="gate")
    fig.tight_layout()
    return fig


def gate_histogram(gates: Mapping[str, Sequence[float]], thresholds: Mapping[str, float] | None = None):
    """A matplotlib Figure: the distribution of all final gate values, with the threshold(s)."""
    values = np.concatenate([np.asarray(g, dtype=float) for g in gates.values()]) if gates else np.zeros(0)
    fig = _figure(6, 3.5)
    ax = fig.add_subplot()
    ax.hist(values, bins=40, color="tab:blue")
    for t in sorted(set((thresholds or {}).values())):
        ax.axvline(t, color="tab:red", linestyle="--", label=f"threshold {t:.3g}")
    if thresholds:
        ax.legend()
    ax.set_xlabel("gate value")
    ax.set_ylabel("components")
    ax.set_title(f"gate distribution ({len(values)} components)")
    fig.tight_layout()
    return fig


def rank_curves(history: Mapping[str, Sequence[tuple[int, float]]]):
    """A matplotlib Figure: each module's rank over the steps, one panel per module type."""
    names = list(history)
    grid = layer_grid(names)
    fig = _figure(4.2 * len(grid.cols), 3.4)
    axes = fig.subplots(1, len(grid.cols), squeeze=False)[0]
    for j, col in enumerate(grid.cols):
        ax = axes[j]
        for n in names:
            if grid.cells[n][1] == j:
                steps, values = zip(*history[n]) if history[n] else ((), ())
                ax.plot(steps, values, label=f"layer {grid.rows[grid.cells[n][0]]}", drawstyle="steps-post")
        ax.set_title(col)
        ax.set_xlabel("step")
        ax.set_ylabel("rank")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def figure_to_array(fig) -> np.ndarray:
    """Render a Figure to an (H, W, 3) uint8 array (for TensorBoard images)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
