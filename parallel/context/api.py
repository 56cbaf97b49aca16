"""Context-parallel attention: checks the shapes and groups, then runs ring, Ulysses, their hybrid or neither.

- ring_group only: ring attention over the group (parallel.context.ring).
- ulysses_group only: all-to-all to a head shard of the full sequence, local attention, all-to-all back.
- both: the Ulysses all-to-all inside each ring rank's Ulysses group gathers that ring rank's shard (in layout
  order) on H/P_u heads, ring attention runs over the ring group on those heads, and the inverse all-to-all
  restores the sequence shard. Ring peers must hold the same Ulysses rank (true for any device mesh whose
  axes are ring and Ulysses); this is not checked because it would cost a collective per call.
- neither: single-device attention.

The contract, for every combination: gather(attention(shard(q), shard(k), shard(v))) equals full attention
over the original order (causal meaning that order), and so do the gathered gradients of q, k and v. With
document_ids (this rank's `shard` of [B, S] ids, e.g. of packed documents) "full attention" is masked so a
query attends only to keys of its own document.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.attention import attention as local_attention
from parallel.context.layout import Group, Layout, check_groups, check_layout, check_sequence, group_size_rank
from parallel.context.ring import ring_attention
from parallel.context.ulysses import check_ulysses_heads, gather_document_ids, heads_to_seq, scatter_heads


def check_document_ids(document_ids: Tensor, q: Tensor) -> None:
    """document_ids must be int64 [B, S_local] on q's device, one id per local position."""
    if document_ids.dtype != torch.int64 or tuple(document_ids.shape) != tuple(q.shape[:2]):
        raise ValueError(
            f"document_ids must be int64 [B, S_local] = {tuple(q.shape[:2])} like q's first two dims (this rank's "
            f"`shard` of the [B, S] ids); got {document_ids.dtype} {tuple(document_ids.shape)}"
        )
    if document_ids.device != q.device:
        raise ValueError(f"document_ids are on {document_ids.device} but q on {q.device}; move them to {q.device}")


def check_attention_inputs(
    q: Tensor, k: Tensor, v: Tensor, *, ring_size: int, ulysses_size: int, layout: Layout,
    document_ids: Tensor | None = None,
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
    if document_ids is not None:
        check_document_ids(document_ids, q)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = True,
    ring_group: Group = None,
    ulysses_group: Group = None,
    layout: Layout = "zigzag",
    scale: float | None = None,
    backend: str = "auto",
    document_ids: Tensor | None = None,
) -> Tensor:
    """q: [B, S_local, Hq, D]; k, v: [B, S_local, Hkv, D]; document_ids: [B, S_local] int64 or None (this rank's
    `shard` of each) -> [B, S_local, Hq, D].

    Differentiable. `backend` picks the block kernel (kernels.attention); scale defaults to 1/sqrt(D).
    """
    check_groups(ring_group, ulysses_group)
    ring_size, _ = group_size_rank(ring_group)
    ulysses_size, _ = group_size_rank(ulysses_group)
    check_attention_inputs(
        q, k, v, ring_size=ring_size, ulysses_size=ulysses_size, layout=layout, document_ids=document_ids
    )
    if ulysses_size > 1:
        q, k, v = scatter_heads(q, k, v, ulysses_group)
        if document_ids is not None:
            document_ids = gather_document_ids(document_ids, ulysses_group)
    if ring_size > 1:
        out = ring_attention(
            q, k, v, ring_group, causal=causal, layout=layout, scale=scale, backend=backend,
            document_ids=document_ids,
        )
    else:
        out = local_attention(q, k, v, causal=causal, scale=scale, backend=backend, document_ids=document_ids)
    if ulysses_size > 1:
        out = heads_to_seq(out, ulysses_group)
    return out
