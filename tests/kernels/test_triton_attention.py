"""Triton attention against the float64 reference: interpreted on CPU always, compiled when CUDA is present.

The checks live in tests/kernels/triton_check.py and run in a child process, because whether triton interprets
is decided when the kernel module is imported, and this process may already have imported it either way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
GROUPS = ["block", "split", "edge", "docs", "gqa"]


def _run_check(groups: list[str], device: str, interpret: bool) -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "tests.kernels.triton_check", *groups, "--device", device],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"triton_check {groups} on {device} failed:\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("group", GROUPS)
def test_triton_interpreted_on_cpu(group):
    _run_check([group], "cpu", interpret=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a CUDA device")
def test_triton_compiled_on_cuda():
    _run_check(GROUPS, "cuda", interpret=False)
