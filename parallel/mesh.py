"""The device mesh: named axes built from the configured degrees.

Axis order, outermost to innermost: dp, cp_ring, cp_ulysses, tp. Consecutive ranks share the innermost
axes, so the bandwidth-hungry ones (tensor parallel, Ulysses all-to-all) stay inside a node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from parallel._compat import flatten_mesh
from parallel.config import ParallelConfig

AXES = ("dp", "cp_ring", "cp_ulysses", "tp")


@dataclass(frozen=True)
class MeshInfo:
    """The mesh plus the groups the training step needs, resolved once."""

    mesh: DeviceMesh
    dp_size: int
    dp_rank: int
    dp_group: dist.ProcessGroup
    cp_size: int
    ring_group: dist.ProcessGroup | None  # None when the degree is 1
    ulysses_group: dist.ProcessGroup | None
    replica_mesh: DeviceMesh  # every rank holding the same parameters: dp x cp flattened (gradients sum here)
    replica_group: dist.ProcessGroup
    tp_size: int
    tp_mesh: DeviceMesh

    @property
    def replica_size(self) -> int:
        return self.dp_size * self.cp_size


def build_mesh(cfg: ParallelConfig, device_type: str) -> MeshInfo:
    """Needs an initialised default process group; raises ValueError when the degrees do not tile it."""
    world_size = dist.get_world_size()
    dp = cfg.resolved_dp(world_size)
    shape = (dp, cfg.cp_ring, cfg.cp_ulysses, cfg.tp)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=AXES)
    replica = flatten_mesh(mesh["dp", "cp_ring", "cp_ulysses"], "replica")
    return MeshInfo(
        mesh=mesh,
        dp_size=dp,
        dp_rank=mesh.get_local_rank("dp"),
        dp_group=mesh.get_group("dp"),
        cp_size=cfg.cp,
        ring_group=mesh.get_group("cp_ring") if cfg.cp_ring > 1 else None,
        ulysses_group=mesh.get_group("cp_ulysses") if cfg.cp_ulysses > 1 else None,
        replica_mesh=replica,
        replica_group=replica.get_group(),
        tp_size=cfg.tp,
        tp_mesh=mesh["tp"],
    )
