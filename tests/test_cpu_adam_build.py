"""The CPU Adam build lock: a builder killed mid-build leaves nothing that blocks the next one, processes that
come while one builds wait for it and load what it built, and a wait on a builder that never finishes ends with
an error that names the lock. Builders here are subprocesses running `build_once` around a stand-in for torch's
build (its `lock` file, a pause, the library); one test loads the real op past a stale torch lock."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.cpu_adam_build import GUARD_NAME, build_once, ensure_cpu_adam, extensions_root
from tests.commands import ROOT

BUILDER = """
import sys, time
from pathlib import Path
from launch.cpu_adam_build import build_once

build_dir, seconds = Path(sys.argv[1]), float(sys.argv[2])

def load():  # as torch builds: its lock file, the compile, the library, the lock removed
    (build_dir / "lock").touch()
    time.sleep(seconds)
    (build_dir / "op.so").touch()
    (build_dir / "lock").unlink()

build_once(build_dir, load, built=build_dir / "op.so", what="the test op")
"""


def _start_builder(build_dir: Path, seconds: float) -> subprocess.Popen:
    """A builder that has taken the lock and is inside torch's build when this returns."""
    proc = subprocess.Popen([sys.executable, "-c", BUILDER, str(build_dir), str(seconds)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (build_dir / "lock").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the builder did not start building within 60 s"
        time.sleep(0.05)
    return proc


class Loads:
    """A stand-in for the op's load that records what it found."""

    def __init__(self, build_dir: Path):
        self.build_dir = build_dir
        self.saw: list[tuple[bool, bool]] = []

    def __call__(self) -> str:
        self.saw.append(((self.build_dir / "lock").exists(), (self.build_dir / "op.so").exists()))
        (self.build_dir / "op.so").touch()
        return "op"


def _build(build_dir: Path, load: Loads, **kwargs) -> str:
    return build_once(build_dir, load, built=build_dir / "op.so", what="the test op", poll_s=0.05, **kwargs)


def test_a_killed_builder_leaves_no_lasting_lock(tmp_path, capsys):
    build_dir = tmp_path / "op"
    builder = _start_builder(build_dir, seconds=600)
    builder.kill()
    builder.wait()
    assert (build_dir / "lock").exists()  # what used to block every later run

    load = Loads(build_dir)
    assert _build(build_dir, load, wait_s=5) == "op"
    assert load.saw == [(False, False)]  # torch's stale lock was gone before torch looked
    assert capsys.readouterr().err.splitlines() == [
        f"lsys: removed the stale build lock {build_dir / 'lock'} (an earlier build of the test op was interrupted)",
        f"lsys: building the test op (one time, about a minute) in {build_dir}",
    ]
    assert (build_dir / GUARD_NAME).read_text() == ""  # no owner recorded once released

    assert _build(build_dir, load, wait_s=5) == "op"  # built: loaded without a word
    assert capsys.readouterr().err == ""


def test_processes_that_come_during_a_build_wait_and_load_it(tmp_path, capsys):
    build_dir = tmp_path / "op"
    builder = _start_builder(build_dir, seconds=1.0)
    try:
        load = Loads(build_dir)
        assert _build(build_dir, load, wait_s=60) == "op"
        assert load.saw == [(False, True)]  # only after the builder finished, and built by it
        [line] = capsys.readouterr().err.splitlines()  # it waited, and did not build
        assert line.startswith(f"lsys: waiting for process {builder.pid} on {socket.gethostname()} (since ")
        assert line.endswith(f"to finish building the test op (lock {build_dir / GUARD_NAME}; at most 60 s)")
    finally:
        assert builder.wait(timeout=60) == 0, builder.stderr.read()


def test_the_wait_on_a_live_builder_is_bounded(tmp_path):
    build_dir = tmp_path / "op"
    builder = _start_builder(build_dir, seconds=600)
    try:
        load = Loads(build_dir)
        guard = build_dir / GUARD_NAME
        started = time.monotonic()
        with pytest.raises(TimeoutError) as error:
            _build(build_dir, load, wait_s=1.0)
        assert time.monotonic() - started < 10
        assert str(error.value).startswith(f"the test op: process {builder.pid} on {socket.gethostname()} (since ")
        assert f"still holds the build lock {guard} after 1 s. Stop that process" in str(error.value)
        assert str(error.value).endswith(f"delete {guard} and start again")
        assert load.saw == [] and (build_dir / "lock").exists()  # a live builder's lock is left alone
    finally:
        builder.kill()
        builder.wait()


@pytest.mark.slow
def test_the_real_op_loads_past_a_stale_torch_lock(tmp_path):
    """The real build (reused from the environment's cache, or made once here and reused by the other offload
    tests) copied aside with a torch lock left in it: a fresh process loads it and steps."""
    ensure_cpu_adam()
    root = tmp_path / "torch_extensions"
    shutil.copytree(extensions_root() / "cpu_adam", root / "cpu_adam", ignore=shutil.ignore_patterns("*lock"))
    (root / "cpu_adam" / "lock").touch()
    step = ("import torch; from launch.cpu_adam_build import ensure_cpu_adam; ensure_cpu_adam(); "
            "from deepspeed.ops.adam import DeepSpeedCPUAdam; p = torch.nn.Parameter(torch.ones(4)); "
            "p.grad = torch.ones(4); DeepSpeedCPUAdam([p], lr=0.1).step(); assert (p < 1).all(), p")
    result = subprocess.run([sys.executable, "-c", step], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TORCH_EXTENSIONS_DIR": str(root)})
    assert result.returncode == 0, result.stderr
    assert f"lsys: removed the stale build lock {root / 'cpu_adam' / 'lock'}" in result.stderr
    assert "lsys: building" not in result.stderr
    assert not (root / "cpu_adam" / "lock").exists()
