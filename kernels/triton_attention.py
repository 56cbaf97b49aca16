"""Triton block attention (FlashAttention-2 style) that returns its log-sum-exp, and the backward that takes it.

Forward tiles queries (BLOCK_M) against keys (BLOCK_N) with an online softmax in fp32. Backward is three
kernels: delta = rowsum(dout * out), then one kernel per key block accumulating dk, dv, and one per query block
accumulating dq. Keeping dq in its own kernel costs a second pass over the scores but needs no atomics, so
gradients are deterministic run to run.

The backward never recomputes the normaliser: probabilities are exp(s - lse) with the lse it is given, which in
ring attention is the GLOBAL lse over all key blocks. Causal masking is top-left aligned (query i sees keys
0..i); blocks entirely above the diagonal are skipped and only blocks crossing it (or the key tail) pay for a
mask.

Document ids (q_docs, k_docs) mask pairs of different documents in every tile. When the host finds them sorted
(packed data: each document one run), a tile pair whose document ranges, bounded by the ids of its first and
last rows, do not intersect is skipped: the masked work costs (almost) nothing. Unsorted ids are still exact.

Grouped-query attention: k, v may have fewer heads than q (Hkv dividing Hq). Query head h reads K/V head
h // (Hq // Hkv), as `repeat_interleave` would lay them out, but K/V are never expanded: the forward and dq
kernels index the shared head, and each dk, dv program loops over the query heads of its group.

Under TRITON_INTERPRET=1 (set before this module is imported) the kernels run on CPU tensors. The interpreter's
`tl.dot` is wrong for 16-bit operands, so interpreted launches upcast tiles to fp32 before every dot.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

from kernels.document_attention import check_document_ids

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    return tl.dot(a.to(tl.float32), b.to(tl.float32)) if UPCAST else tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_rows(base, rows, stride_s, n_rows, offs_d, HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr):
    # [len(rows), BLOCK_D] tile of a [S, D] slice; padded rows and head-dim columns read as zero.
    ptrs = base + rows[:, None].to(tl.int64) * stride_s + offs_d[None, :]
    mask = offs_d[None, :] < HEAD_DIM
    if CHECK_ROWS:
        mask = mask & (rows[:, None] < n_rows)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _visible(offs_m, offs_n, seq_k, q_docs, k_docs, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr):
    # [BLOCK_M, BLOCK_N] mask of (query, key) pairs that exist and are allowed to attend.
    mask = offs_n[None, :] < seq_k
    if CAUSAL:
        mask = mask & (offs_m[:, None] >= offs_n[None, :])
    if HAS_DOCS:
        mask = mask & (q_docs[:, None] == k_docs[None, :])
    return mask


@triton.jit
def _load_docs(docs_row, offs, seq, HAS_DOCS: tl.constexpr):
    # Document ids of rows `offs` (padding reads -1; it is masked by the bounds checks anyway); 0 without ids.
    if HAS_DOCS:
        return tl.load(docs_row + offs, mask=offs < seq, other=-1)
    return offs * 0


@triton.jit
def _docs_meet(q_docs_row, k_docs_row, q_lo, q_hi, k_lo, k_hi, SORTED: tl.constexpr):
    # Whether query rows [q_lo, q_hi) and keys [k_lo, k_hi) can share a document. Sorted ids: the first and last
    # ids bound each tile's documents; unsorted (or no) ids: assume they can.
    if SORTED:
        q_first = tl.load(q_docs_row + q_lo)
        q_last = tl.load(q_docs_row + q_hi - 1)
        k_first = tl.load(k_docs_row + k_lo)
        k_last = tl.load(k_docs_row + k_hi - 1)
        meet = (k_last >= q_first) & (k_first <= q_last)
    else:
        meet = True
    return meet


@triton.jit
def _fwd_loop(acc, l_i, m_i, q, q_docs, k_base, v_base, q_docs_row, k_docs_row, stride_ks, stride_vs, offs_m, offs_d,
              q_lo, q_hi, seq_k, qk_scale, lo, hi, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, SORTED: tl.constexpr, UPCAST: tl.constexpr,
              PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        if _docs_meet(q_docs_row, k_docs_row, q_lo, q_hi, start_n, tl.minimum(start_n + BLOCK_N, seq_k),
                      SORTED):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_rows(k_base, offs_n, stride_ks, seq_k, offs_d, HEAD_DIM, MASKED)
            v = _load_rows(v_base, offs_n, stride_vs, seq_k, offs_d, HEAD_DIM, MASKED)
            s = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale  # log2 units
            if MASKED:
                k_docs = _load_docs(k_docs_row, offs_n, seq_k, HAS_DOCS)
                s = tl.where(_visible(offs_m, offs_n, seq_k, q_docs, k_docs, CAUSAL, HAS_DOCS), s, float("-inf"))
            # Without document ids m_new is finite from the first block on: with top-left causal masking every
            # row sees key 0, in the first block processed. With them a row may have seen no key yet: shift by 0
            # then, so exp2(-inf - shift) = 0 rather than NaN, while m_i stays -inf for the empty row.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            shift = m_new
            if HAS_DOCS:
                shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - shift)
            p = tl.exp2(s - shift[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PRECISION)
            m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, QDocs, KDocs,
                stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                num_heads, group, seq_q, seq_k, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, SORTED: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    off_hk = off_h // group  # the K/V head this query head shares with its group
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qs, seq_q, offs_d, HEAD_DIM, True)
    # Document ids are [B, S] contiguous.
    q_docs_row = QDocs + off_b * seq_q
    k_docs_row = KDocs + off_b * seq_k
    q_docs = _load_docs(q_docs_row, offs_m, seq_q, HAS_DOCS)
    q_hi = tl.minimum(start_m + BLOCK_M, seq_q)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # Key blocks wholly below the diagonal and inside seq_k need no mask; the rest (diagonal, tail) do. With
    # document ids every block may hold a document boundary, so all take the masked loop.
    if CAUSAL:
        full_end = (tl.minimum(start_m, seq_k) // BLOCK_N) * BLOCK_N
        end = tl.minimum(start_m + BLOCK_M, seq_k)
    else:
        full_end = (seq_k // BLOCK_N) * BLOCK_N
        end = seq_k
    if HAS_DOCS:
        full_end = 0
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, q_docs, k_base, v_base, q_docs_row, k_docs_row, stride_ks,
                              stride_vs, offs_m, offs_d, start_m, q_hi, seq_k, qk_scale, 0, full_end, HEAD_DIM,
                              BLOCK_N, CAUSAL, False, HAS_DOCS, SORTED, UPCAST, PRECISION)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, q_docs, k_base, v_base, q_docs_row, k_docs_row, stride_ks,
                              stride_vs, offs_m, offs_d, start_m, q_hi, seq_k, qk_scale, full_end, end, HEAD_DIM,
                              BLOCK_N, CAUSAL, True, HAS_DOCS, SORTED, UPCAST, PRECISION)

    # Rows that saw no key: out = 0 and lse = -inf, so an LSE merge gives them zero weight.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    row_ok = offs_m < seq_q
    o_ptrs = (Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None].to(tl.int64) * stride_os
              + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_delta_kernel(Out, DOut, Delta, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
                      num_heads, seq_q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(Out + off_b * stride_ob + off_h * stride_oh, offs_m, stride_os, seq_q, offs_d, HEAD_DIM, True)
    do = _load_rows(DOut + off_b * stride_db + off_h * stride_dh, offs_m, stride_ds, seq_q, offs_d, HEAD_DIM, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * seq_q + offs_m, delta, mask=offs_m < seq_q)


@triton.jit
def _load_row_stats(Lse, Delta, offs_m, seq_q):
    # lse in log2 units. Padded rows and rows with lse = -inf (no visible key) get +inf, so exp2(s - lse) = 0.
    row_ok = offs_m < seq_q
    lse = tl.load(Lse + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(Delta + offs_m, mask=row_ok, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_loop(dk, dv, k, v, k_docs, q_base, do_base, q_docs_row, k_docs_row, stride_qs, stride_ds, Lse, Delta,
               offs_n, offs_d, k_lo, k_hi, seq_q, seq_k, qk_scale, lo, hi, HEAD_DIM: tl.constexpr,
               BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, HAS_DOCS: tl.constexpr,
               SORTED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        if _docs_meet(q_docs_row, k_docs_row, start_m, tl.minimum(start_m + BLOCK_M, seq_q), k_lo, k_hi, SORTED):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_rows(q_base, offs_m, stride_qs, seq_q, offs_d, HEAD_DIM, True)
            do = _load_rows(do_base, offs_m, stride_ds, seq_q, offs_d, HEAD_DIM, True)
            lse, delta = _load_row_stats(Lse, Delta, offs_m, seq_q)
            # Transposed scores [BLOCK_N, BLOCK_M] so dk, dv accumulate without transposing p.
            p_t = tl.exp2(_dot(k, tl.trans(q), UPCAST, PRECISION) * qk_scale - lse[None, :])
            if MASKED:
                q_docs = _load_docs(q_docs_row, offs_m, seq_q, HAS_DOCS)
                visible = _visible(offs_m, offs_n, seq_k, q_docs, k_docs, CAUSAL, HAS_DOCS)
                p_t = tl.where(tl.trans(visible), p_t, 0.0)
            dv += _dot(p_t.to(do.dtype), do, UPCAST, PRECISION)
            dp_t = _dot(v, tl.trans(do), UPCAST, PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _dot(ds_t.to(q.dtype), q, UPCAST, PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DOut, Lse, Delta, DK, DV, QDocs, KDocs,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                     stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                     num_kv_heads, group, seq_q, seq_k, sm_scale, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, SORTED: tl.constexpr, UPCAST: tl.constexpr,
                     PRECISION: tl.constexpr):
    # One program per (key block, batch, K/V head).
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_kv_heads).to(tl.int64)
    off_hk = (pid_bh % num_kv_heads).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + off_b * stride_kb + off_hk * stride_kh, offs_n, stride_ks, seq_k, offs_d, HEAD_DIM, True)
    v = _load_rows(V + off_b * stride_vb + off_hk * stride_vh, offs_n, stride_vs, seq_k, offs_d, HEAD_DIM, True)
    q_docs_row = QDocs + off_b * seq_q
    k_docs_row = KDocs + off_b * seq_k
    k_docs = _load_docs(k_docs_row, offs_n, seq_k, HAS_DOCS)
    k_hi = tl.minimum(start_n + BLOCK_N, seq_k)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Causal: queries before start_n never see this key block; query blocks crossing the diagonal need the
    # mask; later ones see every key. Padded keys need no mask here because their rows are never stored. With
    # document ids every query block takes the masked loop.
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        diag_end = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, seq_q)
    else:
        lo = 0
        diag_end = 0
    if HAS_DOCS:
        diag_end = seq_q
    # The group's query heads all read this K/V head: their contributions are summed here, in the fp32 dk, dv,
    # and rounded to the input dtype once at the store. Summing per-head results after a 16-bit rounding would
    # add one rounding per head; one writer per block also needs no atomics, so the sum is deterministic.
    for g in range(group):
        off_h = off_hk * group + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DOut + off_b * stride_db + off_h * stride_dh
        # lse and delta are [B, Hq, Sq] contiguous.
        lse_row = Lse + (off_b * num_kv_heads * group + off_h) * seq_q
        delta_row = Delta + (off_b * num_kv_heads * group + off_h) * seq_q
        dk, dv = _dkdv_loop(dk, dv, k, v, k_docs, q_base, do_base, q_docs_row, k_docs_row, stride_qs, stride_ds,
                            lse_row, delta_row, offs_n, offs_d, start_n, k_hi, seq_q, seq_k, qk_scale, lo, diag_end,
                            HEAD_DIM, BLOCK_M, CAUSAL, True, HAS_DOCS, SORTED, UPCAST, PRECISION)
        dk, dv = _dkdv_loop(dk, dv, k, v, k_docs, q_base, do_base, q_docs_row, k_docs_row, stride_qs, stride_ds,
                            lse_row, delta_row, offs_n, offs_d, start_n, k_hi, seq_q, seq_k, qk_scale, diag_end, seq_q,
                            HEAD_DIM, BLOCK_M, CAUSAL, False, HAS_DOCS, SORTED, UPCAST, PRECISION)

    store_mask = (offs_n[:, None] < seq_k) & (offs_d[None, :] < HEAD_DIM)
    rows = offs_n[:, None].to(tl.int64)
    dk_ptrs = DK + off_b * stride_dkb + off_hk * stride_dkh + rows * stride_dks + offs_d[None, :]
    dv_ptrs = DV + off_b * stride_dvb + off_hk * stride_dvh + rows * stride_dvs + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=store_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def _dq_loop(dq, q, do, lse, delta, q_docs, k_base, v_base, q_docs_row, k_docs_row, stride_ks, stride_vs, offs_m,
             offs_d, q_lo, q_hi, seq_k, qk_scale, lo, hi, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
             CAUSAL: tl.constexpr, MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, SORTED: tl.constexpr,
             UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        if _docs_meet(q_docs_row, k_docs_row, q_lo, q_hi, start_n, tl.minimum(start_n + BLOCK_N, seq_k), SORTED):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_rows(k_base, offs_n, stride_ks, seq_k, offs_d, HEAD_DIM, MASKED)
            v = _load_rows(v_base, offs_n, stride_vs, seq_k, offs_d, HEAD_DIM, MASKED)
            p = tl.exp2(_dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale - lse[:, None])
            if MASKED:
                k_docs = _load_docs(k_docs_row, offs_n, seq_k, HAS_DOCS)
                p = tl.where(_visible(offs_m, offs_n, seq_k, q_docs, k_docs, CAUSAL, HAS_DOCS), p, 0.0)
            dp = _dot(do, tl.trans(v), UPCAST, PRECISION)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, UPCAST, PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DOut, Lse, Delta, DQ, QDocs, KDocs,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                   stride_dqb, stride_dqs, stride_dqh,
                   num_heads, group, seq_q, seq_k, sm_scale, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, SORTED: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qs, seq_q, offs_d, HEAD_DIM, True)
    do = _load_rows(DOut + off_b * stride_db + off_h * stride_dh, offs_m, stride_ds, seq_q, offs_d, HEAD_DIM, True)
    lse, delta = _load_row_stats(Lse + pid_bh.to(tl.int64) * seq_q, Delta + pid_bh.to(tl.int64) * seq_q, offs_m,
                                 seq_q)
    off_hk = off_h // group  # as in the forward
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    q_docs_row = QDocs + off_b * seq_q
    k_docs_row = KDocs + off_b * seq_k
    q_docs = _load_docs(q_docs_row, offs_m, seq_q, HAS_DOCS)
    q_hi = tl.minimum(start_m + BLOCK_M, seq_q)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Same block split as the forward: unmasked below the diagonal, masked across it and on the key tail, and
    # everything masked with document ids.
    if CAUSAL:
        full_end = (tl.minimum(start_m, seq_k) // BLOCK_N) * BLOCK_N
        end = tl.minimum(start_m + BLOCK_M, seq_k)
    else:
        full_end = (seq_k // BLOCK_N) * BLOCK_N
        end = seq_k
    if HAS_DOCS:
        full_end = 0
    dq = _dq_loop(dq, q, do, lse, delta, q_docs, k_base, v_base, q_docs_row, k_docs_row, stride_ks, stride_vs, offs_m,
                  offs_d, start_m, q_hi, seq_k, qk_scale, 0, full_end, HEAD_DIM, BLOCK_N, CAUSAL, False, HAS_DOCS,
                  SORTED, UPCAST, PRECISION)
    dq = _dq_loop(dq, q, do, lse, delta, q_docs, k_base, v_base, q_docs_row, k_docs_row, stride_ks, stride_vs, offs_m,
                  offs_d, start_m, q_hi, seq_k, qk_scale, full_end, end, HEAD_DIM, BLOCK_N, CAUSAL, True, HAS_DOCS,
                  SORTED, UPCAST, PRECISION)

    dq_ptrs = (DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None].to(tl.int64) * stride_dqs
               + offs_d[None, :])
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM))


def _interpreted() -> bool:
    # triton.jit picks interpreter or compiler when this module is imported; the kernel's type records which.
    return not isinstance(_fwd_kernel, JITFunction)


def _prepare(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> tuple[float, int, dict]:
    """Validate inputs; return the softmax scale, the query heads per K/V head and the kernels' launch options."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"triton attention expects q [B, Sq, Hq, D] and k, v [B, Sk, Hkv, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    heads, kv_heads = q.shape[2], k.shape[2]
    group = heads // kv_heads if kv_heads else 1  # no heads at all is an empty problem, not an error
    if group * kv_heads != heads:
        raise ValueError(
            f"triton attention needs the query heads to be a multiple of the K/V heads (grouped-query "
            f"attention); got Hq={heads}, Hkv={kv_heads}"
        )
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"triton attention takes float16, bfloat16 or float32 inputs of one dtype; got q {q.dtype}, "
            f"k {k.dtype}, v {v.dtype} (use backend='reference' for float64)"
        )
    head_dim = q.shape[3]
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"triton attention supports head_dim <= {MAX_HEAD_DIM}; got head_dim={head_dim}")
    interpreted = _interpreted()
    if not q.is_cuda and not interpreted:
        raise ValueError(
            f"triton attention got {q.device} tensors: it needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            "kernels.triton_attention is imported (CPU interpreter, small shapes only)"
        )
    options = {
        "HEAD_DIM": head_dim,
        # Narrow heads are padded (by masked loads) to a power of two that tl.dot accepts.
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "UPCAST": interpreted,
        # fp32 inputs get full fp32 products; TF32 would silently cost three decimal digits.
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }
    return (1.0 / math.sqrt(head_dim) if scale is None else scale), group, options


