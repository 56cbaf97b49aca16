"""DeepSpeed's CPU Adam op (C++), compiled once per Python environment and loaded by every process after that,
behind a build lock that an interrupted build cannot leave stuck.

Why a lock of our own: torch builds a C++ extension under a `FileBaton`, a `lock` file created with O_EXCL in the
build directory and removed when the build ends. A builder that dies first (Ctrl-C, a timeout, a killed job)
leaves that file behind, and every later process, even one that only loads the finished op, then waits for it
forever without a word. Every lsys process therefore builds or loads the op while holding an exclusive `flock` on
`lsys-build.lock` beside it. The kernel drops a flock when its holder dies, however it dies, so it never goes
stale, and no recorded pid can be reused by another process to fool it. While we hold it no other lsys process
can be inside torch's build, so a torch `lock` found then was left by a dead builder: it is removed, and said.
Several ranks' actors starting at once queue on the flock: the first builds, the others wait (bounded, with a
line saying whom they wait for) and then load the finished op. The holder writes its pid, host and start time
into the lock file so that a waiter that gives up can name it.

Where: the build depends on the Python, torch and DeepSpeed it was compiled against, so it lives in the virtual
environment that holds them (`<venv>/var/lsys/torch_extensions/<versions>`), shared by the tests, `lsys train`
and the Ray workers of an embedded cluster (which run this interpreter). Outside a writable virtual environment
(e.g. a system-wide install in a container image) it goes to `$LSYS_HOME/torch_extensions/<versions>`. A
`TORCH_EXTENSIONS_DIR` set by the user wins, as it does for torch. Keep the directory on a node's local disk: the
op is compiled for the CPU it is built on. Processes that build `cpu_adam` there without going through this
module (plain DeepSpeed) do not take the flock, and a build of theirs in progress would be taken for stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import TypeVar

from launch.ray_cluster import lsys_home

T = TypeVar("T")

WAIT_S = 15 * 60.0  # a build takes about a minute on 2 cores; a builder holding the lock far longer is stuck
GUARD_NAME = "lsys-build.lock"

# torch's extension build, as of torch 2.13.0 (torch/utils/cpp_extension.py), driven by DeepSpeed 0.19.8's
# OpBuilder.jit_load: with TORCH_EXTENSIONS_DIR set, the op named NAME builds in TORCH_EXTENSIONS_DIR/NAME
# (_get_build_directory) under the FileBaton file `lock` there (_jit_compile), into NAME + LIB_EXT, which a fresh
# process's first load produces (the versioner numbers only rebuilds within one process).
EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"
TORCH_BATON_NAME = "lock"


def extensions_root() -> Path:
    """The directory of torch extension builds that lsys uses (see the module docstring)."""
    if os.environ.get(EXTENSIONS_ENV):
        return Path(os.environ[EXTENSIONS_ENV])
    import torch

    versions = (f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
                f"-deepspeed{metadata.version('deepspeed')}")
    in_venv = sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK)
    base = Path(sys.prefix) / "var" / "lsys" if in_venv else lsys_home()
    return base / "torch_extensions" / versions


def ensure_cpu_adam(wait_s: float = WAIT_S, poll_s: float = 1.0) -> None:
    """Build DeepSpeed's CPU Adam op if this environment has not yet, and load it into this process; after this,
    constructing `DeepSpeedCPUAdam` takes the loaded op and builds nothing."""
    from deepspeed.ops.op_builder import CPUAdamBuilder
    from torch.utils.cpp_extension import LIB_EXT

    builder = CPUAdamBuilder()
    root = extensions_root()
    build_dir = root / builder.NAME
    with _environment(EXTENSIONS_ENV, str(root)):
        build_once(build_dir, builder.load, built=build_dir / f"{builder.NAME}{LIB_EXT}",
                   what="DeepSpeed CPU Adam", wait_s=wait_s, poll_s=poll_s)


def build_once(build_dir: Path, load: Callable[[], T], *, built: Path, what: str, wait_s: float = WAIT_S,
               poll_s: float = 1.0) -> T:
    """`load()` (which builds `built` in `build_dir` under torch's lock when it is missing) while holding this
    directory's flock: waits at most `wait_s` for another process that holds it, clears a torch lock left by a
    dead builder, and says when a build is about to start."""
    build_dir.mkdir(parents=True, exist_ok=True)
    guard = build_dir / GUARD_NAME
    fd = os.open(guard, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, guard, what, wait_s, poll_s)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().isoformat("T", "seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        try:
            baton = build_dir / TORCH_BATON_NAME
            if baton.exists():
                baton.unlink(missing_ok=True)
                _say(f"removed the stale build lock {baton} (an earlier build of {what} was interrupted)")
            if not built.exists():
                _say(f"building {what} (one time, about a minute) in {build_dir}")
            return load()
        finally:
            os.ftruncate(fd, 0)  # no owner recorded while nobody holds it
    finally:
        os.close(fd)  # releases the flock


def _acquire(fd: int, guard: Path, what: str, wait_s: float, poll_s: float) -> None:
    """The exclusive flock on `guard`, polled (a blocking flock could not time out) until `wait_s` has passed."""
    deadline = time.monotonic() + wait_s
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if not waiting:
            _say(f"waiting for {_owner(guard)} to finish building {what} (lock {guard}; at most {wait_s:.0f} s)")
            waiting = True
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{what}: {_owner(guard)} still holds the build lock {guard} after {wait_s:.0f} s. Stop that "
                f"process if it is stuck; if it no longer runs (a lock on a network filesystem can outlive its "
                f"holder), delete {guard} and start again")
        time.sleep(poll_s)


def _owner(guard: Path) -> str:
    """Who holds `guard`, from the record its holder wrote (empty for a moment after it took the lock)."""
    try:
        record = json.loads(guard.read_text())
        return f"process {record['pid']} on {record['host']} (since {record['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """`name=value` in this process's environment for the duration: torch reads TORCH_EXTENSIONS_DIR when it
    builds or loads, and once the op is loaded DeepSpeed never asks torch again."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def _say(text: str) -> None:
    print(f"lsys: {text}", file=sys.stderr, flush=True)
