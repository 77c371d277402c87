"""Plots where a picture beats a table: depth x length heatmaps, accuracy vs KV memory, Pareto fronts."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.colors import LinearSegmentedColormap

from tokensift.bench.report import samples_span

# The NIAH repository's heatmap colours: red (miss) through yellow to green (found).
NIAH_CMAP = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])


def _methods(rows: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["method"] not in seen:
            seen.append(r["method"])
    return seen


def depth_heatmaps(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """One figure per depth-swept accuracy task, a depth x length heatmap per method; with several such
    tasks, first a figure averaging them all (the NIAH picture of the NIAH repository's notebook)."""
    paths = []
    swept = [r for r in rows if r.get("depth") is not None and r["metric"] == "accuracy"]
    tasks = sorted({r["task"] for r in swept})
    groups = [(task, [r for r in swept if r["task"] == task]) for task in tasks]
    if len(tasks) > 1:
        groups.insert(0, ("all depth-swept tasks", swept))
    for task, sub in groups:
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
            ax.set_xticks(range(len(lengths)), [_len_label(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{round(100 * d)}%" for d in depths])
            ax.set_title(method, fontsize=9)
            ax.set_xlabel("prompt tokens")
        axes[0][0].set_ylabel("needle depth")
        fig.suptitle(f"{task}: accuracy by depth and length")
        fig.tight_layout()
        stem = "niah_all" if task == "all depth-swept tasks" else task.replace(":", "_").replace("=", "-")
        path = out / f"{stem}_heatmap.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def accuracy_vs_memory(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Accuracy against the share of dense KV bytes held: a panel per task, a point per method and length."""
    tasks = sorted({r["task"] for r in rows if r["metric"] == "accuracy"})
    if not tasks:
        return []
    cols = min(4, len(tasks))
    nrows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(tasks) :]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, tasks, strict=False):
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
                ax.annotate(_len_label(n), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("peak KV bytes held / dense", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        ax.set_title(task, fontsize=9)
    fig.suptitle("accuracy vs KV memory, per task")
    fig.tight_layout()
    path = out / "accuracy_vs_kv.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _len_label(n: int) -> str:
    if n == 0:
        return "-"
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower x (cost) and higher y (accuracy), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def method_points(rows: list[dict[str, Any]], cost: str) -> dict[int, dict[str, tuple[float, float]]]:
    """Per length, per method: (mean cost, macro-average accuracy over tasks) on the samples every method
    has. `cost` is "kv" (peak KV bytes over dense) or "latency" (prefill + decode seconds per sample)."""
    from tokensift.bench.report import common_samples

    # Length-free tasks (CharBench: prompts of ~80 tokens) say nothing about KV cost: left out.
    acc = common_samples([r for r in rows if r["metric"] == "accuracy" and r["length"] > 0])
    out: dict[int, dict[str, tuple[float, float]]] = {}
    for length in sorted({r["length"] for r in acc}):
        at = [r for r in acc if r["length"] == length]
        out[length] = {}
        for method in _methods(at):
            mine = [r for r in at if r["method"] == method]
            per_task = defaultdict(list)
            for r in mine:
                per_task[r["task"]].append(r["score"])
            y = mean(mean(v) for v in per_task.values())
            if cost == "kv":
                x = mean(r["kv_bytes_peak"] / r["kv_bytes_dense"] for r in mine)
            else:
                x = mean(r.get("prefill_seconds", 0.0) + r.get("decode_seconds", 0.0) for r in mine)
            out[length][method] = (x, y)
    return out


def pareto_plot(rows: list[dict[str, Any]], out: Path, cost: str) -> list[Path]:
    """Accuracy (mean over tasks) against KV memory or latency: a panel per length, the front drawn."""
    points = method_points(rows, cost)
    if not points:
        return []
    xlabel = "peak KV bytes held / dense" if cost == "kv" else "seconds per sample (prefill + decode)"
    fig, axes = plt.subplots(1, len(points), figsize=(4.6 * len(points), 3.8), squeeze=False)
    for ax, (length, by_method) in zip(axes[0], points.items(), strict=True):
        names = list(by_method)
        xy = [by_method[m] for m in names]
        for i, (name, (x, y)) in enumerate(zip(names, xy, strict=True)):
            ax.scatter([x], [y], s=40, color=f"C{i}", label=name, zorder=3)
        front = pareto_front(xy)
        ax.step(
            [xy[i][0] for i in front], [xy[i][1] for i in front], where="post", color="0.4", lw=1, zorder=2
        )
        ax.set_title(f"{_len_label(length)} tokens", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("accuracy (mean over tasks)", fontsize=8)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    title = "KV memory" if cost == "kv" else "latency"
    fig.suptitle(f"accuracy vs {title}: the line joins the Pareto-optimal methods")
    fig.tight_layout()
    path = out / f"pareto_{cost}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


MARKERS = "os^vD<>ph*Xd"


def leaderboard_plots(tables: list[dict[str, Any]], out: Path) -> list[Path]:
    """Accuracy (mean over tasks) against compression ratio, one figure per leaderboard table (protocol,
    and length where a protocol has several): a line per method family with its bootstrap 95% interval
    as error bars, dense as a horizontal line with its interval as a band."""
    paths = []
    per_protocol: dict[str, int] = defaultdict(int)
    for table in tables:
        per_protocol[table["protocol"]] += 1
    for table in tables:
        fig, ax = plt.subplots(figsize=(8.8, 5.0))
        ratios = [r for r in table["ratios"] if r > 0]
        step = 0.004 * (max(ratios) - min(ratios)) / 0.625  # spread the error bars of one ratio apart
        families = [f for f in table["families"] if f["family"] != "dense"]
        for i, fam in enumerate(families):
            xs = [r for r in ratios if r in fam["cells"]]
            cells = [fam["cells"][r] for r in xs]
            ys = [100 * c["score"] for c in cells]
            lo = [0.0 if c["ci"][0] != c["ci"][0] else 100 * (c["score"] - c["ci"][0]) for c in cells]
            hi = [0.0 if c["ci"][1] != c["ci"][1] else 100 * (c["ci"][1] - c["score"]) for c in cells]
            shift = (i - (len(families) - 1) / 2) * step
            ax.errorbar(
                [x + shift for x in xs],
                ys,
                yerr=[lo, hi],
                marker=MARKERS[i % len(MARKERS)],
                color=f"C{i % 10}",
                linestyle="-" if i < 10 else "--",
                capsize=2,
                markersize=5,
                lw=1.2,
                label=fam["family"],
            )
        dense = next((f for f in table["families"] if f["family"] == "dense"), None)
        if dense is not None:
            cell = dense["cells"][0.0]
            ax.axhline(100 * cell["score"], color="black", lw=1.5, label="dense (full cache)")
            if cell["ci"][0] == cell["ci"][0]:
                ax.axhspan(100 * cell["ci"][0], 100 * cell["ci"][1], color="0.5", alpha=0.15, lw=0)
        single = min(table["tasks"].values()) < 2
        ax.set_title(
            f"{table['protocol']}, {_len_label(table['length'])} tokens: mean over {len(table['tasks'])} "
            f"tasks, {samples_span(table)} samples per task (those every plan finished)\nerror bars and "
            "band: bootstrap 95% CI stratified by task"
            + (" (none while a task has 1 sample)" if single else ""),
            fontsize=9.5,
        )
        ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
        ax.set_xlabel(f"compression ratio ({table['removes']})")
        ax.set_ylabel("accuracy, mean over tasks (%)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        name = table["protocol"].replace(" ", "_")
        if per_protocol[table["protocol"]] > 1:
            name += f"_{_len_label(table['length'])}"
        path = out / f"leaderboard_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
