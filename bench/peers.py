"""Other implementations of context-parallel attention behind one interface, for bench/context_attention.py.

Each adapter is built on every rank of an initialised gloo process group and returns a `Method`: the original
sequence positions this rank holds (the peer's own layout) and a differentiable `attend` over the local shards
in our [B, S_local, H, D] layout. A peer that cannot run here raises `Unavailable`, which becomes a row of the
results rather than a crash.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from parallel.context import shard_indices

# ring-attention-pytorch's own default block size for `ring_flash_attn`.
RING_ATTENTION_PYTORCH_BUCKET = 1024
# Diagnoses of failures seen with the pinned peer versions, attached only when the check fails again.
KNOWN_ISSUES = {
    "ring-attention-pytorch": (
        "0.5.20: RingFlashAttentionFunction.backward ends with `dkv = ring_pass(1, dkv); dk, dv = dkv`, but "
        "ring_pass returns the (received, sent) pair of stacked [dk; dv] buffers, so it returns [2, ...] tensors "
        "that autograd silently sums over their first dim: on rank r, k.grad = true dk + dv of its own shard and "
        "v.grad = true dk + dv of rank (r+1) mod P's shard (checked against fp64 on 2 and 4 ranks). Forward and dq "
        "are correct; its time and memory still measure the full algorithm."
    ),
}


class Unavailable(Exception):
    """A peer that cannot run here; the message says why and goes into the results."""


@dataclass
class Method:
    name: str
    positions: Tensor  # original sequence positions this rank holds, in local order
    attend: Callable[[Tensor, Tensor, Tensor], Tensor]  # [B, S_local, H, D] x3 -> [B, S_local, H, D]
    note: str


def deepspeed_ulysses(seq_len: int) -> Method:
    try:
        import deepspeed
        from deepspeed.sequence.layer import DistributedAttention
    except ImportError as error:
        raise Unavailable(f"deepspeed does not import: {error}") from error
    deepspeed.init_distributed(dist_backend="gloo")  # adopts the process group that is already up

    def local_attention(q, k, v):
        # DeepSpeed hands [B, S, H/P, D]; SDPA takes [B, H, S, D].
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return out.transpose(1, 2)

    # Batch-first layout: scatter heads (dim 2), gather sequence (dim 1).
    layer = DistributedAttention(local_attention, dist.group.WORLD, scatter_idx=2, gather_idx=1)
    size, rank = dist.get_world_size(), dist.get_rank()
    per_rank = seq_len // size
    positions = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    note = f"deepspeed {metadata.version('deepspeed')} DistributedAttention + torch SDPA (CPU flash)"
    return Method("deepspeed-ulysses", positions, lambda q, k, v: layer(q, k, v, 0), note)


def torch_ring(seq_len: int) -> Method:
    try:
        from torch.distributed.tensor.experimental._attention import set_rotate_method
        from torch.distributed.tensor.experimental._context_parallel._attention import (
            _templated_ring_attention,
            _templated_ring_attention_backward,
        )
    except ImportError as error:
        raise Unavailable(f"torch {torch.__version__} has no _templated_ring_attention: {error}") from error

    # The default all-gather rotation holds every rank's K/V at once; all-to-all passes them around the ring.
    set_rotate_method("alltoall")
    group = dist.group.WORLD
    forward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    backward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    class TorchRing(torch.autograd.Function):
        # The private API is forward/backward functions without autograd; torch's context_parallel() wires them
        # in through DTensor dispatch, which has no sharding rule for the CPU flash op.
        @staticmethod
        def forward(ctx, q, k, v):
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # torch's layout: [B, H, S, D], seq_dim 2
            out, lse = _templated_ring_attention(group, 2, forward_op, q, k, v, is_causal=True)[:2]
            ctx.save_for_backward(q, k, v, out, lse)
            return out.transpose(1, 2)

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            dout = dout.contiguous().transpose(1, 2)
            grads = _templated_ring_attention_backward(
                group, 2, backward_op, dout, "grad_out", q, k, v, out, lse, True, dropout_p=0.0
            )[:3]
            return tuple(g.transpose(1, 2) for g in grads)

    # Its head-tail load balancer gives rank r chunks r and 2P-1-r: our zigzag.
    positions = shard_indices(seq_len, ring_size=dist.get_world_size(), ring_rank=dist.get_rank(), layout="zigzag")
    note = "torch private _templated_ring_attention(+_backward), head-tail balance, all-to-all rotation, CPU flash"
    return Method("torch-ring", positions, TorchRing.apply, note)


def ring_attention_pytorch(seq_len: int) -> Method:
    try:
        from ring_attention_pytorch import ring_flash_attn
    except ImportError as error:
        raise Unavailable(f"not installed ({error}); install the bench extra: pip install -e '.[bench]'") from error
    size, rank = dist.get_world_size(), dist.get_rank()
    per_rank = seq_len // size
    bucket = min(RING_ATTENTION_PYTORCH_BUCKET, per_rank)
    if per_rank % bucket:
        raise Unavailable(f"local length {per_rank} is not a multiple of its bucket size {bucket}")
    # Its striped layout (RingAttention's auto_shard_seq): rearrange 'b (i j) -> b (j i)' with i = bucket size,
    # then cut contiguously over ranks. Causal work is balanced by the stripes.
    striped = torch.arange(seq_len).view(bucket, seq_len // bucket).t().reshape(-1)
    positions = striped[rank * per_rank : (rank + 1) * per_rank]

    def attend(q, k, v):
        return ring_flash_attn(q, k, v, causal=True, bucket_size=bucket, ring_reduce_col=True, striped_ring_attn=True)

    note = (
        f"ring-attention-pytorch {metadata.version('ring-attention-pytorch')} ring_flash_attn, striped, "
        f"bucket {bucket} (pure PyTorch einsum on CPU)"
    )
    return Method("ring-attention-pytorch", positions, attend, note)


PEERS = {
    "deepspeed-ulysses": deepspeed_ulysses,
    "torch-ring": torch_ring,
    "ring-attention-pytorch": ring_attention_pytorch,
}


def build_peers(seq_len: int) -> tuple[list[Method], dict[str, str]]:
    """Every peer that builds here, and why each other one does not (same order on every rank)."""
    methods, unavailable = [], {}
    for name, build in PEERS.items():
        try:
            methods.append(build(seq_len))
        except Unavailable as reason:
            unavailable[name] = str(reason)
    return methods, unavailable


def peer_versions() -> dict[str, str]:
    found = {}
    for package in ("deepspeed", "ring-attention-pytorch"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found
