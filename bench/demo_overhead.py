"""Framework overhead of the demo's steps: fixed 32- and 512-token steps on 4 local ranks (dp 2 x ring 2), variants
side by side in one run; optionally the whole demo, once per variant.

    python bench/demo_overhead.py                  # 32 and 512 tokens, 4 variants, 7 rounds: about 3 minutes
    python bench/demo_overhead.py --quick          # 2 rounds, no JSON: does every variant still run?
    python bench/demo_overhead.py --end-to-end     # then configs/demo.yaml's 600 steps (eval, checkpoints) per
                                                   # variant "before" and "after", interleaved: about 10 minutes

Variants (configs/demo.yaml with a fixed sequence length, no curriculum):
- before: one FSDP2 unit per block (parallel.fsdp_unit_params=0), torch AdamW's per-parameter loop (foreach off:
  torch's default for DTensor parameters on CPU);
- units: the demo's parallel.fsdp_unit_params (its two blocks join the root: one all-gather and one
  reduce-scatter per step instead of five and three);
- foreach: AdamW's foreach path (one DTensor dispatch per operation for all parameters, not one per parameter);
- after: both.

A step is `Trainer.train_step`, everything the training loop does per step. Each round every variant runs
`--steps` steps (the order rotating by one each round) after a barrier; a variant's time is the slowest rank's
mean step, its CPU the mean over ranks of the process CPU time per step (every thread: gloo's included). On a
shared machine the wall times are noisy: the table shows medians and the median of the per-round ratio to
`before`, and the CPU time per step, which other users of the machine do not inflate.
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
DEFAULT_OUTPUT = ROOT / "bench" / "results" / "demo_overhead.json"
LENGTHS = (32, 512)
RANKS = 4
# name -> (FSDP2 units as in configs/demo.yaml, AdamW foreach)
VARIANTS = {"before": (False, False), "units": (True, False), "foreach": (False, True), "after": (True, True)}


def _config(variant: str, run_dir: str, *extra: str):
    from lsys.config import load_config

    units, _ = VARIANTS[variant]
    overrides = [f"train.run_dir={run_dir}", "train.device=cpu", "checkpoint.resume=false", *extra]
    if not units:
        overrides.append("parallel.fsdp_unit_params=0")
    return load_config(DEMO, overrides)


def _trainer(variant: str, run_dir: str, session, *extra: str):
    from lsys.trainer import Trainer

    trainer = Trainer(_config(variant, run_dir, *extra), session)
    for group in trainer.optimizer.param_groups:  # read by AdamW at every step
        group["foreach"] = VARIANTS[variant][1]
    return trainer


def _measure_rank(rounds: int, steps: dict[int, int], run_dir: str) -> dict:
    """On each rank: every (variant, length) trainer, warmed up, then `rounds` rounds of interleaved steps."""
    import torch.distributed as dist

    from lsys.session import distributed_session

    with distributed_session("cpu", 600.0) as session:
        trainers = {(v, n): _trainer(v, run_dir, session, f"data.seq_len={n}", "data.curriculum.start_len=0",
                                     "data.curriculum.steps=0") for v in VARIANTS for n in LENGTHS}
        step = {key: 0 for key in trainers}
        for key, trainer in trainers.items():  # warmup: first-call costs, optimizer state
            for _ in range(3):
                trainer.train_step(step[key])
                step[key] += 1
        wall = {f"{v}/{n}": [] for v, n in trainers}
        cpu = {f"{v}/{n}": [] for v, n in trainers}
        names = list(VARIANTS)
        for r in range(rounds):
            for length in LENGTHS:
                for variant in names[r % len(names):] + names[:r % len(names)]:
                    trainer, key = trainers[variant, length], f"{variant}/{length}"
                    dist.barrier()
                    started, cpu_started = time.perf_counter(), time.process_time()
                    for _ in range(steps[length]):
                        trainer.train_step(step[variant, length])
                        step[variant, length] += 1
                    elapsed = torch.tensor([time.perf_counter() - started])
                    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
                    wall[key].append(elapsed.item() / steps[length])
                    cpu[key].append((time.process_time() - cpu_started) / steps[length])
        return {"wall": wall, "cpu": cpu}


def _train_rank(values: dict, foreach: bool) -> dict:
    from lsys.config import config_from_dict
    from lsys.session import distributed_session
    from lsys.trainer import Trainer

    with distributed_session("cpu", 600.0) as session:
        trainer = Trainer(config_from_dict(values), session)
        for group in trainer.optimizer.param_groups:
            group["foreach"] = foreach
        summary = trainer.run()
    return {"wall_time_s": summary["wall_time_s"], "final_eval": summary["evals"][-1]}


def end_to_end(rounds: int, tmp: str) -> dict:
    """configs/demo.yaml trained from scratch per variant (`before`, `after`), interleaved over `rounds`: the
    training loop's wall time (steps, evals, checkpoints) and the whole run including rank start-up."""
    from launch.local import spawn
    from lsys.config import to_dict

    runs = {"before": [], "after": []}
    for r in range(rounds):
        for variant in runs:
            run_dir = str(Path(tmp) / f"demo-{variant}-{r}")
            started = time.perf_counter()
            result = spawn(_train_rank, RANKS, (to_dict(_config(variant, run_dir)), VARIANTS[variant][1]),
                           timeout_s=3600)[0]
            runs[variant].append({**result, "run_s": time.perf_counter() - started})
    median = {v: {k: statistics.median(run[k] for run in rs) for k in ("wall_time_s", "run_s")}
              for v, rs in runs.items()}
    return {"runs": runs, "median": median,
            "ratio_after_to_before": statistics.median(a["run_s"] / b["run_s"]
                                                       for a, b in zip(runs["after"], runs["before"], strict=True))}


