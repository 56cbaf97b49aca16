"""How `lsys eval --out` shows its results (lsys.context_eval): a progress bar while ranks evaluate, needle.json
and the needle.png heatmap, position_loss.json and position_loss.png (several runs overlaid), recall.json and
recall.png, and a rich summary table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lsys.memory.report import write_json


class GridProgress:
    """Rank 0's progress over the grid's cells: a bar on a terminal, else one line per cell."""

    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled
        self.console = Console(stderr=True, soft_wrap=True)
        self.done, self.total = 0, total
        self._progress: Progress | None = None
        if enabled and self.console.is_terminal:
            self._progress = Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.description}"), TimeElapsedColumn(), console=self.console)
            self._task = self._progress.add_task("", total=total)

    def __enter__(self) -> GridProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def tick(self, what: str) -> None:
        if not self.enabled:
            return
        self.done += 1
        if self._progress is not None:
            self._progress.update(self._task, advance=1, description=what)
        else:
            self.console.print(f"eval {self.done}/{self.total}: {what}", highlight=False)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_reports(runs: list[dict[str, Any]], out: Path) -> list[Path]:
    """Each run's results (`run_grid`'s, with "name") as JSON and pictures under `out`; -> the files written."""
    written = []
    needles = [r for r in runs if r["needle"] is not None]
    if needles:
        first = needles[0]["needle"]
        write_json(out / "needle.json", {"lengths": first["lengths"], "depths": first["depths"],
                                         "shape": first["shape"], "runs": [_entry(r, "needle") for r in needles]})
        plot_needles(needles, out / "needle.png")
        written += [out / "needle.json", out / "needle.png"]
    positions = [r for r in runs if r["position_loss"] is not None]
    if positions:
        write_json(out / "position_loss.json", {"runs": [_entry(r, "position_loss") for r in positions]})
        plot_position_loss(positions, out / "position_loss.png")
        written += [out / "position_loss.json", out / "position_loss.png"]
    recalls = [r for r in runs if r["recall"] is not None]
    if recalls:
        write_json(out / "recall.json", {"runs": [_entry(r, "recall") for r in recalls]})
        plot_recall(recalls, out / "recall.png")
        written += [out / "recall.json", out / "recall.png"]
    return written


def _entry(run: dict[str, Any], key: str) -> dict[str, Any]:
    # JSON has no NaN: an empty cell is null
    def clean(value: Any) -> Any:
        if isinstance(value, list):
            return [clean(v) for v in value]
        return None if isinstance(value, float) and math.isnan(value) else value

    return {"name": run["name"], "step": run["step"], "layout": run["layout"], "eval_wall_s": run["eval_wall_s"],
            **{k: clean(v) for k, v in run[key].items()}}


def plot_needles(runs: list[dict[str, Any]], path: Path) -> None:
    """One heatmap per run: rows are lengths (longest on top), columns depths, each cell's accuracy written in."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(1.2 + 4.2 * len(runs), 3.6), squeeze=False, sharey=True)
    axes[0][0].set_ylabel("context length (tokens)")
    for ax, run in zip(axes[0], runs, strict=True):
        grid = run["needle"]
        image = ax.imshow(grid["accuracy"], vmin=0.0, vmax=1.0, cmap="RdYlGn", origin="lower", aspect="auto")
        ax.set_xticks(range(len(grid["depths"])), [f"{d:.0%}" for d in grid["depths"]])
        ax.set_yticks(range(len(grid["lengths"])), [f"{n:,}" for n in grid["lengths"]])
        ax.set_xlabel("needle depth")
        for i, row in enumerate(grid["accuracy"]):
            for j, value in enumerate(row):
                ax.text(j, i, "-" if math.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8)
        if run["seq_len"] in grid["lengths"][:-1]:  # data.seq_len (for a run: the trained length), below the longest
            ax.axhline(grid["lengths"].index(run["seq_len"]) + 0.5, color="black", lw=1, ls="--")
        ax.set_title(f"{run['name']} (step {run['step']})", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="retrieval accuracy", shrink=0.9)
    _save(fig, path, plt)


def plot_position_loss(runs: list[dict[str, Any]], path: Path) -> None:
    """Loss (bits per byte where the task has bytes) at each position bucket's middle, every run on one axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    bits = all(not math.isnan(x) for r in runs for x in r["position_loss"]["bits_per_byte"])
    for run in runs:
        p = run["position_loss"]
        middles = [(a + b) / 2 for a, b in zip(p["edges"][:-1], p["edges"][1:], strict=True)]
        ax.plot(middles, p["bits_per_byte"] if bits else p["loss"], marker="o", ms=3,
                label=f"{run['name']} (step {run['step']}, {p['seq_len']:,} tokens)")
    ax.set_xlabel("position (tokens from the start of the sequence, or of its document)")
    ax.set_ylabel("bits per byte" if bits else "loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path, plt)


def plot_recall(runs: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for run in runs:
        ax.plot(run["recall"]["pairs"], run["recall"]["recall_accuracy"], marker="o", label=run["name"])
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("key-value pairs")
    ax.set_ylabel("recall accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path, plt)


def _save(fig: Any, path: Path, plt: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def summary_table(runs: list[dict[str, Any]]) -> Table:
    """One row per run: what its needle grid, position loss and recall say in a few numbers (columns that no run
    measured are left out)."""
    columns: dict[str, list[str]] = {"run": [], "step": [], "layout": [], "needle: mean": [],
                                     "needle: longest": [], "position loss: first -> last": [],
                                     "recall: most pairs": [], "eval time": []}
    for run in runs:
        needle, position, recall = run["needle"], run["position_loss"], run["recall"]
        cells = [c for row in needle["accuracy"] for c in row if not math.isnan(c)] if needle else []
        longest = [c for c in needle["accuracy"][-1] if not math.isnan(c)] if needle else []
        row = [run["name"], str(run["step"]), ", ".join(f"{k}={v}" for k, v in run["layout"].items()),
               f"{sum(cells) / len(cells):.3f}" if cells else "-",
               f"{sum(longest) / len(longest):.3f} @ {needle['lengths'][-1]:,}" if longest else "-",
               f"{position['loss'][0]:.3f} -> {position['loss'][-1]:.3f}" if position else "-",
               f"{recall['recall_accuracy'][-1]:.3f} @ {recall['pairs'][-1]}" if recall else "-",
               f"{run['eval_wall_s']:.1f} s"]
        for values, value in zip(columns.values(), row, strict=True):
            values.append(value)
    table = Table(title="did the context help?", title_justify="left")
    shown = {name: values for name, values in columns.items() if any(v != "-" for v in values)}
    for name in shown:
        table.add_column(name, justify="left" if name == "run" else "right")
    for i in range(len(runs)):
        table.add_row(*(values[i] for values in shown.values()))
    return table
