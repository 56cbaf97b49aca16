"""Context-parallel attention: checks the shapes and groups, then runs ring, Ulysses, their hybrid or neither.

- ring_group only: ring attention over the group (parallel.context.ring).
- ulysses_group only: all-to-all to a head shard of the full sequence, local attention, all-to-all back.
- both: the Ulysses all-to-all inside each ring rank's Ulysses group gathers that ring rank's shard (in layout
  order) on H/P_u heads, ring attention runs over the ring group on those heads, and the inverse all-to-all
  restores the sequence shard. Ring peers must hold the same Ulysses rank (true for any device mesh whose
  axes are ring and Ulysses); this is not checked because it would cost a collective per call.
- neither: single-device attention.

The contract, for every combination: gather(attention(shard(q), shard(k), shard(v))) equals full attention
over the original order (causal meaning that order), and so do the gathered gradients of q, k and v.
"""

from __future__ import annotations

from torch import Tensor

from kernels.attention import attention as local_attention
from parallel.context.layout import Group, check_groups, check_layout, check_sequence, group_size_rank
from parallel.context.ring import ring_attention
from parallel.context.ulysses import check_ulysses_heads, heads_to_seq, scatter_heads


def check_attention_inputs(
    q: Tensor, k: Tensor, v: Tensor, *, ring_size: int, ulysses_size: int, layout: str
) -> None:
    """Raise ValueError, naming what to change, when the local shards cannot be attended with these sizes."""
    check_layout(layout)
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"context-parallel attention expects q [B, S_local, Hq, D] and k, v [B, S_local, Hkv, D]; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k, v {tuple(k.shape)} must agree on batch, local sequence and head dim"
        )
    check_ulysses_heads(q.shape[2], k.shape[2], ulysses_size)
    check_sequence(q.shape[1] * ring_size * ulysses_size, ring_size, ulysses_size, layout)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    ring_group: Group = None,
    ulysses_group: Group = None,
    layout: str = "zigzag",
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """q: [B, S_local, Hq, D]; k, v: [B, S_local, Hkv, D] (this rank's `shard`) -> [B, S_local, Hq, D].

    Differentiable. `backend` picks the block kernel (kernels.attention); scale defaults to 1/sqrt(D).
    """
    check_groups(ring_group, ulysses_group)
    ring_size, _ = group_size_rank(ring_group)
    ulysses_size, _ = group_size_rank(ulysses_group)
    check_attention_inputs(q, k, v, ring_size=ring_size, ulysses_size=ulysses_size, layout=layout)
    if ulysses_size > 1:
        q, k, v = scatter_heads(q, k, v, ulysses_group)
    if ring_size > 1:
        out = ring_attention(q, k, v, ring_group, causal=causal, layout=layout, scale=scale, backend=backend)
    else:
        out = local_attention(q, k, v, causal=causal, scale=scale, backend=backend)
    if ulysses_size > 1:
        out = heads_to_seq(out, ulysses_group)
    return out
