"""Plots where a picture beats a table: depth x length heatmaps and accuracy vs KV memory."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.colors import LinearSegmentedColormap

# The NIAH repository's heatmap colours: red (miss) through yellow to green (found).
NIAH_CMAP = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])


def _methods(rows: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def depth_heatmaps(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """One figure per depth-swept accuracy task: a depth x length heatmap per method."""
    paths = []
    tasks = sorted({r["task"] for r in rows if r.get("depth") is not None and r["metric"] == "accuracy"})
    for task in tasks:
        sub = [r for r in rows if r["task"] == task]
        methods = _methods(sub)
        depths = sorted({r["depth"] for r in sub})
        lengths = sorted({r["length"] for r in sub})
        fig, axes = plt.subplots(
            1,
            len(methods),
            figsize=(2.2 + 1.1 * len(lengths) * len(methods), 0.5 * len(depths) + 2.2),
            squeeze=False,
        )
        for ax, method in zip(axes[0], methods, strict=True):
            cells: dict[tuple[float, int], list[float]] = defaultdict(list)
            for r in sub:
                if r["method"] == method:
                    cells[(r["depth"], r["length"])].append(r["score"])
            grid = [[mean(cells[(d, n)]) if cells[(d, n)] else float("nan") for n in lengths] for d in depths]
            ax.imshow(grid, cmap=NIAH_CMAP, vmin=0, vmax=1, aspect="auto")
            for i, line in enumerate(grid):
                for j, value in enumerate(line):
                    ax.text(
                        j, i, "-" if value != value else f"{value:.2f}", ha="center", va="center", fontsize=8
                    )
            ax.set_xticks(
                range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths]
            )
            ax.set_yticks(range(len(depths)), [f"{round(100 * d)}%" for d in depths])
            ax.set_title(method, fontsize=9)
            ax.set_xlabel("prompt tokens")
        axes[0][0].set_ylabel("needle depth")
        fig.suptitle(f"{task}: accuracy by depth and length")
        fig.tight_layout()
        path = out / f"{task}_heatmap.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def accuracy_vs_memory(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Accuracy against the share of dense KV bytes held: a panel per task, a point per method and length."""
    tasks = sorted({r["task"] for r in rows if r["metric"] == "accuracy"})
    if not tasks:
        return []
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        sub = [r for r in rows if r["task"] == task]
        for method in _methods(sub):
            by_len: dict[int, list[dict[str, Any]]] = defaultdict(list)
            for r in sub:
                if r["method"] == method:
                    by_len[r["length"]].append(r)
            lengths = sorted(by_len)
            xs = [mean(r["kv_bytes_peak"] / r["kv_bytes_dense"] for r in by_len[n]) for n in lengths]
            ys = [mean(r["score"] for r in by_len[n]) for n in lengths]
            ax.plot(xs, ys, "o-", label=method)
            for x, y, n in zip(xs, ys, lengths, strict=True):
                label = f"{n // 1024}k" if n % 1024 == 0 else str(n)
                ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("peak KV bytes held / dense KV bytes")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{task}: accuracy vs KV memory")
    fig.tight_layout()
    path = out / "accuracy_vs_kv.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
