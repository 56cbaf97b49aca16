"""The context-extension demo (`make extend-demo`), on 2 CPU cores in about two minutes, nothing downloaded:

1. `lsys train configs/extend_demo_base.yaml`: a small Llama-style model learns passkey retrieval at 128 tokens;
2. `lsys export`: its checkpoint becomes a HuggingFace directory (config.json, safetensors);
3. `lsys eval` at 1,024 tokens (8x) over ring attention on 2 ranks, before any training at that length: with
   the model's own RoPE, and with the YaRN rule of configs/extend_demo.yaml;
4. `lsys train configs/extend_demo.yaml --nproc 2`: continued training at 1,024 tokens with that rule, loaded
   from the HuggingFace directory, then `lsys eval` and `lsys export` of the extended model.

Prints a table of passkey accuracy and loss at each stage with the wall time of each command, and writes
bench/results/extend_demo.json. Every command is one a user would type; the run directories are under
runs/extend_demo/ (removed first, so the demo always starts from scratch).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.commands import ROOT, lsys  # noqa: E402
from bench.report import write_results  # noqa: E402

BASE = "configs/extend_demo_base.yaml"
EXTEND = "configs/extend_demo.yaml"
RUNS = Path("runs/extend_demo")


def _timed(home: Path, *args: str) -> tuple[str, float]:
    start = time.perf_counter()
    result = lsys(home, *args)
    return result.stdout, time.perf_counter() - start


def _evaluation(home: Path, *args: str) -> dict:
    stdout, seconds = _timed(home, "eval", *args)
    return {**json.loads(stdout.strip().splitlines()[-1]), "wall_s": seconds}


def run_demo(home: Path) -> dict:
    shutil.rmtree(ROOT / RUNS, ignore_errors=True)
    stages = []
    _, seconds = _timed(home, "train", BASE)
    stages.append({"stage": "base model trained at 128 tokens", **_evaluation(home, BASE), "train_wall_s": seconds})
    _, seconds = _timed(home, "export", str(RUNS / "base"), str(RUNS / "base-hf"))
    export_s = seconds
    plain = _evaluation(home, EXTEND, "--nproc", "2", "model.rope_scaling.rope_type=default")
    stages.append({"stage": "at 1,024 tokens, own RoPE (no extension)", **plain})
    stages.append({"stage": "at 1,024 tokens, YaRN x8, before training", **_evaluation(home, EXTEND, "--nproc", "2")})
    _, seconds = _timed(home, "train", EXTEND, "--nproc", "2")
    stages.append({"stage": "at 1,024 tokens, YaRN x8, after 40 steps on 2 ring ranks",
                   **_evaluation(home, EXTEND, "--nproc", "2"), "train_wall_s": seconds})
    _, seconds = _timed(home, "export", str(RUNS / "extended"), str(RUNS / "extended-hf"))
    return {"stages": stages, "export_wall_s": [export_s, seconds]}


def print_table(results: dict) -> None:
    table = Table(title="context extension: passkey retrieval, a model trained at 128 tokens taken to 1,024")
    for column in ("stage", "eval length", "passkey accuracy", "loss", "train s", "eval s"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for row in results["stages"]:
        train = row.get("train_wall_s")
        table.add_row(row["stage"], f"{row['seq_len']:,}", f"{row['passkey_accuracy']:.3f}", f"{row['loss']:.4f}",
                      "-" if train is None else f"{train:.0f}", f"{row['wall_s']:.0f}")
    Console(width=None if sys.stdout.isatty() else 150).print(table)
    exports = ", ".join(f"{s:.1f} s" for s in results["export_wall_s"])
    print(f"exports: {exports}; total {results['total_wall_s']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "bench/results/extend_demo.json")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as home:  # no Ray cluster is started; LSYS_HOME stays out of the repo
        results = run_demo(Path(home))
    results["total_wall_s"] = time.perf_counter() - start
    print_table(results)
    write_results(results, args.output)


if __name__ == "__main__":
    main()
