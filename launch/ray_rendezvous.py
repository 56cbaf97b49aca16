"""Ray Train's torch rendezvous through a file, for worker groups that all run on one machine.

Ray Train's own TorchConfig rendezvous is env:// (or tcp://): the rank-0 worker hosts a c10d TCPStore server,
which binds every interface of its node, with no authentication, for as long as the group lives. That is needed
on a real multi-node cluster (the store must be reachable from the other machines) but not on the embedded
cluster, whose workers all run here: there the ranks meet in a FileStore instead, and no worker listens for the
rendezvous. The ranks' own gloo/NCCL connections bind where GLOO/NCCL_SOCKET_IFNAME say (loopback).

A FileStore file serves one group once: every start of a worker group (the first, and each restart after a
failure, up to cluster.max_failures) gets a fresh file, so a new group never meets the keys of a dead one.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

import ray
from ray.train.torch import TorchConfig

# Besides the public TorchConfig, private parts of Ray Train, fenced in launch/_ray_compat.py.
from launch._ray_compat import TorchBackend, V1WorkerGroup, set_torch_distributed_env_vars
from lsys.session import join_file_store_group


@dataclass
class FileStoreTorchConfig(TorchConfig):
    """TorchConfig whose ranks rendezvous through a FileStore in `store_dir` (a directory every worker sees at
    this path); `backend` must be given ("gloo" or "nccl")."""

    store_dir: str = field(kw_only=True)

    @property
    def backend_cls(self):
        return _FileStoreTorchBackend


class _FileStoreTorchBackend(TorchBackend):
    """Ray Train's torch backend with its process-group setup replaced; its shutdown (destroying the group) is
    kept. Runs in the Ray Train controller, which starts and stops one worker group at a time."""

    def on_start(self, worker_group, backend_config: FileStoreTorchConfig) -> None:
        # Private to this user: the store's keys are the group's business only.
        os.makedirs(backend_config.store_dir, mode=0o700, exist_ok=True)
        self._store_file = os.path.join(backend_config.store_dir, uuid.uuid4().hex)
        # A v1 worker group exports RANK/WORLD_SIZE/LOCAL_RANK in on_training_start, which this backend inherits.
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(set_torch_distributed_env_vars)
        world_size = len(worker_group)
        timeout = timedelta(seconds=backend_config.timeout_s)
        ray.get([worker_group.execute_single_async(rank, join_file_store_group, backend_config.backend,
                                                   self._store_file, rank, world_size, timeout)
                 for rank in range(world_size)])

    def on_shutdown(self, worker_group, backend_config: FileStoreTorchConfig) -> None:
        try:
            super().on_shutdown(worker_group, backend_config)  # raises when a worker has died
        finally:
            # The last rank to leave a group that ended cleanly has removed the file; a failed group leaves it.
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._store_file)
            with contextlib.suppress(OSError):  # not empty: files of a job stopped before its group shut down
                os.rmdir(backend_config.store_dir)
