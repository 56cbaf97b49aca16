"""Run the `lsys` command line from a benchmark as a user would, against the embedded cluster kept in `home`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lsys(home: Path, *args: str) -> subprocess.CompletedProcess:
    """`lsys ARGS` with LSYS_HOME=`home` (never a cluster from $RAY_ADDRESS); raises with its output if it fails."""
    env = {**os.environ, "LSYS_HOME": str(home)}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise RuntimeError(f"lsys {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result
