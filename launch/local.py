"""Local multi-process launch: N ranks on this machine, nothing reachable from outside it, first failure ends all.

Used by `lsys train --nproc N`, `lsys profile` and the multi-rank tests. Ranks are started from a forkserver that
has already imported torch, so each rank starts in a fraction of a second without inheriting the parent's
OpenMP state (a plain fork after torch ran a parallel region can deadlock).

The ranks rendezvous through a FileStore in the launcher's private temporary directory, not env://: c10d's
TCPStore server would listen on every interface (with no authentication) for the whole run, whatever
MASTER_ADDR says. Gloo's (and NCCL's) own connections bind to the loopback interface.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any


class RankFailedError(RuntimeError):
    """A rank raised or died; carries the rank's own traceback so the user sees the real cause."""

    def __init__(self, rank: int, detail: str):
        super().__init__(f"rank {rank} failed:\n{detail}")
        self.rank = rank
        self.detail = detail


def loopback_interface() -> str | None:
    """Name of the loopback interface ("lo" on Linux, "lo0" on macOS), for GLOO/NCCL_SOCKET_IFNAME."""
    for _, name in socket.if_nameindex():
        if name.startswith("lo"):
            return name
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# Long-sequence steps allocate blocks of many sizes; expandable segments keep the caching allocator from
# fragmenting into reserved-but-unusable memory (and its peaks closer to what `lsys plan` counts).
CUDA_ALLOC_CONF = "expandable_segments:True"


def cuda_allocator_environment(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """The CUDA allocator's configuration for the ranks: the user's own when they have set one (under its CUDA name
    or the newer device-generic PYTORCH_ALLOC_CONF), passed on as it is, else expandable segments. Passed on, not
    left to inheritance: forkserver ranks inherit the environment the forkserver started with. CPU ranks never
    read it."""
    users = {name: environ[name] for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF") if name in environ}
    return users or {"PYTORCH_CUDA_ALLOC_CONF": CUDA_ALLOC_CONF}


def rank_environment(rank: int, world_size: int, store_file: str, threads_per_rank: int) -> dict[str, str]:
    """The torchrun-style variables one local rank sees, with the FileStore to rendezvous through instead of
    MASTER_ADDR/MASTER_PORT (so that nothing can fall back to a TCPStore); connections bind to loopback; the CUDA
    allocator's configuration (`cuda_allocator_environment`)."""
    from lsys.session import STORE_FILE_ENV  # here, not at the top: it imports torch, which `lsys submit` never needs

    env = {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        STORE_FILE_ENV: store_file,
        "OMP_NUM_THREADS": str(threads_per_rank),
        **cuda_allocator_environment(os.environ),
    }
    interface = loopback_interface()
    if interface is not None:
        env["GLOO_SOCKET_IFNAME"] = interface
        env["NCCL_SOCKET_IFNAME"] = interface
    return env


def _exit_with_launcher(lifeline: multiprocessing.connection.Connection) -> None:
    """Block until the launcher's end of the lifeline closes (it exited, even by SIGKILL), then die too:
    ranks are children of the forkserver, so nothing else would stop them."""
    with contextlib.suppress(EOFError):
        lifeline.recv()
    os._exit(1)


def _rank_main(
    fn: Callable[..., Any],
    args: Sequence[Any],
    env: dict[str, str],
    result_dir: str,
    init_backend: str | None,
    collective_timeout_s: float,
    lifeline: multiprocessing.connection.Connection,
) -> None:
    threading.Thread(target=_exit_with_launcher, args=(lifeline,), daemon=True).start()
    os.environ.update(env)
    rank = int(env["RANK"])
    import torch

    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    try:
        if init_backend is not None:
            from lsys.session import init_process_group

            init_process_group(init_backend, timedelta(seconds=collective_timeout_s))
        result = fn(*args)
        torch.save(result, Path(result_dir) / f"rank{rank}.pt")
    except BaseException:
        Path(result_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _terminate(processes: list[multiprocessing.process.BaseProcess], grace_s: float = 3.0) -> None:
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()


def _first_failure(failed: list[int], result_dir: Path) -> int:
    """The rank that failed first: peers of a crashed rank fail next with mere connection errors.

    A rank that left no traceback died outright (signal, hard exit) and is the cause; otherwise the
    earliest written traceback is.
    """
    written = {r: result_dir / f"rank{r}.err" for r in failed}
    silent = [r for r, path in written.items() if not path.exists()]
    if silent:
        return silent[0]
    return min(failed, key=lambda r: written[r].stat().st_mtime_ns)


def _failure_detail(proc: multiprocessing.process.BaseProcess, err_file: Path) -> str:
    if err_file.exists():
        return err_file.read_text()
    code = proc.exitcode
    if code is not None and code < 0:
        return f"process died with signal {signal.Signals(-code).name}"
    return f"process exited with code {code}"


def spawn(
    fn: Callable[..., Any],
    nproc: int,
    args: Sequence[Any] = (),
    *,
    init_backend: str | None = None,
    timeout_s: float | None = None,
    collective_timeout_s: float = 120.0,
) -> list[Any]:
    """Run `fn(*args)` on `nproc` local ranks and return each rank's result (rank order).

    `fn` must be importable (module-level). With `init_backend` ("gloo"/"nccl") each rank joins the default
    process group first. The first rank to fail (exception, signal, non-zero exit) stops the others and
    `RankFailedError` carries its traceback; past `timeout_s` all ranks are killed and `TimeoutError` raised.
    Results travel as `torch.save` files and are read back with `weights_only=True`.
    """
    import torch

    if nproc < 1:
        raise ValueError(f"nproc={nproc}: need at least one rank")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed"])
    threads = max(1, (os.cpu_count() or 1) // nproc)
    # Only this process holds the sending end; when it exits for any reason every rank sees EOF and exits.
    lifeline, lifeline_sender = ctx.Pipe(duplex=False)
    # Private to this user (mode 0700), fresh for every launch: the store file is never shared or reused.
    with tempfile.TemporaryDirectory(prefix="lsys-ranks-") as result_dir:
        store_file = str(Path(result_dir, "rendezvous"))
        processes = [
            ctx.Process(
                target=_rank_main,
                args=(fn, args, rank_environment(r, nproc, store_file, threads), result_dir, init_backend,
                      collective_timeout_s, lifeline),
                name=f"lsys-rank{r}",
            )
            for r in range(nproc)
        ]
        for proc in processes:
            proc.start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                failed = [r for r, proc in enumerate(processes) if proc.exitcode not in (None, 0)]
                if failed:
                    _terminate(processes)
                    rank = _first_failure(failed, Path(result_dir))
                    raise RankFailedError(rank, _failure_detail(processes[rank], Path(result_dir, f"rank{rank}.err")))
                if all(proc.exitcode == 0 for proc in processes):
                    break
                if deadline is not None and time.monotonic() > deadline:
                    alive = [r for r, p in enumerate(processes) if p.is_alive()]
                    _terminate(processes)
                    raise TimeoutError(f"ranks {alive} still running after {timeout_s:.0f}s; all ranks killed")
                time.sleep(0.02)
        except BaseException:
            _terminate(processes)
            raise
        finally:
            lifeline.close()
            lifeline_sender.close()
        return [
            torch.load(Path(result_dir, f"rank{r}.pt"), weights_only=True) for r in range(nproc)
        ]