def _document_args(
    q: Tensor, q_docs: Tensor | None, k_docs: Tensor | None, dummy: Tensor
) -> tuple[Tensor, Tensor, dict]:
    """-> the two document-id pointers ([B, S] contiguous int64; `dummy` when there are none) and their flags."""
    if q_docs is None:
        return dummy, dummy, {"HAS_DOCS": False, "SORTED": False}
    q_docs, k_docs = (ids.to(device=q.device, dtype=torch.int64).contiguous() for ids in (q_docs, k_docs))
    # Tile skipping bounds a tile's documents by its first and last ids, which holds only for sorted ids.
    is_sorted = all(bool((ids[:, 1:] >= ids[:, :-1]).all()) for ids in (q_docs, k_docs))
    return q_docs, k_docs, {"HAS_DOCS": True, "SORTED": is_sorted}


def _last_dim_contiguous(*tensors: Tensor) -> list[Tensor]:
    # Kernels take batch, sequence and head strides but assume unit stride along D.
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _launch_config(q: Tensor, block_m: int | None, block_n: int | None, forward: bool) -> dict:
    """Tiles, warps and pipeline stages. The loops stage their K/V (forward) or Q/dO (backward) tiles in shared
    memory, one copy per stage: at bf16 tiles, fp32 heads of 128 would want about 256 KB of the 228 KB an H100/H200
    SM has, so wide fp32 heads take half the rows and two stages (sized by that count; not yet measured)."""
    wide_fp32 = q.dtype == torch.float32 and q.shape[3] > 64
    if forward:
        (default_m, default_n), stages = ((64, 64), 2) if wide_fp32 else ((128, 64), 3)
    else:
        (default_m, default_n), stages = ((32, 64), 2) if wide_fp32 else ((64, 64), 2)
    block_m, block_n = block_m or default_m, block_n or default_n
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name}={value}: must be a power of two >= 16")
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4 if q.shape[3] <= 64 else 8, "num_stages": stages}


