"""Activation offload (recompute.offload=cpu) on the demo model: device and host bytes per rank, and step time.

    python bench/activation_offload.py [--repeats 8] [--seq-len 2048]

2 gloo ranks with ring attention over both (configs/demo.yaml, parallel.cp_ring=2, full length from the start).
For each recomputation mode (full, selective, full with int8 stored activations) the trainer is built with and
without offload, and on every rank:
1. Memory: one step under the memory tracker (lsys.memory.tracker, what `lsys profile` uses): the device's stored
   activations (what the forward left alive), device peak, and host peak (the offloaded copies).
2. Time: steps at full length, the six variants taking turns for `--repeats` rounds so a shared machine's noise
   falls on all of them; the median of each round's ratio, offloaded over not.
On CPU the host is the same memory, so the time is what the copies cost without the overlap a GPU's copy stream
gives; the bytes are what a GPU run would hold where.

Prints a table and writes bench/results/activation_offload.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import write_results  # noqa: E402

MODES = {"full": ["recompute.mode=full"], "selective": ["recompute.mode=selective"],
         "full+int8": ["recompute.mode=full", "quant.activations=int8"]}
OFFLOAD = "recompute.offload=cpu"


def _config(mode: str, offload: bool, seq_len: int, run_dir: str):
    from lsys.config import load_config

    extra = [OFFLOAD] if offload else []
    return load_config(ROOT / "configs" / "demo.yaml", [
        "parallel.dp=1", "parallel.cp_ring=2", "train.device=cpu", f"data.seq_len={seq_len}",
        "data.curriculum.start_len=0", f"train.run_dir={run_dir}", *MODES[mode], *extra])


def _measure_rank(repeats: int, seq_len: int, run_dir: str) -> dict:
    from lsys.memory.tracker import MemoryTracker
    from lsys.session import distributed_session
    from lsys.trainer import Trainer

    variants = [(mode, offload) for mode in MODES for offload in (False, True)]
    with distributed_session("cpu", 600.0) as session:
        trainers, memory = {}, {}
        for mode, offload in variants:
            trainer = Trainer(_config(mode, offload, seq_len, run_dir), session)
            trainer.train_step(0)  # warm-up; the optimizer state exists from here on
            tracker = MemoryTracker(trainer.model, trainer.optimizer)
            trainer.work.probe = tracker
            with tracker:
                trainer.train_step(1)
            usage = tracker.usage()
            memory[f"{mode}/{offload}"] = {"stored_activations_bytes": usage.stored_activations_bytes,
                                           "peak_bytes": usage.peak_bytes, "host_peak_bytes": usage.host_peak_bytes}
            trainers[(mode, offload)] = trainer
        times: dict[str, list[float]] = {f"{mode}/{offload}": [] for mode, offload in variants}
        for round_index in range(repeats):
            shift = round_index % len(variants)
            for mode, offload in variants[shift:] + variants[:shift]:
                step = trainers[(mode, offload)].train_step(2 + round_index)
                times[f"{mode}/{offload}"].append(step["step_time_s"])
        return {"memory": memory, "times": times}


def main(argv: list[str] | None = None) -> None:
    from launch.local import spawn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--output", type=Path, default=ROOT / "bench/results/activation_offload.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="offload-bench-") as tmp:
        per_rank = spawn(_measure_rank, 2, (args.repeats, args.seq_len, tmp), timeout_s=3600)
    rows = {}
    for mode in MODES:
        kept, moved = (max(rank["memory"][f"{mode}/{o}"]["stored_activations_bytes"] for rank in per_rank)
                       for o in (False, True))
        row = {"stored_device_bytes": kept, "stored_device_bytes_offloaded": moved,
               "peak_bytes": max(rank["memory"][f"{mode}/False"]["peak_bytes"] for rank in per_rank),
               "peak_bytes_offloaded": max(rank["memory"][f"{mode}/True"]["peak_bytes"] for rank in per_rank),
               "host_peak_bytes_offloaded": max(rank["memory"][f"{mode}/True"]["host_peak_bytes"] for rank in per_rank)}
        # Each round's slower rank, offloaded over not.
        rounds = zip(*(zip(rank["times"][f"{mode}/True"], rank["times"][f"{mode}/False"], strict=True)
                       for rank in per_rank), strict=True)
        ratios = [max(t for t, _ in pair) / max(b for _, b in pair) for pair in rounds]
        row["time_ratio"] = statistics.median(ratios)
        row["step_time_s"] = statistics.median(max(ts) for ts in zip(*(r["times"][f"{mode}/False"] for r in per_rank),
                                                                      strict=True))
        rows[mode] = row
    results = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
               "setup": {"config": "configs/demo.yaml", "ranks": 2, "cp_ring": 2, "seq_len": args.seq_len,
                         "repeats": args.repeats},
               "modes": rows}
    mib = 2**20
    table = Table(title=f"recompute.offload=cpu, demo model, 2 ranks ring, S={args.seq_len}: per rank, MiB "
                        f"(stored = what the forward leaves on the device)")
    for column in ("mode", "stored", "stored offloaded", "peak", "peak offloaded", "host peak", "step s",
                   "time offloaded / not"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode, row in rows.items():
        sizes = ("stored_device_bytes", "stored_device_bytes_offloaded", "peak_bytes", "peak_bytes_offloaded",
                 "host_peak_bytes_offloaded")
        table.add_row(mode, *(f"{row[key] / mib:.1f}" for key in sizes), f"{row['step_time_s']:.2f}",
                      f"{row['time_ratio']:.3f}")
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    write_results(results, args.output)


if __name__ == "__main__":
    main()
