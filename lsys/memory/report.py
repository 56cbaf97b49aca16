"""How memory results are shown: rich tables for the terminal, memory.json, and memory.png (per-rank stacked
bars next to the timeline of one rank over the traced steps)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from lsys.memory.tracker import CATEGORIES
from lsys.metrics import format_bytes

COLORS = {"params": "#4c72b0", "gathered_params": "#8fb0de", "grads": "#dd8452", "optimizer": "#c44e52",
          "activations": "#55a868", "temporaries": "#b0b0b0"}
LABELS = {"params": "params", "gathered_params": "gathered params", "grads": "grads", "optimizer": "optimizer",
          "activations": "activations", "temporaries": "temporaries"}


def rank_table(ranks: list[dict[str, Any]], title: str) -> Table:
    """One row per rank: the device peak, its breakdown, the host memory of offloaded activations when there are
    any, and the allocator's own peak when measured."""
    table = Table(title=title, title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("peak", justify="right", style="bold")
    for category in CATEGORIES:
        table.add_column(LABELS[category], justify="right")
    offloaded = any(r.get("host_peak_bytes") for r in ranks)
    if offloaded:
        table.add_column("host (offloaded) peak", justify="right")
    measured = any("allocator_peak_bytes" in r for r in ranks)
    if measured:
        table.add_column("allocator peak", justify="right")
    for r in ranks:
        row = [str(r["rank"]), format_bytes(r["peak_bytes"]), *(format_bytes(r[c]) for c in CATEGORIES)]
        if offloaded:
            row.append(format_bytes(r["host_peak_bytes"]))
        if measured:
            row.append(format_bytes(r["allocator_peak_bytes"]))
        table.add_row(*row)
    return table


def layer_table(rank: dict[str, Any], limit: int = 12) -> Table:
    """Stored activations by layer at the peak (the largest `limit` layers)."""
    table = Table(title=f"activations by layer at the peak (rank {rank['rank']}, step {rank['peak_at']['step']}, "
                        f"{rank['peak_at']['phase']})", title_justify="left")
    table.add_column("layer")
    table.add_column("bytes", justify="right")
    layers = sorted(rank["activations_by_layer"].items(), key=lambda kv: -kv[1])
    for layer, size in layers[:limit]:
        table.add_row(layer, format_bytes(size))
    if len(layers) > limit:
        table.add_row(f"... {len(layers) - limit} more", format_bytes(sum(s for _, s in layers[limit:])))
    return table


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=1))
    tmp.replace(path)


def plot(ranks: list[dict[str, Any]], path: Path, title: str, timeline_rank: int = 0) -> None:
    """Left: every rank's peak as stacked categories. Right: one rank's categories over the tracked steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gib = 1024**3 if max(r["peak_bytes"] for r in ranks) >= 1024**3 else 1024**2
    unit = "GiB" if gib == 1024**3 else "MiB"
    fig, (bars, line) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 2.2]})
    labels = [str(r["rank"]) for r in ranks]
    bottom = [0.0] * len(ranks)
    for category in CATEGORIES:
        heights = [r[category] / gib for r in ranks]
        bars.bar(labels, heights, bottom=bottom, color=COLORS[category], label=LABELS[category])
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    bars.set_xlabel("rank")
    bars.set_ylabel(f"{unit} at the rank's peak")
    bars.set_title("per rank, at the peak")

    shown = ranks[timeline_rank]
    timeline = shown["timeline"]
    clock = timeline["clock"]
    line.stackplot(clock, *[[v / gib for v in timeline[c]] for c in CATEGORIES], colors=[COLORS[c] for c in CATEGORIES])
    for span in shown["phases"]:
        if span["phase"] == "backward":
            line.axvspan(span["start"], span["end"], color="#000000", alpha=0.05, lw=0)
    line.axhline(shown["peak_bytes"] / gib, color="black", lw=0.8, ls="--")
    line.set_xlabel("allocation events (shaded: backward)")
    line.set_ylabel(f"{unit} held")
    line.set_title(f"rank {shown['rank']} over the tracked steps")
    line.set_xlim(clock[0], clock[-1])
    fig.legend(loc="lower center", ncol=len(CATEGORIES), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