def run(args: argparse.Namespace) -> dict:
    from launch.local import spawn

    steps = {32: args.steps, 512: max(1, args.steps // 2)}
    with tempfile.TemporaryDirectory(prefix="demo-overhead-bench-") as tmp:
        per_rank = spawn(_measure_rank, RANKS, (args.rounds, steps, tmp), timeout_s=3600)
        whole = end_to_end(args.end_to_end_rounds, tmp) if args.end_to_end else None
    rows = {}
    for length in LENGTHS:
        for variant in VARIANTS:
            key, base = f"{variant}/{length}", f"before/{length}"
            wall = per_rank[0]["wall"][key]
            cpu = [statistics.mean(rank["cpu"][key][r] for rank in per_rank) for r in range(len(wall))]
            rows[key] = {
                "seq_len": length, "variant": variant, "step_s": statistics.median(wall),
                "step_s_range": [min(wall), max(wall)],
                "ratio_to_before": statistics.median(
                    t / b for t, b in zip(wall, per_rank[0]["wall"][base], strict=True)),
                "cpu_per_rank_s": statistics.median(cpu),
                "cpu_ratio_to_before": statistics.median(
                    c / statistics.mean(rank["cpu"][base][r] for rank in per_rank) for r, c in enumerate(cpu)),
            }
    from lsys.config import load_config

    return {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_at_end": os.getloadavg()},
        "setup": {"config": "configs/demo.yaml", "ranks": RANKS, "rounds": args.rounds, "steps_per_round": steps,
                  "demo_fsdp_unit_params": load_config(DEMO).parallel.fsdp_unit_params,
                  "variants": {v: {"fsdp_units_of_demo": u, "adamw_foreach": f} for v, (u, f) in VARIANTS.items()}},
        "steps": rows,
        "end_to_end": whole,
    }


def print_table(results: dict) -> None:
    table = Table(title=f"demo steps on {RANKS} gloo ranks (dp 2 x ring 2), {results['setup']['rounds']} rounds; "
                        "ratios are medians of per-round ratios to `before`")
    for column in ("tokens", "variant", "step s", "min-max s", "/ before", "CPU s/rank", "CPU / before"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in results["steps"].values():
        low, high = row["step_s_range"]
        table.add_row(str(row["seq_len"]), row["variant"], f"{row['step_s']:.3f}", f"{low:.3f}-{high:.3f}",
                      f"{row['ratio_to_before']:.2f}", f"{row['cpu_per_rank_s']:.4f}",
                      f"{row['cpu_ratio_to_before']:.2f}")
    console = Console(width=160)
    console.print(table)
    whole = results["end_to_end"]
    if whole:
        table = Table(title="configs/demo.yaml, 600 steps with evals and checkpoints, 4 ranks")
        for column in ("variant", "runs s", "median s", "training loop s", "final passkey accuracy"):
            table.add_column(column, justify="left" if column == "variant" else "right")
        for variant, runs in whole["runs"].items():
            median = whole["median"][variant]
            table.add_row(variant, ", ".join(f"{r['run_s']:.0f}" for r in runs), f"{median['run_s']:.0f}",
                          f"{median['wall_time_s']:.0f}",
                          ", ".join(f"{r['final_eval']['passkey_accuracy']:.3f}" for r in runs))
        console.print(table)
        console.print(f"after / before (whole run, median of rounds): {whole['ratio_after_to_before']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=6, help="steps per round at 32 tokens (half at 512)")
    parser.add_argument("--end-to-end", action="store_true", help="also train the whole demo per variant")
    parser.add_argument("--end-to-end-rounds", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 steps, no JSON")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.output = 2, 2, None
    results = run(args)
    print_table(results)
    write_results(results, args.output)


if __name__ == "__main__":
    main()
