"""The order of ring attention's P2P batches. NCCL ignores P2P tags: it matches a rank's sends to its peer's
receives by issue order alone, so every rank must issue the same sequence of batches, and in backward each
step's K/V batch must come before its dK/dV batch on every rank (gloo, which does match tags, would not notice)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import parallel.context.ring as ring
from tests.distributed import all_ranks, run_ranks


def _record_batches(with_docs: bool) -> dict[str, list[list[int]]]:
    """On each rank: the tags of the sends of each batch ring attention issues, in forward and in backward."""
    issued: list[list[int]] = []
    original = dist.batch_isend_irecv

    def recording(ops):
        issued.append([op.tag for op in ops if op.op is dist.isend])
        return original(ops)

    dist.batch_isend_irecv = recording
    try:
        gen = torch.Generator().manual_seed(dist.get_rank())
        q, k, v = (torch.randn(1, 8, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
        docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]) if with_docs else None
        out = ring.ring_attention(q, k, v, dist.group.WORLD, layout="zigzag", document_ids=docs)
        forward = list(issued)
        out.sum().backward()
        return {"forward": forward, "backward": issued[len(forward):]}
    finally:
        dist.batch_isend_irecv = original


def test_kv_batch_precedes_dkv_batch_at_every_step_on_every_rank():
    kv, dkv, docs = ring._KV_TAG, ring._DKV_TAG, ring._DOCS_TAG
    plain = all_ranks(run_ranks(_record_batches, 2, False))
    # Step 0: the next K/V block, then this block's dK/dV accumulator; step 1 (the last): the accumulator home.
    assert plain == {"forward": [[kv]], "backward": [[kv], [dkv], [dkv]]}
    packed = all_ranks(run_ranks(_record_batches, 2, True))
    assert packed == {"forward": [[kv, docs]], "backward": [[kv, docs], [dkv], [dkv]]}
