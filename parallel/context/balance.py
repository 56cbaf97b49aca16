"""A layout chosen per batch so every ring rank computes about as many attention pairs under document masks.

Zigzag balances plain causal attention exactly: a rank's early chunk is cheap and its late one dear. Under
document masks a query computes only the earlier keys of its own document, so the work of a chunk depends on
where the documents start, and zigzag leaves the busiest rank 1.17-1.39x the mean on real packed code (2 to 8
ring ranks, up to 2.9x for one sequence; bench/document_balance.py).

`balance_layout` cuts the sequence into BALANCED_CHUNKS_PER_RANK chunks per ring rank, prices each by the pairs
its queries compute (summed over the batch's rows), and deals them out: dearest first to the least loaded rank
that still has room (every rank holds as many chunks, so shards stay equal), then swaps between the busiest rank
and the others while that lowers the busiest. Each rank's chunks ascend, so the ring needs nothing but the
layout (parallel.context.ring.block_plan). Deterministic: every rank computes the same layout from the same ids.

Where a model hands its attention function the document ids, `ShardedDocuments` carries the layout with them
(the layout changes with every batch); `sharded_attention` is the attention function that reads it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from parallel.config import BALANCED_CHUNKS_PER_RANK
from parallel.context.api import attention
from parallel.context.layout import ChunkLayout, Group


def position_work(document_ids: Tensor, causal: bool = True) -> Tensor:
    """[B, S] int64 ids -> [B, S] int64: how many keys each query attends to under the document mask (causal:
    the keys of its document at or before it; otherwise its document's size). Ids need not be contiguous runs."""
    ids, order = torch.sort(document_ids, dim=1, stable=True)  # each document's positions together, in order
    seq_len = ids.shape[1]
    index = torch.arange(seq_len).expand_as(ids)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    first = torch.cummax(torch.where(starts, index, 0), dim=1).values  # where each sorted document begins
    if causal:
        sorted_work = index - first + 1
    else:
        ends = torch.ones_like(starts)
        ends[:, :-1] = starts[:, 1:]
        last = torch.flip(torch.cummin(torch.flip(torch.where(ends, index, seq_len), [1]), dim=1).values, [1])
        sorted_work = last - first + 1
    return torch.empty_like(sorted_work).scatter_(1, order, sorted_work)


def assign_chunks(costs: list[float], ring_size: int) -> ChunkLayout:
    """Deal chunks of these costs to `ring_size` ranks, as many each, keeping the busiest rank's total low."""
    per_rank = len(costs) // ring_size
    held: list[list[int]] = [[] for _ in range(ring_size)]
    loads = [0.0] * ring_size
    for chunk in sorted(range(len(costs)), key=lambda c: (-costs[c], c)):
        rank = min((r for r in range(ring_size) if len(held[r]) < per_rank), key=lambda r: (loads[r], r))
        held[rank].append(chunk)
        loads[rank] += costs[chunk]
    # Largest-first leaves the last, cheapest chunks to settle the totals; a swap can still help when one dear
    # chunk lands on a rank that was already near the top.
    for _ in range(len(costs) * ring_size):
        busiest = max(range(ring_size), key=lambda r: (loads[r], -r))
        best = None  # (new maximum of the two ranks, rank, chunk there, chunk of the busiest)
        for rank in range(ring_size):
            for mine in held[busiest]:
                for theirs in held[rank]:
                    shift = costs[mine] - costs[theirs]
                    if shift <= 0:
                        continue
                    peak = max(loads[busiest] - shift, loads[rank] + shift)
                    if peak < loads[busiest] and (best is None or peak < best[0]):
                        best = (peak, rank, theirs, mine)
        if best is None:
            break
        _, rank, theirs, mine = best
        held[busiest][held[busiest].index(mine)] = theirs
        held[rank][held[rank].index(theirs)] = mine
        shift = costs[mine] - costs[theirs]
        loads[busiest] -= shift
        loads[rank] += shift
    return ChunkLayout(tuple(tuple(sorted(chunks)) for chunks in held))


def balance_layout(
    document_ids: Tensor, ring_size: int, causal: bool = True, chunks_per_rank: int = BALANCED_CHUNKS_PER_RANK
) -> ChunkLayout:
    """[B, S] (or [S]) document ids of the FULL sequences -> the ChunkLayout for `ring_size` ring ranks that
    evens out the attention pairs each computes. S must be a multiple of ring_size * chunks_per_rank."""
    if ring_size == 1:
        return ChunkLayout(((0,),))
    ids = document_ids.reshape(-1, document_ids.shape[-1]).cpu()
    num_chunks = ring_size * chunks_per_rank
    if ids.shape[1] % num_chunks:
        raise ValueError(f"sequence length {ids.shape[1]} cannot be cut into {num_chunks} equal chunks "
                         f"({chunks_per_rank} per ring rank x {ring_size}); make it a multiple of {num_chunks}")
    work = position_work(ids, causal).to(torch.float64).sum(0)  # [S]: the batch's rows share one layout
    return assign_chunks(work.reshape(num_chunks, -1).sum(1).tolist(), ring_size)


class ShardedDocuments(NamedTuple):
    """This rank's shard of a batch's document ids [B, S_local] and the layout the batch was sharded with."""

    ids: Tensor
    layout: ChunkLayout

    def to(self, device: torch.device | str) -> ShardedDocuments:
        return ShardedDocuments(self.ids.to(device), self.layout)


def sharded_attention(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = True, *, document_ids: ShardedDocuments,
    ring_group: Group = None, ulysses_group: Group = None, scale: float | None = None, backend: str = "auto",
) -> Tensor:
    """Context-parallel attention for a layout chosen per batch: the layout comes with the document ids.
    Shapes as parallel.context.attention."""
    if not isinstance(document_ids, ShardedDocuments):
        raise TypeError("a layout chosen per batch needs its document ids as ShardedDocuments(ids, layout), "
                        f"as lsys.sharding.shard_batch makes them; got {type(document_ids).__name__}")
    return attention(q, k, v, causal, ring_group=ring_group, ulysses_group=ulysses_group,
                     layout=document_ids.layout, scale=scale, backend=backend, document_ids=document_ids.ids)
