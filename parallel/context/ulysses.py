"""Ulysses all-to-all: trade the sequence shard for a head shard, so attention runs over the whole sequence.

`[B, S/P, H, D] -> all_to_all -> [B, S, H/P, D]`, attention on H/P heads, inverse all-to-all. Rank u of the
group gets heads [u*H/P, (u+1)*H/P) and the sequence parts of all members concatenated in group-rank order,
which the layout (parallel.context.layout) makes the original order of the ring rank's shard.

GQA: query heads must divide by P. KV heads that do not (Hkv < P, or Hkv not a multiple of P) are first
replicated to lcm(Hkv, P) heads, each KV head repeated for consecutive query heads, so query head h still
reads the KV head it read before (h // (Hq / Hkv)). lcm(Hkv, P) always divides Hq when P and Hkv both do,
so replication is always possible once Hq % P == 0; the price is all-to-all traffic for the copies.

Document ids are per position and the same for every head, so they are all-gathered, not all-to-all'ed, in the
same group-rank order as the sequence parts.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from kernels.attention import expand_kv_heads
from parallel.context.layout import all_gather_seq


def check_ulysses_heads(num_q_heads: int, num_kv_heads: int, ulysses_size: int) -> None:
    if num_q_heads % ulysses_size != 0:
        raise ValueError(
            f"num_heads={num_q_heads} is not divisible by the Ulysses size {ulysses_size}; make num_heads a "
            f"multiple of {ulysses_size} or lower cp_ulysses to a divisor of {num_q_heads}"
        )
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}; "
            "set num_kv_heads to a divisor of num_heads"
        )


def ulysses_kv_heads(num_q_heads: int, num_kv_heads: int, ulysses_size: int) -> int:
    """KV heads after replication: the smallest multiple of num_kv_heads that ulysses_size divides."""
    check_ulysses_heads(num_q_heads, num_kv_heads, ulysses_size)
    return math.lcm(num_kv_heads, ulysses_size)


def _seq_to_heads(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    # x: [B, S_part, H, D] -> [B, P * S_part, H / P, D]
    size = dist.get_world_size(group)
    b, s, h, d = x.shape
    send = x.reshape(b, s, size, h // size, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv: [P (source rank = sequence part), B, S_part, H / P, D]
    return recv.permute(1, 0, 2, 3, 4).reshape(b, size * s, h // size, d)


def _heads_to_seq(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    # x: [B, S, H / P, D] -> [B, S / P, H, D]
    size = dist.get_world_size(group)
    b, s, hp, d = x.shape
    send = x.reshape(b, size, s // size, hp, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv: [P (source rank = head group), B, S / P, H / P, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s // size, size * hp, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group), None


def seq_to_heads(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Differentiable all-to-all. x: [B, S_part, H, D] -> [B, P * S_part, H / P, D]."""
    return _SeqToHeads.apply(x, group)


def heads_to_seq(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Differentiable inverse all-to-all. x: [B, S, H / P, D] -> [B, S / P, H, D]."""
    return _HeadsToSeq.apply(x, group)


def scatter_heads(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup
) -> tuple[Tensor, Tensor, Tensor]:
    """Replicate KV heads if needed, then all-to-all q, k, v.

    q: [B, S_part, Hq, D]; k, v: [B, S_part, Hkv, D]
    -> q [B, P * S_part, Hq / P, D]; k, v [B, P * S_part, lcm(Hkv, P) / P, D]
    """
    size = dist.get_world_size(group)
    num_kv = ulysses_kv_heads(q.shape[2], k.shape[2], size)
    # repeat_interleave is differentiable: the copies' gradients are summed back onto the original head.
    k, v = expand_kv_heads(k, num_kv), expand_kv_heads(v, num_kv)
    return seq_to_heads(q, group), seq_to_heads(k, group), seq_to_heads(v, group)


def gather_document_ids(document_ids: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The ids of the sequence `seq_to_heads` gathers: [B, S_part] -> [B, P * S_part] (no gradient)."""
    return all_gather_seq(document_ids, 1, group)
