"""Ring attention: K/V blocks travel around the ring group while each rank attends its local queries to them.

Forward: at step s rank r holds the K/V of ring rank (r - s) mod P. The transfer for step s+1 is started
before step s is computed, so communication hides behind the block kernel. Partial results are merged by their
log-sum-exp (kernels.merge) in fp32 (fp64 for fp64 inputs); only the final output is cast to the input dtype.

Backward: each rank keeps q, out, dout and the GLOBAL lse, so every block backward sees the true softmax
normaliser. K/V rotate again; dq accumulates locally; the dK/dV accumulator of each K/V block travels one hop
behind it, every rank adding its contribution, and after P hops arrives back at the block's owner.

No rank ever holds more than two K/V blocks and two dK/dV accumulators: memory is O(S/P). K/V travel with
Hkv heads; they are expanded to Hq only for the block kernel call (GQA saves bandwidth this way).

Causal schedules (local tensors are the rank's shard, see parallel.context.layout):
- zigzag: the shard is [chunk r; chunk 2P-1-r]. K/V from rank r itself: causal block. From an earlier rank:
  all local queries against the first half of its K/V. From a later rank: the second half of local queries
  against all its K/V. Every rank computes the same number of chunk pairs at every step.
- contiguous: earlier ranks full, later ranks skipped, own block causal (rank P-1 does the most work).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from kernels.attention import attention_backward, attention_forward, expand_kv_heads, reduce_kv_heads
from kernels.merge import merge_attention

# Distinct tags keep a K/V block and a dK/dV accumulator in flight to the same peer from being confused.
_KV_TAG = 1
_DKV_TAG = 2


def _rotate(send: Tensor, group: dist.ProcessGroup, rank: int, size: int, tag: int) -> tuple[Tensor, list]:
    """Start sending `send` to the next ring rank and receiving the previous rank's into a new buffer."""
    recv = torch.empty_like(send)
    ops = [
        dist.P2POp(dist.isend, send, group=group, group_peer=(rank + 1) % size, tag=tag),
        dist.P2POp(dist.irecv, recv, group=group, group_peer=(rank - 1) % size, tag=tag),
    ]
    return recv, dist.batch_isend_irecv(ops)


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def block_plan(
    source: int, rank: int, seq_len: int, causal: bool, layout: str
) -> tuple[slice, slice, bool] | None:
    """(query rows, key rows, block causal) of this rank's queries against ring rank `source`'s K/V.

    None: nothing to compute (causal, contiguous layout, K/V from a later rank).

    seq_len is the local shard length (both q and the visiting K/V have it).
    """
    everything = slice(0, seq_len)
    if source == rank:
        return everything, everything, causal
    if not causal:
        return everything, everything, False
    if layout == "contiguous":
        return (everything, everything, False) if source < rank else None
    half = seq_len // 2
    if source < rank:
        return everything, slice(0, half), False
    return slice(half, seq_len), everything, False


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, layout, scale, backend):
        # q: [B, S_local, Hq, D]; k, v: [B, S_local, Hkv, D] -> out [B, S_local, Hq, D]
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        num_q_heads, seq_len = q.shape[2], q.shape[1]
        acc = torch.promote_types(q.dtype, torch.float32)
        own_kv = kv = torch.stack([k, v])  # [2, B, S_local, Hkv, D]: one contiguous message per hop
        out = lse = None
        for step in range(size):
            if step + 1 < size:
                next_kv, works = _rotate(kv, group, rank, size, _KV_TAG)
            plan = block_plan((rank - step) % size, rank, seq_len, causal, layout)
            if plan is not None:
                rows, keys, block_causal = plan
                block_out, block_lse = attention_forward(
                    q[:, rows],
                    expand_kv_heads(kv[0][:, keys], num_q_heads),
                    expand_kv_heads(kv[1][:, keys], num_q_heads),
                    causal=block_causal,
                    scale=scale,
                    backend=backend,
                )
                if out is None:  # step 0, the own block, always covers every row
                    out, lse = block_out.to(acc), block_lse.to(acc)
                else:
                    out[:, rows], lse[:, :, rows] = merge_attention(
                        out[:, rows], lse[:, :, rows], block_out, block_lse
                    )
            if step + 1 < size:
                _wait(works)
                kv = next_kv
        out = out.to(q.dtype)
        # The stack, not k and v: backward sends it as is, and it holds the same bytes.
        ctx.save_for_backward(q, own_kv, out, lse)
        ctx.options = (group, causal, layout, scale, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        # dout: [B, S_local, Hq, D] -> dq [B, S_local, Hq, D]; dk, dv [B, S_local, Hkv, D]
        q, kv, out, lse = ctx.saved_tensors
        group, causal, layout, scale, backend = ctx.options
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        num_q_heads, num_kv_heads, seq_len = q.shape[2], kv.shape[3], q.shape[1]
        acc = torch.promote_types(q.dtype, torch.float32)
        dout = dout.contiguous()
        dq = dkv = dkv_works = None
        for step in range(size):
            if step + 1 < size:
                next_kv, kv_works = _rotate(kv, group, rank, size, _KV_TAG)
            plan = block_plan((rank - step) % size, rank, seq_len, causal, layout)
            grads = None
            if plan is not None:
                rows, keys, block_causal = plan
                dq_b, dk_b, dv_b = attention_backward(
                    dout[:, rows],
                    q[:, rows],
                    expand_kv_heads(kv[0][:, keys], num_q_heads),
                    expand_kv_heads(kv[1][:, keys], num_q_heads),
                    out[:, rows],
                    lse[:, :, rows].contiguous(),
                    causal=block_causal,
                    scale=scale,
                    backend=backend,
                )
                grads = keys, reduce_kv_heads(dk_b.to(acc), num_kv_heads), reduce_kv_heads(dv_b.to(acc), num_kv_heads)
                if dq is None:  # step 0, the own block, always covers every row
                    dq = dq_b.to(acc)
                else:
                    dq[:, rows] += dq_b
            if dkv_works is None:  # step 0: this block's accumulator starts here, from the full own block
                dkv = torch.stack(grads[1:])
            else:
                # The accumulator of this same K/V block arrives carrying the contributions of the ranks it
                # visited; it was in flight while the block backward above ran. Add to it in place.
                _wait(dkv_works)
                if grads is not None:
                    keys, dk, dv = grads
                    dkv[0][:, keys] += dk
                    dkv[1][:, keys] += dv
            if size > 1:
                dkv, dkv_works = _rotate(dkv, group, rank, size, _DKV_TAG)
            if step + 1 < size:
                _wait(kv_works)
                kv = next_kv
        if dkv_works is not None:
            _wait(dkv_works)  # after P hops the accumulator of this rank's own K/V is home
        return dq.to(q.dtype), dkv[0].to(kv.dtype), dkv[1].to(kv.dtype), None, None, None, None, None


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup,
    *,
    causal: bool = True,
    layout: str = "zigzag",
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """q: [B, S_local, Hq, D]; k, v: [B, S_local, Hkv, D] -> [B, S_local, Hq, D], differentiable.

    The inputs are this rank's shard of the ring group's sequence in `layout` order; shapes are checked by
    parallel.context.attention, which is the entry point to use.
    """
    return _RingAttention.apply(q, k, v, group, causal, layout, scale, backend)
