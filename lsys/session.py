"""Joining the job's process group and picking the device, for whichever launcher started this rank
(`lsys train`, torchrun, Ray Train) or none (a single foreground process)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Set by the local launcher (`lsys train --nproc`, `lsys profile`): the path of a FileStore that only this group's
# ranks use. Without it the ranks rendezvous the torchrun way (env://).
STORE_FILE_ENV = "LSYS_STORE_FILE"


@dataclass(frozen=True)
class Session:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    """"auto" means CUDA when this machine has it; asking for CUDA without one is an error, not a fallback."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is visible; use train.device=cpu or auto")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def join_file_store_group(backend: str, store_file: str, rank: int, world_size: int, timeout: timedelta) -> None:
    """Join a group whose ranks rendezvous through the FileStore at `store_file`, a path on storage every rank
    sees and that no earlier group used (a FileStore file is single-use). No rank listens for the rendezvous, as
    env://'s TCPStore server would on every interface of rank 0's machine."""
    store = dist.FileStore(store_file, world_size)
    store.set_timeout(timeout)  # as env:// does: a missing peer fails the rendezvous after the same timeout
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def init_process_group(backend: str, timeout: timedelta) -> None:
    """Join the launcher's group: through the FileStore it names in $LSYS_STORE_FILE, else by env:// (torchrun,
    whose store the launcher owns)."""
    store_file = os.environ.get(STORE_FILE_ENV)
    if store_file is None:
        dist.init_process_group(backend, timeout=timeout)
    else:
        join_file_store_group(backend, store_file, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), timeout)


@contextlib.contextmanager
def distributed_session(device: str, collective_timeout_s: float) -> Iterator[Session]:
    """Yield this rank's Session inside a process group; create the group if the launcher did not.

    With no launcher environment (no WORLD_SIZE) a one-rank group over an in-memory store is made, so the
    training code has one path. Collectives time out after `collective_timeout_s`: a peer that died surfaces
    as an error on the survivors instead of a hang. Only a group created here is destroyed here.
    """
    created = False
    if not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        chosen = pick_device(device, local_rank)
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        timeout = timedelta(seconds=collective_timeout_s)
        if "WORLD_SIZE" in os.environ:
            init_process_group(backend, timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        created = True
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        chosen = pick_device(device, local_rank)
    try:
        yield Session(dist.get_rank(), dist.get_world_size(), local_rank, chosen)
    finally:
        if created:
            dist.destroy_process_group()
