"""Which sequence positions each context-parallel rank holds, and `shard` / `gather` that follow it.

One rule covers ring, Ulysses and their hybrid (ring size P_r, Ulysses size P_u; a missing group has size 1):

1. Ring axis: the sequence is cut into equal chunks and each ring rank holds some of them, in ascending order
   (a `ChunkLayout`). "zigzag": 2*P_r chunks, ring rank r holds chunks r and 2*P_r-1-r, so under a plain causal
   mask every ring rank has the same amount of work. "contiguous": ring rank r holds chunk r of P_r. A balanced
   layout (parallel.context.balance) holds several chunks per rank, chosen per batch by their cost under the
   batch's document masks.
2. Ulysses axis: that ring shard is cut contiguously into P_u parts and Ulysses rank u holds part u.

The Ulysses all-to-all inside attention gathers exactly the ring rank's shard back, in order, so the ring sees
its chunks. With Ulysses only (P_r = 1) every layout over one ring rank is the identity: after the all-to-all
every rank has the full sequence in its original order and no permutation is undone.

Because a rank's chunks ascend, its local order is the original order restricted to them: the ring's block plan
(parallel.context.ring) needs no positions, only the chunk numbers.

Tokens, labels and position ids are sharded with the same `shard` so they stay aligned; positions keep their
global values (RoPE needs them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from parallel.config import CP_LAYOUTS

Group = dist.ProcessGroup | None


@dataclass(frozen=True)
class ChunkLayout:
    """The ring axis cut into equal chunks: ring rank r holds chunks `ranks[r]`, ascending; every rank holds as
    many, and together they hold every chunk once."""

    ranks: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        held = sorted(c for chunks in self.ranks for c in chunks)
        if not self.ranks or held != list(range(len(held))) or len({len(c) for c in self.ranks}) != 1 or any(
            list(chunks) != sorted(chunks) for chunks in self.ranks
        ):
            raise ValueError(f"ChunkLayout{self.ranks}: every ring rank must hold as many chunks, in ascending "
                             "order, and together every chunk 0..n-1 exactly once")

    @property
    def ring_size(self) -> int:
        return len(self.ranks)

    @property
    def num_chunks(self) -> int:
        return len(self.ranks) * len(self.ranks[0])


Layout = str | ChunkLayout


def check_layout(layout: Layout) -> None:
    if isinstance(layout, ChunkLayout):
        return
    if layout == "balanced":
        raise ValueError("layout='balanced' is chosen per batch from its document ids: pass the ChunkLayout that "
                         "parallel.context.balance_layout returns")
    if layout not in CP_LAYOUTS:
        raise ValueError(
            f"layout={layout!r} is not a context-parallel layout; use one of zigzag, contiguous, or a ChunkLayout"
        )


def chunk_layout(layout: Layout, ring_size: int) -> ChunkLayout:
    """The chunks each of `ring_size` ring ranks holds under `layout` (a name, or a ChunkLayout of that size)."""
    check_layout(layout)
    if isinstance(layout, ChunkLayout):
        if layout.ring_size != ring_size:
            raise ValueError(f"the ChunkLayout is for {layout.ring_size} ring ranks but the ring group has "
                             f"{ring_size}; build it for the ring group's size")
        return layout
    if layout == "zigzag" and ring_size > 1:
        return ChunkLayout(tuple((r, 2 * ring_size - 1 - r) for r in range(ring_size)))
    return ChunkLayout(tuple((r,) for r in range(ring_size)))


def group_size_rank(group: Group) -> tuple[int, int]:
    """(size, this rank's index) of a process group; a missing group is a group of one."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def check_groups(ring_group: Group, ulysses_group: Group) -> None:
    """Both groups must contain this rank and share no other rank (they are two axes of one mesh)."""
    for name, group in (("ring_group", ring_group), ("ulysses_group", ulysses_group)):
        if group is not None and dist.get_rank(group) < 0:
            raise ValueError(f"{name} does not contain this rank; pass the group this rank belongs to")
    if ring_group is None or ulysses_group is None:
        return
    shared = set(dist.get_process_group_ranks(ring_group)) & set(dist.get_process_group_ranks(ulysses_group))
    if len(shared) != 1:
        raise ValueError(
            f"ring_group and ulysses_group share ranks {sorted(shared)}; they must meet only in this rank "
            "(e.g. ranks {0,1},{2,3} as Ulysses groups and {0,2},{1,3} as ring groups)"
        )


def check_sequence(seq_len: int, ring_size: int, ulysses_size: int, layout: Layout) -> None:
    chunks = chunk_layout(layout, ring_size).num_chunks
    need = math.lcm(chunks, ring_size * ulysses_size)
    if seq_len % need != 0:
        name = "a ChunkLayout" if isinstance(layout, ChunkLayout) else f"layout={layout!r}"
        raise ValueError(
            f"sequence length {seq_len} cannot be sharded with {name} ({chunks} chunks) over ring size "
            f"{ring_size} and Ulysses size {ulysses_size}; make the sequence length a multiple of {need}"
        )


def shard_indices(
    seq_len: int,
    *,
    ring_size: int = 1,
    ring_rank: int = 0,
    ulysses_size: int = 1,
    ulysses_rank: int = 0,
    layout: Layout = "zigzag",
) -> Tensor:
    """Original positions held by (ring_rank, ulysses_rank), in local order: int64 [seq_len / (P_r * P_u)]."""
    check_sequence(seq_len, ring_size, ulysses_size, layout)
    chunks = chunk_layout(layout, ring_size)
    size = seq_len // chunks.num_chunks
    ring_shard = torch.cat([torch.arange(c * size, (c + 1) * size) for c in chunks.ranks[ring_rank]])
    part = ring_shard.numel() // ulysses_size
    return ring_shard[ulysses_rank * part : (ulysses_rank + 1) * part]


def group_shard_indices(
    seq_len: int, *, ring_group: Group = None, ulysses_group: Group = None, layout: Layout = "zigzag"
) -> Tensor:
    """`shard_indices` for this rank of the given groups (e.g. to build position ids without a tensor)."""
    check_groups(ring_group, ulysses_group)
    ring_size, ring_rank = group_size_rank(ring_group)
    ulysses_size, ulysses_rank = group_size_rank(ulysses_group)
    return shard_indices(
        seq_len,
        ring_size=ring_size,
        ring_rank=ring_rank,
        ulysses_size=ulysses_size,
        ulysses_rank=ulysses_rank,
        layout=layout,
    )


def shard(
    x: Tensor, seq_dim: int = 1, ring_group: Group = None, ulysses_group: Group = None, layout: Layout = "zigzag"
) -> Tensor:
    """This rank's part of the full sequence x along seq_dim (any dtype; no communication).

    x: [..., S, ...] -> [..., S / (P_r * P_u), ...]. Differentiable as index_select is.
    """
    index = group_shard_indices(
        x.shape[seq_dim], ring_group=ring_group, ulysses_group=ulysses_group, layout=layout
    )
    return x.index_select(seq_dim, index.to(x.device))


def all_gather_seq(x: Tensor, seq_dim: int, group: Group) -> Tensor:
    """Concatenate every member's x along seq_dim, in group-rank order."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=seq_dim)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seq_dim, ring_group, ulysses_group, layout):
        ctx.options = (seq_dim, ring_group, ulysses_group, layout)
        ring_size, _ = group_size_rank(ring_group)
        ulysses_size, _ = group_size_rank(ulysses_group)
        stacked = all_gather_seq(all_gather_seq(x, seq_dim, ulysses_group), seq_dim, ring_group)
        seq_len = stacked.shape[seq_dim]
        # Positions in the order the gathers produced them (ring-major, then Ulysses): undo that permutation.
        order = torch.cat(
            [
                shard_indices(
                    seq_len,
                    ring_size=ring_size,
                    ring_rank=r,
                    ulysses_size=ulysses_size,
                    ulysses_rank=u,
                    layout=layout,
                )
                for r in range(ring_size)
                for u in range(ulysses_size)
            ]
        )
        return stacked.index_select(seq_dim, torch.argsort(order).to(x.device))

    @staticmethod
    def backward(ctx, grad):
        seq_dim, ring_group, ulysses_group, layout = ctx.options
        return shard(grad, seq_dim, ring_group, ulysses_group, layout), None, None, None, None


def gather(
    x: Tensor, seq_dim: int = 1, ring_group: Group = None, ulysses_group: Group = None, layout: Layout = "zigzag"
) -> Tensor:
    """Inverse of `shard`: every rank gets the full sequence in original order.

    x: [..., S_local, ...] -> [..., S, ...].

    Backward returns this rank's shard of the incoming gradient, without summing over ranks: it is meant for
    code that continues identically on every rank (e.g. a loss on the gathered output), where each rank's
    own copy carries the gradient of its own shard.
    """
    check_layout(layout)
    check_groups(ring_group, ulysses_group)
    if ring_group is None and ulysses_group is None:
        return x
    return _Gather.apply(x, seq_dim % x.dim(), ring_group, ulysses_group, layout)
