"""Optimizer-state offload against the local optimizer: state each rank holds, its resident memory, step time.

Each model trains a few steps as a Ray job on an embedded cluster four ways, side by side:

    local    torch AdamW on the rank, fp32 parameters with bf16 compute (mixed precision's usual setup)
    offload  bf16 parameters and gradients on the rank; fp32 master weights and Adam moments in a Ray actor
             running DeepSpeed's CPU Adam (ZeRO-Offload's split: 12 bytes per parameter leave the rank)
    offload-fp32  fp32 parameters on the rank, Adam moments in the actor (8 bytes per parameter leave)
    local-bf16    torch AdamW on bf16 parameters (bf16 moments, no master): offload's dtypes without offload,
                  to tell the cost of moving the state from the effect of computing on bf16 weights

"held" counts the bytes of the rank's parameter shards, their gradients and the optimizer state the rank keeps
(what an accelerator would hold; 16, 4 and 8 bytes per parameter in the three modes). "resident" is what the OS
says the rank process holds alone after the run (unique set size, allocator's free pages returned): parameters
and optimizer state, gradients already freed, plus the runtime itself.

    python bench/offload.py [--output bench/results/offload.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.commands import lsys  # noqa: E402
from bench.report import write_results  # noqa: E402
from lsys.metrics import read_metrics  # noqa: E402

COMMON = ["data.curriculum.start_len=0", "train.log_every=1", "train.eval_every=0", "checkpoint.every=0",
          "train.device=cpu"]
MODELS = {
    "demo (0.4M, 4 ranks dp 2 x ring 2)": ["train.steps=12", "train.eval_samples=16"],
    "101M (2 ranks dp 2)": ["model.hidden_size=1024", "model.num_layers=8", "model.num_heads=8",
                            "model.num_kv_heads=8", "data.seq_len=128", "train.global_batch_size=4",
                            "parallel.dp=2", "parallel.cp_ring=1", "cluster.num_workers=2",
                            "cluster.cpus_per_worker=1", "train.steps=8", "train.eval_samples=4"],
}
MODES = {
    "local": ["train.param_dtype=float32", "train.compute_dtype=bfloat16"],
    "offload": ["train.param_dtype=bfloat16", "train.compute_dtype=bfloat16", "optim.offload=cpu"],
    "offload-fp32": ["train.param_dtype=float32", "train.compute_dtype=bfloat16", "optim.offload=cpu"],
    "local-bf16": ["train.param_dtype=bfloat16", "train.compute_dtype=bfloat16"],
}
MIB = 2**20


def _one_run(home: Path, run_dir: Path, overrides: list[str]) -> dict:
    lsys(home, "submit", "configs/demo.yaml", *COMMON, *overrides, f"train.run_dir={run_dir}", "--follow")
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [r["step_time_s"] for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r]
    ranks = summary["state_bytes_per_rank"]
    held = [r["parameters"] + r["gradients"] + r["optimizer"] for r in ranks]
    return {"step_time_s": statistics.median(steps[2:]), "held_bytes": held,
            "resident_bytes": [r["resident"] for r in ranks], "parameter_bytes": [r["parameters"] for r in ranks],
            "final_loss": summary["losses"][-1]}


def measure() -> dict:
    results: dict = {"models": {}}
    with tempfile.TemporaryDirectory(prefix="lsys-offload-") as scratch:
        home = Path(scratch, "home")
        lsys(home, "cluster", "start")
        try:
            for model, overrides in MODELS.items():
                runs = {}
                for mode, extra in MODES.items():
                    runs[mode] = _one_run(home, Path(tempfile.mkdtemp(dir=scratch)), [*overrides, *extra])
                    print(f"{model} {mode}: {runs[mode]}", file=sys.stderr)
                results["models"][model] = _compare(runs)
        finally:
            lsys(home, "cluster", "stop")
    return results


def _compare(runs: dict) -> dict:
    local = runs["local"]
    params = [b // 4 for b in local["parameter_bytes"]]  # fp32: 4 bytes per local parameter
    out = {"local_parameters_per_rank": params, "runs": runs}
    for mode in ("offload", "offload-fp32"):
        run = runs[mode]
        out[mode] = {
            "held_saved_bytes_per_parameter": statistics.mean(
                (a - b) / n for a, b, n in zip(local["held_bytes"], run["held_bytes"], params, strict=True)),
            "resident_saved_bytes_per_parameter": statistics.mean(
                (a - b) / n for a, b, n in zip(local["resident_bytes"], run["resident_bytes"], params, strict=True)),
            "step_time_vs_local": run["step_time_s"] / local["step_time_s"],
        }
    out["offload"]["step_time_vs_local_bf16"] = runs["offload"]["step_time_s"] / runs["local-bf16"]["step_time_s"]
    return out


def print_table(results: dict) -> None:
    table = Table(title="optimizer-state offload vs local AdamW, per rank (Ray jobs on CPU ranks)")
    for column in ("model", "mode", "held MiB", "resident MiB", "saved B/param held", "saved B/param resident",
                   "step s", "step vs local"):
        table.add_column(column, justify="left" if column in ("model", "mode") else "right")
    for model, result in results["models"].items():
        local_step = result["runs"]["local"]["step_time_s"]
        for mode, run in result["runs"].items():
            saved = result.get(mode, {})
            table.add_row(model, mode, f"{max(run['held_bytes']) / MIB:.1f}", f"{max(run['resident_bytes']) / MIB:.0f}",
                          f"{saved['held_saved_bytes_per_parameter']:.2f}" if saved else "-",
                          f"{saved['resident_saved_bytes_per_parameter']:.2f}" if saved else "-",
                          f"{run['step_time_s']:.3f}", f"{run['step_time_s'] / local_step:.2f}")
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "bench/results/offload.json")
    args = parser.parse_args()
    results = measure()
    print_table(results)
    write_results(results, args.output)


if __name__ == "__main__":
    main()
