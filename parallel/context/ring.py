"""Ring attention: K/V blocks travel around the ring group while each rank attends its local queries to them.

Forward: at step s rank r holds the K/V of ring rank (r - s) mod P. The transfer for step s+1 is started
before step s is computed, so communication hides behind the block kernel. Partial results are merged by their
log-sum-exp (kernels.merge) in fp32 (fp64 for fp64 inputs); only the final output is cast to the input dtype.

Backward: each rank keeps q, out, dout and the GLOBAL lse, so every block backward sees the true softmax
normaliser. K/V rotate again; dq accumulates locally; the dK/dV accumulator of each K/V block travels one hop
behind it, every rank adding its contribution, and after P hops arrives back at the block's owner.

No rank ever holds more than two K/V blocks and two dK/dV accumulators: memory is O(S/P). K/V travel with
Hkv heads; they are expanded to Hq only for the block kernel call (GQA saves bandwidth this way).

Document ids (packed documents): the K/V block's ids travel with it, a second message in the same batch, and
every block call gets the ids of its query rows and keys. A block whose query rows share no document with its
keys is skipped like the causal mask's empty blocks; forward decides once per call from the ids it has
(exactly, for any ids) and backward reuses those decisions. Every block still travels the whole ring: skipping
transfers would need every rank's ids up front.

Causal schedules (local tensors are the rank's shard, see parallel.context.layout):
- zigzag: the shard is [chunk r; chunk 2P-1-r]. K/V from rank r itself: causal block. From an earlier rank:
  all local queries against the first half of its K/V. From a later rank: the second half of local queries
  against all its K/V. Every rank computes the same number of chunk pairs at every step.
- contiguous: earlier ranks full, later ranks skipped, own block causal (rank P-1 does the most work).
- a balanced layout (several chunks per rank, chosen per batch): own block causal; from another rank, each run
  of local chunks against the visiting chunks numbered below it (`block_plan`).
"""

from __future__ import annotations

import bisect

import torch
import torch.distributed as dist
from torch import Tensor

from kernels.attention import attention_backward, attention_forward
from kernels.merge import merge_attention
from parallel.context.layout import ChunkLayout, Layout, chunk_layout

# Distinct tags keep a K/V block, its document ids and a dK/dV accumulator in flight to the same peer apart on
# gloo. NCCL ignores tags and matches sends to receives by issue order alone: every rank must issue the same
# sequence of batches, K/V before dK/dV at each backward step (tests/parallel/test_ring_order.py pins it).
_KV_TAG = 1
_DKV_TAG = 2
_DOCS_TAG = 3


def _rotate(
    sends: list[tuple[Tensor, int]], group: dist.ProcessGroup, rank: int, size: int
) -> tuple[list[Tensor], list]:
    """Start sending each (tensor, tag) to the next ring rank and receiving the previous rank's into new buffers,
    all in one batch."""
    recvs, ops = [], []
    for send, tag in sends:
        recv = torch.empty_like(send)
        recvs.append(recv)
        ops.append(dist.P2POp(dist.isend, send, group=group, group_peer=(rank + 1) % size, tag=tag))
        ops.append(dist.P2POp(dist.irecv, recv, group=group, group_peer=(rank - 1) % size, tag=tag))
    return recvs, dist.batch_isend_irecv(ops)


def _rotate_block(
    kv: Tensor, docs: Tensor | None, group: dist.ProcessGroup, rank: int, size: int
) -> tuple[Tensor, Tensor | None, list]:
    """Start moving a K/V block [2, B, S_local, Hkv, D] and its document ids [B, S_local] (or None) one hop."""
    sends = [(kv, _KV_TAG)] if docs is None else [(kv, _KV_TAG), (docs, _DOCS_TAG)]
    recvs, works = _rotate(sends, group, rank, size)
    return recvs[0], (recvs[1] if docs is not None else None), works


def _wait(works: list) -> None:
    for work in works:
        work.wait()


Block = tuple[slice, slice, bool]  # (query rows, key rows, causal) of one block kernel call


def block_plan(source: int, rank: int, seq_len: int, causal: bool, layout: ChunkLayout) -> list[Block]:
    """The block kernel calls of this rank's queries against ring rank `source`'s K/V; [] when nothing is
    computed (causal, every visiting key after every local query).

    seq_len is the local shard length (both q and the visiting K/V have it). Both ranks' chunks ascend (see
    parallel.context.layout), so under a causal mask a local chunk sees a prefix of the visiting chunks, the ones
    numbered below it: consecutive local chunks that see the same prefix make one call.
    """
    everything = slice(0, seq_len)
    if source == rank:
        return [(everything, everything, causal)]
    if not causal:
        return [(everything, everything, False)]
    mine, theirs = layout.ranks[rank], layout.ranks[source]
    size = seq_len // len(mine)
    calls: list[Block] = []
    for index, chunk in enumerate(mine):
        seen = bisect.bisect_left(theirs, chunk)  # visiting chunks before this one; grows with index
        if not seen:
            continue
        if calls and calls[-1][1].stop == seen * size:
            calls[-1] = (slice(calls[-1][0].start, (index + 1) * size), calls[-1][1], False)
        else:
            calls.append((slice(index * size, (index + 1) * size), slice(0, seen * size), False))
    return calls


def _shares_document(q_docs: Tensor, k_docs: Tensor) -> bool:
    """q_docs [B, Sq], k_docs [B, Sk] -> whether some query of some batch row has a key of its document.

    Exact for any ids (each query id is looked up among its row's sorted key ids); O(S log S), small next to
    the block it may save. One host sync per ring step on GPU."""
    sorted_keys = k_docs.sort(dim=1).values
    found = torch.searchsorted(sorted_keys, q_docs.contiguous()).clamp_(max=sorted_keys.shape[1] - 1)
    return bool((sorted_keys.gather(1, found) == q_docs).any())


