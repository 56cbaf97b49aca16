import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launch.local import RankFailedError, spawn
from lsys.metrics import read_metrics
from tests.commands import ROOT, TINY
from tests.distributed import run_ranks
from tests.sockets import exposed, listeners, process_tree


def _sum_of_ranks() -> float:
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise KeyError("boom on purpose")
    dist.barrier()


def _die_on_rank_one() -> None:
    if dist.get_rank() == 1:
        os._exit(3)
    dist.barrier()


def _sleep_forever() -> None:
    import time

    time.sleep(1000)


def test_results_come_back_in_rank_order():
    assert run_ranks(_sum_of_ranks, 3) == [3.0, 3.0, 3.0]


def test_failing_rank_traceback_is_reraised():
    with pytest.raises(RankFailedError, match="boom on purpose") as info:
        run_ranks(_fail_on_rank_one, 2)
    assert info.value.rank == 1


def test_rank_that_exits_without_traceback_is_named():
    with pytest.raises(RankFailedError, match="exited with code 3") as info:
        run_ranks(_die_on_rank_one, 2)
    assert info.value.rank == 1


def test_hung_ranks_are_killed_at_timeout():
    with pytest.raises(TimeoutError, match="still running"):
        spawn(_sleep_forever, 2, timeout_s=3)


def _record_pid_then_sleep(pid_dir: str) -> None:
    import time

    Path(pid_dir, str(os.getpid())).touch()
    time.sleep(1000)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ranks_exit_when_the_launcher_is_killed(tmp_path):
    # A SIGKILLed launcher runs no cleanup; the ranks (children of the forkserver) must still go away.
    script = f"from launch.local import spawn; from tests.test_launch_local import _record_pid_then_sleep as f; " \
             f"spawn(f, 2, ({str(tmp_path)!r},))"
    launcher = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 60
    while len(list(tmp_path.iterdir())) < 2:
        assert time.monotonic() < deadline and launcher.poll() is None, "ranks did not start"
        time.sleep(0.1)
    pids = [int(p.name) for p in tmp_path.iterdir()]
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids), f"ranks {pids} outlived their launcher"


def test_a_training_run_listens_on_loopback_only(tmp_path):
    # Long enough to sample while both ranks train; --timeout ends it should the test itself die.
    command = [sys.executable, "-m", "launch.cli", "train", "configs/demo.yaml", "--nproc", "2", *TINY,
               "parallel.dp=1", "train.steps=100000", "checkpoint.every=0", "train.eval_every=0", "--timeout", "240",
               f"train.run_dir={tmp_path}"]
    log = tmp_path / "log"  # a file, not a pipe: a full pipe would stall the run's logging
    with log.open("w") as out:
        launcher = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    metrics, seen = tmp_path / "metrics.jsonl", set()
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and read_metrics(metrics)):  # both ranks are in the group and training
            assert launcher.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no step logged within 120 s"
            time.sleep(0.2)
        for _ in range(5):
            found = listeners(process_tree(launcher.pid))  # the launcher, its forkserver and the ranks
            assert len({listener.pid for listener in found}) >= 2, f"each rank's gloo listener: {found}"
            seen.update(found)
            time.sleep(0.3)
        assert launcher.poll() is None, "the run ended while it was sampled"
    finally:
        launcher.send_signal(signal.SIGINT)  # a clean stop: the launcher ends its ranks and removes its temp dir
        try:
            launcher.wait(30)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
    assert not exposed(seen), exposed(seen)
