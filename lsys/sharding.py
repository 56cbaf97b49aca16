"""A batch's sequence dimension split over the context-parallel ranks, and per-token results gathered back.

Both the trainer and the memory planner feed `StepWork` with sharded batches; the split is the one the attention
uses (`parallel.cp_layout`), so every rank holds exactly the tokens its ring and Ulysses groups expect.
"""

from __future__ import annotations

from dataclasses import fields, replace

from torch import Tensor

from lsys.data import Batch
from parallel.mesh import MeshInfo


def shard_batch(batch: Batch, mesh: MeshInfo, layout: str) -> Batch:
    """Keep this rank's part of every sequence ([B, S] -> [B, S/cp]); positions and document ids stay as they
    were for the whole sequence (RoPE and the document masks need them)."""
    if mesh.cp_size == 1:
        return batch
    from parallel.context import shard

    def part(x: Tensor) -> Tensor:
        return shard(x, seq_dim=1, ring_group=mesh.ring_group, ulysses_group=mesh.ulysses_group, layout=layout)

    return replace(batch, **{f.name: part(getattr(batch, f.name)) for f in fields(batch)})


def gather_sequence(x: Tensor, mesh: MeshInfo, layout: str) -> Tensor:
    """Inverse of shard_batch for per-token results ([B, S/cp] -> [B, S] on every CP rank)."""
    if mesh.cp_size == 1:
        return x
    from parallel.context import gather

    return gather(x, seq_dim=1, ring_group=mesh.ring_group, ulysses_group=mesh.ulysses_group, layout=layout)
