"""Document-masked block attention on the aten path: flash calls per document, so masked-out work costs nothing.

Packed data gives every batch row a few contiguous documents. A query attends only to keys of its own document,
so the attention of a row is the independent attention of each document's query rows on its key rows: causal
when the document's query and key rows start at the same position (then top-left causal inside the document is
the block's causal mask), full when every key of the document lies at or before its first query, nothing when
every key lies after its last query. Documents of one shape (over all batch rows) are gathered into one batch
for a single call of torch's CPU flash op: each call has a fixed cost (a parallel region), which dominates for
short documents. Any other row (ids that are not contiguous runs, or a causal document whose rows are offset)
takes the exact dense masked path of kernels.reference, correct but slow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kernels.reference import reference_attention_backward, reference_attention_forward


@dataclass(frozen=True)
class Rows:
    """Documents of `length` rows each in a flattened [N, ...] tensor (N = B * S), one starting at each of `starts`."""

    starts: list[int]
    length: int

    def _back_to_back(self) -> bool:
        # Documents that follow each other directly are a [len(starts), length] view: no gather, no scatter.
        return all(b - a == self.length for a, b in zip(self.starts, self.starts[1:], strict=False))

    def index(self, device: torch.device) -> Tensor:
        """[len(starts) * length] flat row indices."""
        starts = torch.tensor(self.starts, dtype=torch.int64, device=device)
        return (starts[:, None] + torch.arange(self.length, device=device)).flatten()

    def take(self, flat: Tensor) -> Tensor:
        """flat [N, ...] -> [len(starts), length, ...]. index_select: advanced indexing is several times slower."""
        if self._back_to_back():
            return flat.narrow(0, self.starts[0], len(self.starts) * self.length).view(-1, self.length, *flat.shape[1:])
        return flat.index_select(0, self.index(flat.device)).view(-1, self.length, *flat.shape[1:])

    def put(self, flat: Tensor, values: Tensor) -> None:
        """flat[these rows] = values [len(starts), length, ...], in place."""
        if self._back_to_back():
            flat.narrow(0, self.starts[0], len(self.starts) * self.length).copy_(values.flatten(0, 1))
        else:
            flat.index_copy_(0, self.index(flat.device), values.flatten(0, 1))


@dataclass
class DocumentPlan:
    """How a document-masked block is computed: flash calls on gathered documents, and rows done densely.

    groups: (causal, query rows, key rows): documents of one shape, so one flash call serves them all.
    dense_rows: batch rows that take the exact dense masked path instead.
    q_idle, k_idle: flat query / key rows no group or dense row touches (no key; no query): they stay zero.
    """

    groups: list[tuple[bool, Rows, Rows]] = field(default_factory=list)
    dense_rows: list[int] = field(default_factory=list)
    q_idle: Tensor | None = None
    k_idle: Tensor | None = None


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


def _row_segments(q_row: list[int], k_row: list[int], causal: bool) -> list[tuple[int, int, int, int, bool]] | None:
    # (q start, q end, k start, k end, causal) per document of one batch row; None: use the dense path.
    q_runs, k_runs = _runs(q_row), _runs(k_row)
    if q_runs is None or k_runs is None:
        return None
    segments = []
    for doc, (qs, qe) in q_runs.items():
        if doc not in k_runs:
            continue  # no key of this document here: its rows stay out 0, lse -inf
        ks, ke = k_runs[doc]
        if not causal or ke - 1 <= qs:
            segments.append((qs, qe, ks, ke, False))
        elif qs == ks:
            segments.append((qs, qe, ks, ke, True))
        elif ks < qe:
            return None  # causal diagonal offset inside the document
        # else every key comes after every query: nothing to compute
    return segments


def plan_documents(q_docs: Tensor, k_docs: Tensor, causal: bool) -> DocumentPlan:
    """q_docs [B, Sq], k_docs [B, Sk] -> the flash calls (grouped by document shape) and the dense rows."""
    seq_q, seq_k = q_docs.shape[1], k_docs.shape[1]
    plan = DocumentPlan()
    starts: dict[tuple[int, int, bool], list[tuple[int, int]]] = {}
    for b, (q_row, k_row) in enumerate(zip(q_docs.tolist(), k_docs.tolist(), strict=True)):
        segments = _row_segments(q_row, k_row, causal)
        if segments is None:
            plan.dense_rows.append(b)
            continue
        for qs, qe, ks, ke, seg_causal in segments:
            starts.setdefault((qe - qs, ke - ks, seg_causal), []).append((b * seq_q + qs, b * seq_k + ks))
    busy = [torch.zeros(ids.numel(), dtype=torch.bool) for ids in (q_docs, k_docs)]
    for b in plan.dense_rows:
        busy[0][b * seq_q:(b + 1) * seq_q] = busy[1][b * seq_k:(b + 1) * seq_k] = True
    for (len_q, len_k, seg_causal), pairs in starts.items():
        q_rows, k_rows = Rows([p[0] for p in pairs], len_q), Rows([p[1] for p in pairs], len_k)
        plan.groups.append((seg_causal, q_rows, k_rows))
        for used, rows in zip(busy, (q_rows, k_rows), strict=True):
            used[rows.index(used.device)] = True
    plan.q_idle, plan.k_idle = ((~used).nonzero().flatten().to(q_docs.device) for used in busy)
    return plan


def document_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, q_docs: Tensor, k_docs: Tensor, *, causal: bool, scale: float | None
) -> tuple[Tensor, Tensor]:
    """q: [B, Sq, H, D]; k, v: [B, Sk, H, D]; q_docs [B, Sq], k_docs [B, Sk] -> out [B, Sq, H, D], lse [B, H, Sq]."""
    batch, seq_q, heads, _ = q.shape
    plan = plan_documents(q_docs, k_docs, causal)
    q_flat, k_flat, v_flat = (t.flatten(0, 1) for t in (q, k, v))
    # Every row is written by a group or a dense row, except the idle ones: only those are filled.
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    acc = torch.promote_types(q.dtype, torch.float32)
    lse = torch.empty(batch, seq_q, heads, dtype=acc, device=q.device)  # transposed until the end
    out_flat, lse_flat = out.view(-1, *q.shape[2:]), lse.view(-1, heads)
    out_flat.index_fill_(0, plan.q_idle, 0.0)
    lse_flat.index_fill_(0, plan.q_idle, float("-inf"))
    for seg_causal, q_rows, k_rows in plan.groups:
        # documents of one shape as a batch: [n, Lq, H, D] against [n, Lk, H, D]
        seg_out, seg_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_rows.take(q_flat).transpose(1, 2), k_rows.take(k_flat).transpose(1, 2),
            k_rows.take(v_flat).transpose(1, 2), 0.0, seg_causal, scale=scale,
        )[:2]
        q_rows.put(out_flat, seg_out.transpose(1, 2))
        q_rows.put(lse_flat, seg_lse.transpose(1, 2))
    lse = lse.transpose(1, 2).contiguous()
    for b in plan.dense_rows:
        rows = slice(b, b + 1)
        out[rows], lse[rows] = reference_attention_forward(
            q[rows], k[rows], v[rows], causal=causal, scale=scale, q_docs=q_docs[rows], k_docs=k_docs[rows]
        )
    return out, lse


def document_attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, q_docs: Tensor, k_docs: Tensor, *,
    causal: bool, scale: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """dout, out: [B, Sq, H, D]; lse: [B, H, Sq] (global) -> dq [B, Sq, H, D], dk, dv [B, Sk, H, D]."""
    plan = plan_documents(q_docs, k_docs, causal)
    dout_flat, q_flat, out_flat, k_flat, v_flat = (t.flatten(0, 1) for t in (dout, q, out, k, v))
    lse_flat = lse.transpose(1, 2).flatten(0, 1)  # [B * Sq, H]
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    dq_flat, dk_flat, dv_flat = (t.view(-1, *t.shape[2:]) for t in (dq, dk, dv))
    for flat, idle in ((dq_flat, plan.q_idle), (dk_flat, plan.k_idle), (dv_flat, plan.k_idle)):
        flat.index_fill_(0, idle, 0.0)
    # Each query row and each key row belongs to one document, so gradients are written, never summed.
    for seg_causal, q_rows, k_rows in plan.groups:
        seg_dout, seg_q, seg_out = (q_rows.take(t).transpose(1, 2) for t in (dout_flat, q_flat, out_flat))
        seg_k, seg_v = (k_rows.take(t).transpose(1, 2) for t in (k_flat, v_flat))
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            seg_dout, seg_q, seg_k, seg_v, seg_out, q_rows.take(lse_flat).transpose(1, 2).contiguous(), 0.0,
            seg_causal, scale=scale,
        )
        for flat, rows, grad in zip((dq_flat, dk_flat, dv_flat), (q_rows, k_rows, k_rows), grads, strict=True):
            rows.put(flat, grad.transpose(1, 2))
    for b in plan.dense_rows:
        rows = slice(b, b + 1)
        dq[rows], dk[rows], dv[rows] = reference_attention_backward(
            dout[rows], q[rows], k[rows], v[rows], out[rows], lse[rows], causal=causal, scale=scale,
            q_docs=q_docs[rows], k_docs=k_docs[rows],
        )
    return dq, dk, dv
