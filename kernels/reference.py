"""Float64-capable reference twins of the block attention kernels, written out from the definitions.

Tests compare every fast path (torch's CPU flash op, Triton) against these. They materialise the full score
matrix, so they are only for small shapes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _scores(q: Tensor, k: Tensor, causal: bool, scale: float | None) -> Tensor:
    # q: [B, Sq, H, D]; k: [B, Sk, H, D] -> scores [B, H, Sq, Sk]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        # Top-left aligned, as torch's flash kernels: query i sees keys 0..i.
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores


def reference_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """q: [B, Sq, H, D]; k, v: [B, Sk, H, D] -> out [B, Sq, H, D] (q.dtype), lse [B, H, Sq] (>= fp32)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = _scores(q.to(acc), k.to(acc), causal, scale)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.to(acc))
    return out.to(q.dtype), lse


def reference_attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    causal: bool,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the block given the (possibly global) out and lse, exactly as the flash backward uses them.

    dout, out: [B, Sq, H, D]; lse: [B, H, Sq] -> dq [B, Sq, H, D], dk, dv [B, Sk, H, D] in the input dtypes.
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    scale_value = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qa, ka, va, dout_a, out_a = (t.to(acc) for t in (q, k, v, dout, out))
    probs = torch.exp(_scores(qa, ka, causal, scale) - lse.to(acc)[..., None])  # [B, H, Sq, Sk]
    dv = torch.einsum("bhqk,bqhd->bkhd", probs, dout_a)
    dprobs = torch.einsum("bqhd,bkhd->bhqk", dout_a, va)
    delta = (dout_a * out_a).sum(-1).transpose(1, 2)  # [B, H, Sq]
    dscores = probs * (dprobs - delta[..., None]) * scale_value
    dq = torch.einsum("bhqk,bkhd->bqhd", dscores, ka)
    dk = torch.einsum("bhqk,bqhd->bkhd", dscores, qa)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