def _doc_slices(q_docs: Tensor | None, k_docs: Tensor | None, rows: slice, keys: slice) -> dict:
    """The block kernel's q_docs/k_docs arguments for a block (none without document ids)."""
    if q_docs is None:
        return {}
    return {"q_docs": q_docs[:, rows], "k_docs": k_docs[:, keys]}


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, docs, group, causal, layout, scale, backend):
        # q: [B, S_local, Hq, D]; k, v: [B, S_local, Hkv, D]; docs: [B, S_local] int64 or None
        # -> out [B, S_local, Hq, D]
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        seq_len = q.shape[1]
        acc = torch.promote_types(q.dtype, torch.float32)
        own_kv = kv = torch.stack([k, v])  # [2, B, S_local, Hkv, D]: one contiguous message per hop
        k_docs = docs
        out = lse = None
        plans = []
        for step in range(size):
            if step + 1 < size:
                next_kv, next_docs, works = _rotate_block(kv, k_docs, group, rank, size)
            # The own block always shares documents (each position with itself), so step 0 is never skipped.
            plan = [
                (rows, keys, block_causal)
                for rows, keys, block_causal in block_plan((rank - step) % size, rank, seq_len, causal, layout)
                if docs is None or _shares_document(docs[:, rows], k_docs[:, keys])
            ]
            plans.append(plan)
            for rows, keys, block_causal in plan:
                block_out, block_lse = attention_forward(
                    q[:, rows],
                    kv[0][:, keys],
                    kv[1][:, keys],
                    causal=block_causal,
                    scale=scale,
                    backend=backend,
                    **_doc_slices(docs, k_docs, rows, keys),
                )
                if out is None:  # step 0, the own block, always covers every row
                    out, lse = block_out.to(acc), block_lse.to(acc)
                else:
                    out[:, rows], lse[:, :, rows] = merge_attention(
                        out[:, rows], lse[:, :, rows], block_out, block_lse
                    )
            if step + 1 < size:
                _wait(works)
                kv, k_docs = next_kv, next_docs
        out = out.to(q.dtype)
        # The stack, not k and v: backward sends it as is, and it holds the same bytes.
        ctx.save_for_backward(q, own_kv, out, lse, docs)
        ctx.options = (group, plans, scale, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        # dout: [B, S_local, Hq, D] -> dq [B, S_local, Hq, D]; dk, dv [B, S_local, Hkv, D]
        q, kv, out, lse, docs = ctx.saved_tensors
        group, plans, scale, backend = ctx.options
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        acc = torch.promote_types(q.dtype, torch.float32)
        dout = dout.contiguous()
        k_docs = docs
        dq = dkv = dkv_works = None
        for step, plan in enumerate(plans):
            # Issued before this step's dK/dV batch below, and both on every rank whatever its plan: NCCL pairs
            # them by order (see _KV_TAG).
            if step + 1 < size:
                next_kv, next_docs, kv_works = _rotate_block(kv, k_docs, group, rank, size)
            grads = []  # (key rows, dk, dv) of each call, added to the visiting accumulator once it arrives
            for rows, keys, block_causal in plan:
                dq_b, dk_b, dv_b = attention_backward(
                    dout[:, rows],
                    q[:, rows],
                    kv[0][:, keys],
                    kv[1][:, keys],
                    out[:, rows],
                    lse[:, :, rows].contiguous(),
                    causal=block_causal,
                    scale=scale,
                    backend=backend,
                    **_doc_slices(docs, k_docs, rows, keys),
                )
                grads.append((keys, dk_b.to(acc), dv_b.to(acc)))
                if dq is None:  # step 0, the own block, always covers every row
                    dq = dq_b.to(acc)
                else:
                    dq[:, rows] += dq_b
            if dkv_works is None:  # step 0: this block's accumulator starts here, from the full own block
                dkv = torch.stack(grads[0][1:])
            else:
                # The accumulator of this same K/V block arrives carrying the contributions of the ranks it
                # visited; it was in flight while the block backward above ran. Add to it in place.
                _wait(dkv_works)
                for keys, dk, dv in grads:
                    dkv[0][:, keys] += dk
                    dkv[1][:, keys] += dv
            if size > 1:
                (dkv,), dkv_works = _rotate([(dkv, _DKV_TAG)], group, rank, size)
            if step + 1 < size:
                _wait(kv_works)
                kv, k_docs = next_kv, next_docs
        if dkv_works is not None:
            _wait(dkv_works)  # after P hops the accumulator of this rank's own K/V is home
        return dq.to(q.dtype), dkv[0].to(kv.dtype), dkv[1].to(kv.dtype), None, None, None, None, None, None


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup,
    *,
    causal: bool = True,
    layout: Layout = "zigzag",
    scale: float | None = None,
    backend: str = "auto",
    document_ids: Tensor | None = None,
) -> Tensor:
    """q: [B, S_local, Hq, D]; k, v: [B, S_local, Hkv, D]; document_ids: [B, S_local] int64 or None
    -> [B, S_local, Hq, D], differentiable.

    The inputs are this rank's shard of the ring group's sequence in `layout` order; shapes are checked by
    parallel.context.attention, which is the entry point to use.
    """
    chunks = chunk_layout(layout, dist.get_world_size(group))
    return _RingAttention.apply(q, k, v, document_ids, group, causal, chunks, scale, backend)
