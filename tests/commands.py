"""Run the `lsys` command line as a user would: a subprocess from the repository root, output captured."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A model and run small enough that a rank trains a step in milliseconds: launch tests measure the launcher.
TINY = [
    "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1", "data.seq_len=32",
    "data.curriculum.start_len=0", "train.steps=4", "train.global_batch_size=4", "train.log_every=2",
    "train.eval_every=2", "train.eval_samples=8", "checkpoint.every=2", "train.device=cpu",
]


def lsys(*args: str, timeout: float = 300, home: Path | None = None) -> subprocess.CompletedProcess:
    """`lsys ARGS`; `home` sets LSYS_HOME (where the embedded Ray cluster keeps its state)."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    if home is not None:
        env["LSYS_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@contextlib.contextmanager
def two_node_cluster(home: Path) -> Iterator[Path]:
    """An embedded cluster of a head and a second node (2 CPUs each) under LSYS_HOME=`home`, stopped on exit."""
    started = lsys("cluster", "start", "--nodes", "2", "--cpus-per-node", "2", home=home, timeout=180)
    assert started.returncode == 0, started.stderr
    try:
        yield home
    finally:
        lsys("cluster", "stop", home=home, timeout=120)

