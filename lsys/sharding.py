"""A batch's sequence dimension split over the context-parallel ranks, and per-token results gathered back.

Both the trainer and the memory planner feed `StepWork` with sharded batches; the split is the one the attention
uses (`parallel.cp_layout`), so every rank holds exactly the tokens its ring and Ulysses groups expect. The
"balanced" layout is chosen for each batch from its document ids (every rank holds the whole batch before it is
sharded, so every rank chooses the same); the sharded batch then carries it with its ids
(`parallel.context.ShardedDocuments`), which is how the attention and `gather_sequence` learn it.
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
    from parallel.context import ShardedDocuments, balance_layout, shard

    ring_size = 1 if mesh.ring_group is None else mesh.ring_group.size()
    chunks = balance_layout(batch.document_ids, ring_size) if layout == "balanced" else layout

    def part(x: Tensor) -> Tensor:
        return shard(x, seq_dim=1, ring_group=mesh.ring_group, ulysses_group=mesh.ulysses_group, layout=chunks)

    local = replace(batch, **{f.name: part(getattr(batch, f.name)) for f in fields(batch)})
    if layout == "balanced":
        local.document_ids = ShardedDocuments(local.document_ids, chunks)
    return local


def gather_sequence(x: Tensor, local: Batch, mesh: MeshInfo, layout: str) -> Tensor:
    """Inverse of shard_batch for per-token results of the sharded batch `local` ([B, S/cp] -> [B, S] on every
    CP rank)."""
    if mesh.cp_size == 1:
        return x
    from parallel.context import gather

    if layout == "balanced":
        layout = local.document_ids.layout
    return gather(x, seq_dim=1, ring_group=mesh.ring_group, ulysses_group=mesh.ulysses_group, layout=layout)
