import os

import pytest
import torch
import torch.distributed as dist

from launch.local import RankFailedError, spawn
from tests.distributed import run_ranks


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
