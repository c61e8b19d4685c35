"""Run outputs a user reads: metrics (JSON lines + tensorboard), gates.csv and the gate heatmap."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import torch

from ..backbones import parse_site
from ..method.space import SearchSpace
from ..util import atomic_path, atomic_write_text, strict_json


class MetricsLog:
    """Rank-0 writer of ``metrics.jsonl`` and tensorboard events under ``tb/``; no-op on other ranks.

    ``resumed_at``: the step of the checkpoint a resumed run continues from. The rows an interrupted
    launch wrote after it are dropped (the resumed launch writes those steps again), so a curve read
    from the file has one row per step and phase, as an uninterrupted run's has."""

    def __init__(self, out_dir: Path, enabled: bool, resumed_at: int | None = None):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            if resumed_at is not None and self.path.exists():
                kept = [line for line in self.path.read_text().splitlines() if _row_at_or_before(line, resumed_at)]
                atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))
            purge = None if resumed_at is None else resumed_at + 1
            self._tb = SummaryWriter(str(out_dir / "tb"), purge_step=purge)

    def log(self, step: int, phase: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        # strict JSON (jq, JSON.parse, pandas): a non-finite number (the -inf "best" before the first
        # selectable step) is null, not the -Infinity that only Python reads
        values = strict_json(values)
        with self.path.open("a") as f:
            row = {"step": step, "phase": phase, "time": round(time.time(), 3), **values}
            f.write(json.dumps(row) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self._tb.add_scalar(f"{phase}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _row_at_or_before(line: str, last: int) -> bool:
    """Is ``line`` a complete row of a step <= ``last``? (A launch killed mid-write leaves a torn line.)"""
    try:
        return json.loads(line)["step"] <= last
    except (ValueError, KeyError, TypeError):
        return False


def gates_csv(path: Path, space: SearchSpace, logits: torch.Tensor, p: torch.Tensor, chosen: set[int]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["index", "site", "type", "params", "alpha", "p", "chosen"])
    for c in space.candidates:
        w.writerow(
            [
                c.index,
                c.site,
                c.type,
                c.params,
                f"{float(logits[c.index]):.6g}",
                f"{float(p[c.index]):.6g}",
                int(c.index in chosen),
            ]
        )
    atomic_write_text(path, buf.getvalue())


def heatmap(path: Path, space: SearchSpace, p: torch.Tensor, title: str = "") -> None:
    """Gate probabilities p as a (delta type @ component) × layer image, stacks side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns: list[tuple[str, int | None]] = []
    for stack, depth in space.site_map.depths.items():
        columns += [(stack, i) for i in range(depth)] + [(stack, None)]
    rows: list[str] = []
    cells: dict[tuple[str, tuple[str, int | None]], float] = {}
    for c in space.candidates:
        stack, layer, component = parse_site(c.site)
        row = f"{c.type} @ {component}"
        if row not in rows:
            rows.append(row)
        cells[(row, (stack, layer))] = float(p[c.index])
    grid = torch.full((len(rows), len(columns)), float("nan"))
    for (row, col), value in cells.items():
        grid[rows.index(row), columns.index(col)] = value
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(columns) + 3), max(3, 0.25 * len(rows) + 1.5)))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-6, float(p.max())))
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    labels = [f"{s[0].upper()}{'f' if i is None else i}" for s, i in columns]
    ax.set_xticks(range(len(columns)), labels, fontsize=6, rotation=90)
    ax.set_xlabel("layer (E = encoder, D = decoder; f = per-stack module)")
    ax.set_title(title or "gate probability p per candidate")
    fig.colorbar(im, ax=ax, label="p")
    fig.tight_layout()
    with atomic_path(path, suffix=".tmp.png") as tmp:  # matplotlib reads the format from the name
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def budget_sweep_plot(path: Path, rows: list[tuple[float, dict]]) -> None:
    """Parameters per delta type of the structure at each budget (stacked bars, log-spaced budgets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = sorted({t for _, s in rows for t in s["by_type"]})
    labels = [f"{b:g}" for b, _ in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(rows) + 2), 4))
    bottom = [0.0] * len(rows)
    for t in types:
        values = [s["by_type"].get(t, {}).get("params", 0) for _, s in rows]
        ax.bar(labels, values, bottom=bottom, label=t)
        bottom = [a + b for a, b in zip(bottom, values, strict=True)]
    ax.set_xlabel("budget (fraction of backbone parameters)")
    ax.set_ylabel("parameters used")
    ax.legend(fontsize=8)
    ax.set_title("structure at each budget (from the stored gate probabilities)")
    fig.tight_layout()
    with atomic_path(path, suffix=".tmp.png") as tmp:  # matplotlib reads the format from the name
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
