"""Memory savers on the demo model: stored activation bytes per rank, step time and final loss, per mode.

    python bench/memory_savers.py                 # 2 gloo ranks, ring attention over both, the demo's 600 steps
    python bench/memory_savers.py --train-steps 0 # bytes and time only
    python bench/memory_savers.py --quick         # 60 training steps, 3 timed repeats: does every mode still run?

Modes: none, selective and full recomputation, int8 stored activations, and each recompute with int8
(configs/demo.yaml with recompute.* / quant.* overrides; parallel.cp_ring=2, so "per rank" means each rank's
half of every sequence).

1. Stored bytes (one spawn, every mode): each rank builds the trainer of each mode and measures one forward at
   the full sequence length with parallel.activations.measure_stored_activations (allocator records: what the
   forward leaves alive for backward, whatever keeps it). Reported for the transformer blocks and in total,
   in float32 (the demo's dtype) and with bf16 compute (autocast), against `none` at the same dtype.
2. Step time (same spawn): optimizer steps at full length, the modes taking turns for `--repeats` rounds so a
   shared machine's noise falls on all of them; median of the per-round ratio to `none`.
3. Loss: the demo trained once per mode with the same seed (`--train-steps`); mean training loss of the last
   10% of steps, and the final held-out passkey accuracy and loss.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from report import write_results
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "memory_savers.json"
MODES = {
    "none": [],
    "selective": ["recompute.mode=selective"],
    "full": ["recompute.mode=full"],
    "int8": ["quant.activations=int8"],
    "selective+int8": ["recompute.mode=selective", "quant.activations=int8"],
    "full+int8": ["recompute.mode=full", "quant.activations=int8"],
}
COMMON = ["parallel.dp=1", "parallel.cp_ring=2", "train.device=cpu"]


def _config(mode: str, *extra: str):
    from lsys.config import load_config

    return load_config(DEMO, [*COMMON, *MODES[mode], *extra])


def _stored(trainer, step: int) -> dict[str, int]:
    from parallel.activations import measure_stored_activations

    batch = trainer._micro_batches(step)[0]

    def forward():
        losses = trainer.work.training_losses(batch)
        return (losses * batch.loss_mask).sum()

    loss, stored = measure_stored_activations(trainer.model, forward)
    loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    blocks = sum(size for layer, size in stored.by_layer().items() if layer.startswith("blocks."))
    return {"blocks": blocks, "total": stored.total_bytes()}


def _measure_rank(repeats: int, run_dir: str) -> dict:
    """On each rank: stored bytes of every mode in fp32 and bf16, then interleaved step times."""
    from lsys.session import distributed_session
    from lsys.trainer import Trainer

    with distributed_session("cpu", 600.0) as session:
        full_length_step = _config("none").data.curriculum.steps  # the curriculum is over: full length
        stored, trainers = {}, {}
        for mode in MODES:
            for dtype in ("float32", "bfloat16"):
                cfg = _config(mode, f"train.compute_dtype={dtype}", f"train.run_dir={run_dir}")
                stored[f"{mode}/{dtype}"] = _stored(Trainer(cfg, session), full_length_step)
            trainers[mode] = Trainer(_config(mode, f"train.run_dir={run_dir}"), session)
            trainers[mode].train_step(full_length_step)  # warmup
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        names = list(MODES)
        for round_index in range(repeats):
            for mode in names[round_index % len(names):] + names[: round_index % len(names)]:
                times[mode].append(trainers[mode].train_step(full_length_step)["step_time_s"])
        return {"stored": stored, "times": times, "seq_len": trainers["none"].cfg.data.seq_len,
                "local_batch": trainers["none"].local_batch}


def _train(mode: str, steps: int, run_dir: str) -> dict:
    from launch.local import spawn
    from lsys.config import to_dict
    from lsys.trainer import train_from_dict

    extra = [f"train.run_dir={run_dir}", "checkpoint.resume=false"]
    if steps:
        cfg = _config(mode, *extra)
        curriculum = min(cfg.data.curriculum.steps, steps // 2)
        extra += [f"train.steps={steps}", f"data.curriculum.steps={curriculum}", f"train.eval_every={steps}",
                  f"checkpoint.every={steps}"]
    started = time.perf_counter()
    summary = spawn(train_from_dict, 2, (to_dict(_config(mode, *extra)),), timeout_s=3600)[0]
    losses = summary["losses"]
    tail = losses[-max(1, len(losses) // 10):]
    final = summary["evals"][-1]
    return {"steps": len(losses), "final_train_loss": statistics.fmean(tail), "eval_loss": final["loss"],
            "passkey_accuracy": final["passkey_accuracy"], "wall_s": time.perf_counter() - started}


def run(args: argparse.Namespace) -> dict:
    from launch.local import spawn

    with tempfile.TemporaryDirectory(prefix="memory-savers-bench-") as tmp:
        per_rank = spawn(_measure_rank, 2, (args.repeats, tmp), timeout_s=3600)
        training = {mode: _train(mode, args.train_steps, str(Path(tmp) / mode)) for mode in MODES} \
            if args.train_steps != 0 else {}
    rows = {}
    for mode in MODES:
        row = {}
        for dtype in ("float32", "bfloat16"):
            mine = max(rank["stored"][f"{mode}/{dtype}"]["blocks"] for rank in per_rank)
            base = max(rank["stored"][f"none/{dtype}"]["blocks"] for rank in per_rank)
            row[dtype] = {"blocks_bytes_per_rank": mine, "ratio_to_none": mine / base,
                          "total_bytes_per_rank": max(rank["stored"][f"{mode}/{dtype}"]["total"] for rank in per_rank)}
        rounds = zip(per_rank[0]["times"][mode], per_rank[0]["times"]["none"], strict=True)
        row["time_ratio_to_none"] = statistics.median(t / base for t, base in rounds)
        row["step_time_s"] = statistics.median(per_rank[0]["times"][mode])
        if mode in training:
            row["training"] = training[mode]
        rows[mode] = row
    return {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "setup": {"config": "configs/demo.yaml", "overrides": COMMON, "ranks": 2,
                  "seq_len": per_rank[0]["seq_len"], "sequences_per_rank": per_rank[0]["local_batch"],
                  "repeats": args.repeats, "train_steps": args.train_steps or "demo"},
        "modes": rows,
    }


def print_table(results: dict) -> None:
    table = Table(title=f"memory savers, demo model, 2 ranks (ring 2), S={results['setup']['seq_len']}")
    for column in ("mode", "fp32 blocks MiB/rank", "vs none", "bf16 blocks MiB/rank", "vs none", "time vs none",
                   "final loss", "eval acc"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode, row in results["modes"].items():
        fp32, bf16, training = row["float32"], row["bfloat16"], row.get("training", {})
        table.add_row(mode, f"{fp32['blocks_bytes_per_rank'] / 2**20:.2f}", f"{fp32['ratio_to_none']:.3f}",
                      f"{bf16['blocks_bytes_per_rank'] / 2**20:.2f}", f"{bf16['ratio_to_none']:.3f}",
                      f"{row['time_ratio_to_none']:.3f}",
                      f"{training['final_train_loss']:.3g}" if training else "-",
                      f"{training['passkey_accuracy']:.3f}" if training else "-")
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds of steps, modes taking turns")
    parser.add_argument("--train-steps", type=int, default=-1,
                        help="training steps per mode for the loss column: -1 the demo's own, 0 skips training")
    parser.add_argument("--output", type=Path, default=None, help=f"JSON results (default {DEFAULT_OUTPUT})")
    parser.add_argument("--quick", action="store_true", help="3 timed rounds, 60 training steps, no JSON by default")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.train_steps = 3, 60
    elif args.output is None:
        args.output = DEFAULT_OUTPUT
    if args.train_steps == -1:
        args.train_steps = None
    started = time.perf_counter()
    results = run(args)
    results["wall_s"] = time.perf_counter() - started
    print_table(results)
    write_results(results, args.output)


if __name__ == "__main__":
    main()
