"""Document-masked block attention on the aten path: one flash call per document, so masked-out work costs nothing.

Packed data gives every batch row a few contiguous documents. A query attends only to keys of its own document,
so the attention of a row is the independent attention of each document's query rows on its key rows. Each of
those is one call of torch's CPU flash op: causal when the document's query and key rows start at the same
position (then top-left causal inside the document is the block's causal mask), full when every key of the
document lies at or before its first query, none when every key lies after its last query. Any other row (ids
that are not contiguous runs, or a causal document whose rows are offset) takes the exact dense masked path of
kernels.reference, correct but slow.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.reference import reference_attention_backward, reference_attention_forward

# (q start, q end, k start, k end, causal) of one document inside one batch row.
Segment = tuple[int, int, int, int, bool]


def check_document_ids(q: Tensor, k: Tensor, q_docs: Tensor | None, k_docs: Tensor | None) -> None:
    """One clear ValueError for document ids that do not fit q [B, Sq, ...] and k [B, Sk, ...]."""
    if (q_docs is None) != (k_docs is None):
        raise ValueError("document ids: pass both q_docs and k_docs or neither (use the same ids for self-attention)")
    if q_docs is None:
        return
    for name, ids, x in (("q_docs", q_docs, q), ("k_docs", k_docs, k)):
        if ids.shape != x.shape[:2]:
            raise ValueError(f"{name} has shape {tuple(ids.shape)}; it must be [B, S] = {tuple(x.shape[:2])}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"{name} has dtype {ids.dtype}; document ids must be integers (use torch.int64)")


def _runs(ids: list[int]) -> dict[int, tuple[int, int]] | None:
    """Document id -> [start, end) of its one contiguous run; None if some id occurs in two runs."""
    runs: dict[int, tuple[int, int]] = {}
    start = 0
    for pos in range(1, len(ids) + 1):
        if pos == len(ids) or ids[pos] != ids[start]:
            if ids[start] in runs:
                return None
            runs[ids[start]] = (start, pos)
            start = pos
    return runs


def document_segments(q_docs: Tensor, k_docs: Tensor, causal: bool) -> list[list[Segment] | None]:
    """Per batch row, the flash calls that make up its document-masked attention; None where the row needs the
    dense fallback. q_docs [B, Sq], k_docs [B, Sk]."""
    plans: list[list[Segment] | None] = []
    for q_row, k_row in zip(q_docs.tolist(), k_docs.tolist(), strict=True):
        q_runs, k_runs = _runs(q_row), _runs(k_row)
        if q_runs is None or k_runs is None:
            plans.append(None)
            continue
        segments: list[Segment] | None = []
        for doc, (qs, qe) in q_runs.items():
            if doc not in k_runs:
                continue  # no key of this document here: its rows stay out 0, lse -inf
            ks, ke = k_runs[doc]
            if not causal or ke - 1 <= qs:
                segments.append((qs, qe, ks, ke, False))
            elif qs == ks:
                segments.append((qs, qe, ks, ke, True))
            elif ks >= qe:
                continue  # every key comes after every query
            else:
                segments = None  # causal diagonal offset inside the document
                break
        plans.append(segments)
    return plans


def _flash_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None) -> tuple[Tensor, Tensor]:
    # q: [1, Sq, H, D]; k, v: [1, Sk, H, D] -> out [1, Sq, H, D], lse [1, H, Sq]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale
    )[:2]
    return out.transpose(1, 2), lse


def document_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, q_docs: Tensor, k_docs: Tensor, *, causal: bool, scale: float | None
) -> tuple[Tensor, Tensor]:
    """q: [B, Sq, H, D]; k, v: [B, Sk, H, D]; q_docs [B, Sq], k_docs [B, Sk] -> out [B, Sq, H, D], lse [B, H, Sq]."""
    acc = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=acc, device=q.device)
    for b, segments in enumerate(document_segments(q_docs, k_docs, causal)):
        rows = slice(b, b + 1)
        if segments is None:
            out[rows], lse[rows] = reference_attention_forward(
                q[rows], k[rows], v[rows], causal=causal, scale=scale, q_docs=q_docs[rows], k_docs=k_docs[rows]
            )
            continue
        for qs, qe, ks, ke, seg_causal in segments:
            out[rows, qs:qe], lse[rows, :, qs:qe] = _flash_forward(
                q[rows, qs:qe], k[rows, ks:ke], v[rows, ks:ke], seg_causal, scale
            )
    return out, lse


def document_attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, q_docs: Tensor, k_docs: Tensor, *,
    causal: bool, scale: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """dout, out: [B, Sq, H, D]; lse: [B, H, Sq] (global) -> dq [B, Sq, H, D], dk, dv [B, Sk, H, D]."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b, segments in enumerate(document_segments(q_docs, k_docs, causal)):
        rows = slice(b, b + 1)
        if segments is None:
            dq[rows], dk[rows], dv[rows] = reference_attention_backward(
                dout[rows], q[rows], k[rows], v[rows], out[rows], lse[rows], causal=causal, scale=scale,
                q_docs=q_docs[rows], k_docs=k_docs[rows],
            )
            continue
        # Each query row and each key row belongs to one segment, so gradients are written, never summed.
        for qs, qe, ks, ke, seg_causal in segments:
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dout[rows, qs:qe].transpose(1, 2), q[rows, qs:qe].transpose(1, 2), k[rows, ks:ke].transpose(1, 2),
                v[rows, ks:ke].transpose(1, 2), out[rows, qs:qe].transpose(1, 2),
                lse[rows, :, qs:qe].contiguous(), 0.0, seg_causal, scale=scale,
            )
            dq[rows, qs:qe], dk[rows, ks:ke], dv[rows, ks:ke] = (g.transpose(1, 2) for g in grads)
    return dq, dk, dv
