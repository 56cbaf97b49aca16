"""Float64-capable reference twins of the block attention kernels, written out from the definitions.

Tests compare every fast path (torch's CPU flash op, Triton) against these. They materialise the full score
matrix, so they are only for small shapes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def allowed_pairs(sq: int, sk: int, causal: bool, q_docs: Tensor | None, k_docs: Tensor | None,
                  device: torch.device) -> Tensor | None:
    """Which (query, key) pairs a block attends: [B or 1, 1, Sq, Sk] bool, None for all of them.

    Causal is top-left aligned, as torch's flash kernels: query i sees keys 0..i. With document ids
    (q_docs [B, Sq], k_docs [B, Sk]) a query sees only keys of its own document."""
    mask = torch.ones(sq, sk, dtype=torch.bool, device=device).tril()[None, None] if causal else None
    if q_docs is not None:
        same = (q_docs[:, :, None] == k_docs[:, None, :])[:, None]
        mask = same if mask is None else mask & same
    return mask


def _scores(q: Tensor, k: Tensor, causal: bool, scale: float | None, q_docs: Tensor | None = None,
            k_docs: Tensor | None = None) -> Tensor:
    # q: [B, Sq, H, D]; k: [B, Sk, H, D] -> scores [B, H, Sq, Sk], -inf where the block does not attend
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    mask = allowed_pairs(q.shape[1], k.shape[1], causal, q_docs, k_docs, q.device)
    return scores if mask is None else scores.masked_fill(~mask, float("-inf"))


def reference_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float | None = None,
    q_docs: Tensor | None = None, k_docs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """q: [B, Sq, H, D]; k, v: [B, Sk, H, D] -> out [B, Sq, H, D] (q.dtype), lse [B, H, Sq] (>= fp32).

    A query row with no key to attend (document ids) gets out 0 and lse -inf."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = _scores(q.to(acc), k.to(acc), causal, scale, q_docs, k_docs)
    lse = torch.logsumexp(scores, dim=-1)
    # exp(-inf - -inf) would be NaN for an empty row: its probabilities are zero.
    probs = torch.exp(scores - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])
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
    q_docs: Tensor | None = None,
    k_docs: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the block given the (possibly global) out and lse, exactly as the flash backward uses them.

    dout, out: [B, Sq, H, D]; lse: [B, H, Sq] -> dq [B, Sq, H, D], dk, dv [B, Sk, H, D] in the input dtypes.
    """
    acc = torch.promote_types(q.dtype, torch.float32)
    scale_value = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qa, ka, va, dout_a, out_a = (t.to(acc) for t in (q, k, v, dout, out))
    lse_a = lse.to(acc)
    scores = _scores(qa, ka, causal, scale, q_docs, k_docs)
    probs = torch.exp(scores - lse_a.masked_fill(torch.isneginf(lse_a), 0.0)[..., None])  # [B, H, Sq, Sk]
    dv = torch.einsum("bhqk,bqhd->bkhd", probs, dout_a)
    dprobs = torch.einsum("bqhd,bkhd->bhqk", dout_a, va)
    delta = (dout_a * out_a).sum(-1).transpose(1, 2)  # [B, H, Sq]
    dscores = probs * (dprobs - delta[..., None]) * scale_value
    dq = torch.einsum("bhqk,bkhd->bqhd", dscores, ka)
    dk = torch.einsum("bhqk,bqhd->bkhd", dscores, qa)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
