"""How well `lsys plan` predicts what `lsys profile` measures, and how long planning a large cluster takes.

Side by side in one run, through the command line as a user runs it:
  - for several layouts that fit this machine (2 and 4 CPU ranks: ring + int8, tensor parallel + selective
    recomputation, FSDP2 x ring, Ulysses x tensor parallel + full recomputation, and the demo), the per-rank peak
    `lsys profile` measures over real steps against the peak `lsys plan` traces with fake tensors;
  - `lsys plan configs/gpu_8b_1m.yaml` (8B parameters, 1M tokens, 64 ranks): wall time, traced and analytic peak;
  - the same with `--budget-gib 80`: wall time of the search and the longest sequence it finds.

    python bench/memory_plan.py [--output bench/results/memory_plan.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.commands import lsys  # noqa: E402
from bench.report import write_results  # noqa: E402

GIB, MIB = 1024**3, 1024**2
SMALL = ["train.device=cpu", "train.global_batch_size=4", "data.seq_len=1024", "parallel.dp=-1", "parallel.cp_ring=1"]
LAYOUTS = {
    "ring2 zigzag, int8": (2, ["parallel.cp_ring=2", "quant.activations=int8"]),
    "tp2, selective, bf16": (2, ["parallel.tp=2", "recompute.mode=selective", "train.compute_dtype=bfloat16"]),
    "dp2 x ring2 (FSDP2)": (4, ["parallel.cp_ring=2"]),
    "ulysses2 x tp2, full": (4, ["parallel.cp_ulysses=2", "parallel.tp=2", "recompute.mode=full"]),
    "ring4 zigzag, selective": (4, ["parallel.cp_ring=4", "recompute.mode=selective"]),
}
BIG = "configs/gpu_8b_1m.yaml"


def _timed(home: Path, *args: str) -> float:
    started = time.perf_counter()
    lsys(home, *args)
    return time.perf_counter() - started


def compare_layouts(work: Path) -> list[dict]:
    rows = []
    for name, (ranks, overrides) in LAYOUTS.items():
        args = ["configs/demo.yaml", *SMALL, *overrides]
        profile_s = _timed(work, "profile", *args, "--nproc", str(ranks), "--out", str(work / "profile"))
        plan_s = _timed(work, "plan", *args, "--world-size", str(ranks), "--out", str(work / "plan"))
        measured = json.loads((work / "profile" / "memory.json").read_text())["ranks"]
        planned = json.loads((work / "plan" / "plan.json").read_text())["traced"]["peak_bytes"]
        worst = max(abs(planned - r["peak_bytes"]) / r["peak_bytes"] for r in measured)
        rows.append({"layout": name, "ranks": ranks, "measured_peak_bytes": [r["peak_bytes"] for r in measured],
                     "planned_peak_bytes": planned, "worst_relative_error": worst, "profile_s": profile_s,
                     "plan_s": plan_s})
    return rows


def plan_big(work: Path) -> dict:
    plan_s = _timed(work, "plan", BIG, "--out", str(work / "big"))
    plan = json.loads((work / "big" / "plan.json").read_text())
    search_s = _timed(work, "plan", BIG, "--budget-gib", "80", "--out", str(work / "search"))
    best = json.loads((work / "search" / "plan.json").read_text())["candidates"][0]
    return {"config": BIG, "world_size": plan["world_size"], "seq_len": plan["config"]["data"]["seq_len"],
            "plan_s": plan_s, "traced": {k: plan["traced"][k] for k in (
                "peak_bytes", "params", "gathered_params", "grads", "optimizer", "activations", "temporaries")},
            "analytic": plan["analytic"], "search_budget_gib": 80, "search_s": search_s, "search_best": best}


def _tables(results: dict) -> list[Table]:
    layouts = Table(title="lsys plan (fake trace of one rank) vs lsys profile (every real rank), per-rank peak")
    for column in ("layout", "ranks", "measured MiB", "planned MiB", "worst error", "profile s", "plan s"):
        layouts.add_column(column, justify="left" if column == "layout" else "right")
    for row in results["layouts"]:
        measured = row["measured_peak_bytes"]
        layouts.add_row(row["layout"], str(row["ranks"]), f"{min(measured) / MIB:.2f}-{max(measured) / MIB:.2f}",
                        f"{row['planned_peak_bytes'] / MIB:.2f}", f"{row['worst_relative_error']:.2%}",
                        f"{row['profile_s']:.1f}", f"{row['plan_s']:.1f}")
    big = results["big"]
    large = Table(title=f"{big['config']}: {big['world_size']} ranks, {big['seq_len']:,} tokens")
    for column in ("what", "value"):
        large.add_column(column, justify="left" if column == "what" else "right")
    large.add_row("lsys plan wall time", f"{big['plan_s']:.1f} s")
    large.add_row("traced peak per rank", f"{big['traced']['peak_bytes'] / GIB:.1f} GiB")
    large.add_row("analytic total per rank", f"{big['analytic']['total'] / GIB:.1f} GiB")
    large.add_row("lsys plan --budget-gib 80 wall time", f"{big['search_s']:.1f} s")
    best = big["search_best"]
    large.add_row("longest sequence in 80 GiB", f"{best['traced_seq_len']:,} (ring {best['cp_ring']} x ulysses "
                                                f"{best['cp_ulysses']} x tp {best['tp']}, {best['recompute']})")
    return [layouts, large]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "memory_plan.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lsys-memory-bench-") as tmp:
        work = Path(tmp)
        results = {"layouts": compare_layouts(work), "big": plan_big(work), "machine": "2-core CPU, no GPU"}
    console = Console(width=140)
    for table in _tables(results):
        console.print(table)
    write_results(results, args.output)


if __name__ == "__main__":
    main()
