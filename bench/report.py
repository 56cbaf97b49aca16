"""The tables bench/context_attention.py prints from its results dict, and how every benchmark writes its JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

MIB = 2**20


def _methods_table(results: dict) -> Table:
    shape = results["shape"]
    table = Table(title=f"causal fp32 attention fwd+bwd, B={shape['batch']} S={shape['seq_len']} H={shape['heads']} "
                        f"D={shape['head_dim']}, {shape['ranks']} gloo ranks, {results['repeats']} repeats")
    for column in ("method", "time s", "min-max s", "peak MiB/rank", "saved MiB/rank", "max abs err", "status"):
        table.add_column(column, justify="left" if column in ("method", "status") else "right")
    for name, row in results["methods"].items():
        if "time_s" not in row:
            table.add_row(name, "-", "-", "-", "-", "-", f"{row['status']}: {row['reason']}")
            continue
        steps = row["step_times_s"]
        table.add_row(
            name,
            f"{row['time_s']:.2f}",
            f"{min(steps):.2f}-{max(steps):.2f}",
            f"{row['peak_bytes'] / MIB:.0f}",
            f"{row['saved_bytes'] / MIB:.1f}",
            f"{row['max_abs_error']:.1e}",
            row["status"] + (" (see note)" if "known_issue" in row else ""),
        )
    return table


def _ratios_table(results: dict) -> Table:
    pairs = results["ours_vs_peers"]
    peers = list(dict.fromkeys(p["peer"] for p in pairs))
    table = Table(title="ours / peer: time (min-max over repeats), peak memory per rank; below 1 ours wins")
    table.add_column("ours", justify="left")
    for peer in peers:
        table.add_column(f"{peer} time", justify="right")
        table.add_column("peak", justify="right")
    table.add_column("faster than all", justify="left")
    for name, faster in results["faster_than_every_peer"].items():
        cells = [name]
        for peer in peers:
            pair = next(p for p in pairs if p["ours"] == name and p["peer"] == peer)
            cells.append(f"{pair['time_ratio']:.3f} ({pair['time_ratio_min']:.2f}-{pair['time_ratio_max']:.2f})")
            cells.append(f"{pair['peak_ratio']:.2f}")
        cells.append("yes" if faster else "no")
        table.add_row(*cells)
    return table


def _activations_table(results: dict) -> Table:
    activations = results["activations"]
    table = Table(title=f"per-rank bytes at S={activations['seq_len']}: saved for backward (goal: ring <= 1.1/P of "
                        "1 rank), and peak of fwd+bwd")
    for column in ("ranks", "1.1/P", "ring saved MiB", "ratio", "ulysses saved MiB", "ratio", "ring peak MiB",
                   "ratio", "ulysses peak MiB", "ratio"):
        table.add_column(column, justify="right")
    for row in activations["rows"]:
        cells = [str(row["ranks"]), f"{row['goal_ratio']:.3f}"]
        for key in ("ring", "ulysses", "ring_peak", "ulysses_peak"):
            ratio = row[f"{key}_ratio"]
            cells += [f"{row[f'{key}_bytes'] / MIB:.2f}", "-" if ratio is None else f"{ratio:.3f}"]
        table.add_row(*cells)
    return table


def print_tables(results: dict) -> None:
    # Off a terminal rich would fold the tables to 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(_methods_table(results))
    for name, row in results["methods"].items():
        if "known_issue" in row:
            # The diagnosis quotes code with brackets, which rich would read as markup.
            console.print(f"note, {name}: {row['known_issue']}", markup=False)
    if results["ours_vs_peers"]:
        console.print(_ratios_table(results))
    console.print(_activations_table(results))


def write_results(results: dict, output: Path | None) -> None:
    """Write the results JSON (no file when `output` is None) and say where."""
    if output is None:
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {output}", file=sys.stderr)
