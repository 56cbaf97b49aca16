"""What the Ray path costs over `lsys train`: the same run launched three ways, interleaved, timed from the command.

    lsys train CONFIG --nproc N                       (local ranks, no Ray)
    lsys submit CONFIG --follow                       (embedded cluster started and stopped by the command)
    lsys submit CONFIG --follow, cluster kept running (a cluster that is already up, as on a real cluster)

For each: seconds from the command's start to the first trained step (the first metrics record, logged every
step), the time spent training (first to last step record), and the whole command. The training itself is the
same computation on the same number of ranks, so the difference is the launcher's.

    python bench/ray_overhead.py [--rounds 2] [--output bench/results/ray_overhead.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
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
from lsys.metrics import read_metrics  # noqa: E402

RUN = ["train.steps=40", "train.log_every=1", "train.eval_every=0", "train.eval_samples=64", "checkpoint.every=0"]
MODES = ("lsys train", "submit, new cluster", "submit, running cluster")


def _arguments(mode: str, config: str, nproc: int, run_dir: Path) -> list[str]:
    overrides = [*RUN, f"train.run_dir={run_dir}"]
    if mode == "lsys train":
        return ["train", config, "--nproc", str(nproc), *overrides]
    return ["submit", config, *overrides, "--follow"]


def _one_run(mode: str, config: str, nproc: int, home: Path, scratch: Path) -> dict[str, float]:
    run_dir = Path(tempfile.mkdtemp(dir=scratch))
    start = time.time()
    lsys(home, *_arguments(mode, config, nproc, run_dir))
    end = time.time()
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r]
    return {"to_first_step_s": steps[0]["time"] - start, "training_s": steps[-1]["time"] - steps[0]["time"],
            "command_s": end - start}


def measure(config: str, nproc: int, rounds: int) -> dict:
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="lsys-bench-") as scratch:
        fresh_home, kept_home = Path(scratch, "fresh"), Path(scratch, "kept")
        lsys(kept_home, "cluster", "start")
        try:
            for index in range(rounds):
                for mode in MODES:
                    home = kept_home if mode == "submit, running cluster" else fresh_home
                    runs[mode].append(_one_run(mode, config, nproc, home, Path(scratch)))
                    print(f"round {index + 1}/{rounds} {mode}: {runs[mode][-1]}", file=sys.stderr)
        finally:
            lsys(kept_home, "cluster", "stop")
    medians = {mode: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for mode, rs in runs.items()}
    base = medians["lsys train"]
    return {
        "config": config, "ranks": nproc, "overrides": RUN, "rounds": rounds, "runs": runs, "median": medians,
        "overhead_vs_lsys_train_s": {mode: {key: m[key] - base[key] for key in m} for mode, m in medians.items()},
        "machine": f"{os.cpu_count()} CPU cores",
    }


def print_table(results: dict) -> None:
    table = Table(title=f"{results['config']} on {results['ranks']} CPU ranks, {results['rounds']} rounds (median)")
    for column in ("launcher", "to first step s", "training s", "whole command s", "overhead vs lsys train s"):
        table.add_column(column, justify="left" if column == "launcher" else "right")
    for mode, m in results["median"].items():
        extra = results["overhead_vs_lsys_train_s"][mode]
        table.add_row(mode, f"{m['to_first_step_s']:.1f}", f"{m['training_s']:.1f}", f"{m['command_s']:.1f}",
                      f"{extra['command_s']:+.1f}")
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--nproc", type=int, default=4, help="ranks for `lsys train` (cluster.num_workers for Ray)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "bench/results/ray_overhead.json")
    args = parser.parse_args()
    results = measure(args.config, args.nproc, args.rounds)
    print_table(results)
    write_results(results, args.output)


if __name__ == "__main__":
    main()