def triton_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    q_docs: Tensor | None = None,
    k_docs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """q: [B, Sq, Hq, D]; k, v: [B, Sk, Hkv, D] -> out [B, Sq, Hq, D] (q.dtype), lse [B, Hq, Sq] float32.

    Hkv divides Hq: query head h reads K/V head h // (Hq // Hkv). Rows that see no key get out = 0 and
    lse = -inf. block_m / block_n override the tile sizes. q_docs [B, Sq] and k_docs [B, Sk]: document ids, a
    query attends only to keys of its own document.
    """
    scale, group, options = _prepare(q, k, v, scale)
    check_document_ids(q, k, q_docs, k_docs)
    q, k, v = _last_dim_contiguous(q, k, v)
    batch, seq_q, heads, _ = q.shape
    seq_k = k.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(batch, heads, seq_q, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out.zero_(), lse
    config = _launch_config(q, block_m, block_n, forward=True)
    grid = (triton.cdiv(seq_q, config["BLOCK_M"]), batch * heads)
    q_docs, k_docs, doc_flags = _document_args(q, q_docs, k_docs, lse)
    _fwd_kernel[grid](
        q, k, v, out, lse, q_docs, k_docs, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        heads, group, seq_q, seq_k, scale * LOG2E, CAUSAL=causal, **doc_flags, **options, **config,
    )
    return out, lse


def triton_attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    q_docs: Tensor | None = None,
    k_docs: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """dout, out: [B, Sq, Hq, D]; lse: [B, Hq, Sq] (the global one in a ring); k, v: [B, Sk, Hkv, D]
    -> dq [B, Sq, Hq, D], dk, dv [B, Sk, Hkv, D].

    Gradients come back in the input dtypes; all accumulation is fp32, including dk, dv's sum over the query
    heads of a group. q_docs, k_docs: as in the forward.
    """
    scale, group, options = _prepare(q, k, v, scale)
    check_document_ids(q, k, q_docs, k_docs)
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != (q.shape[0], q.shape[2], q.shape[1]):
        raise ValueError(
            f"triton attention backward expects dout, out like q {tuple(q.shape)} and lse [B, Hq, Sq]; got dout "
            f"{tuple(dout.shape)}, out {tuple(out.shape)}, lse {tuple(lse.shape)}"
        )
    dout, out, q, k, v = _last_dim_contiguous(dout, out, q, k, v)
    batch, seq_q, heads, _ = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    lse = lse.to(torch.float32).contiguous()
    delta = torch.empty_like(lse)
    config = _launch_config(q, block_m, block_n, forward=False)
    block_d = options["BLOCK_D"]
    _bwd_delta_kernel[(triton.cdiv(seq_q, config["BLOCK_M"]), batch * heads)](
        out, dout, delta, *_strides(out), *_strides(dout), heads, seq_q,
        HEAD_DIM=options["HEAD_DIM"], BLOCK_M=config["BLOCK_M"], BLOCK_D=block_d,
    )
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))
    q_docs, k_docs, doc_flags = _document_args(q, q_docs, k_docs, lse)
    # Delta is per query head; dk, dv are per K/V head, each program summing over its group.
    _bwd_dkdv_kernel[(triton.cdiv(seq_k, config["BLOCK_N"]), batch * kv_heads)](
        q, k, v, dout, lse, delta, dk, dv, q_docs, k_docs, *common, *_strides(dk), *_strides(dv), kv_heads, group,
        seq_q, seq_k, scale, scale * LOG2E, CAUSAL=causal, **doc_flags, **options, **config,
    )
    _bwd_dq_kernel[(triton.cdiv(seq_q, config["BLOCK_M"]), batch * heads)](
        q, k, v, dout, lse, delta, dq, q_docs, k_docs, *common, *_strides(dq),
        heads, group, seq_q, seq_k, scale, scale * LOG2E, CAUSAL=causal, **doc_flags, **options, **config,
    )
    return dq, dk, dv
