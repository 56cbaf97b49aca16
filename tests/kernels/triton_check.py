"""Triton attention checks, run as `python -m tests.kernels.triton_check GROUP... [--device cpu|cuda]`.

A separate process because triton fixes interpreter-or-compiler when the kernel module is imported: on CPU the
caller sets TRITON_INTERPRET=1 in this process's environment. Exits non-zero (with the assertion) on mismatch.
Shapes are tiny and deliberately not multiples of the 16-wide test blocks, so every tail path runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from functools import partial

import torch

from kernels import attention_backward, attention_forward
from kernels.triton_attention import triton_attention_backward, triton_attention_forward
from tests.kernels.cases import check_block, check_gqa_block, check_split, document_ids, make_inputs, reference

DTYPES = (torch.float32, torch.bfloat16)
# (causal, seq_q, seq_k)
SHAPES = [(True, 40, 40), (False, 40, 40), (False, 24, 40), (False, 40, 17), (True, 24, 40), (True, 40, 17)]


def _kernels(block_m: int | None, block_n: int | None):
    return (
        partial(triton_attention_forward, block_m=block_m, block_n=block_n),
        partial(triton_attention_backward, block_m=block_m, block_n=block_n),
    )


def check_blocks(device: str, blocks: tuple[int | None, int | None]) -> None:
    forward, backward = _kernels(*blocks)
    for dtype in DTYPES:
        for causal, seq_q, seq_k in SHAPES:
            inputs = (t.to(device) for t in make_inputs(1, seq_q, seq_k, 2, 16, dtype))
            check_block(forward, backward, *inputs, causal=causal)
    # Unequal tiles move the causal diagonal off block boundaries in both kernels' loop splits.
    for block_m, block_n in ((32, 16), (16, 32)):
        forward, backward = _kernels(block_m, block_n)
        for causal, seq_q, seq_k in SHAPES[:2] + SHAPES[-2:]:
            inputs = (t.to(device) for t in make_inputs(1, seq_q, seq_k, 2, 16, torch.float32, seed=3))
            check_block(forward, backward, *inputs, causal=causal)


def check_splits(device: str, blocks: tuple[int | None, int | None]) -> None:
    forward, backward = _kernels(*blocks)
    for dtype in DTYPES:
        for causal in (False, True):
            inputs = (t.to(device) for t in make_inputs(1, 40, 40, 2, 16, dtype, seed=1))
            check_split(forward, backward, *inputs, causal=causal, split=24)


def _strided_inputs(device: str) -> tuple[torch.Tensor, ...]:
    # q from a packed qkv projection, k with a non-unit stride along D, dout with heads outermost in memory.
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 21, 3, 2, 16, generator=gen).to(device)
    k = torch.randn(2, 21, 2, 32, generator=gen).to(device)[..., ::2]
    dout = torch.randn(2, 2, 21, 16, generator=gen).to(device).transpose(1, 2)
    return qkv[:, :, 0], k, qkv[:, :, 2], dout


def check_edges(device: str, blocks: tuple[int | None, int | None]) -> None:
    forward, backward = _kernels(*blocks)
    # Head dims that are not powers of two, or below tl.dot's minimum, are padded by masked loads.
    for head_dim in (8, 24):
        inputs = (t.to(device) for t in make_inputs(1, 20, 20, 2, head_dim, torch.float32, seed=5))
        check_block(forward, backward, *inputs, causal=True)
    for causal in (False, True):
        check_block(forward, backward, *_strided_inputs(device), causal=causal)

    # No keys at all: every row is empty and must come out as out = 0, lse = -inf, never NaN.
    q, k, v, dout = (t.to(device) for t in make_inputs(1, 20, 0, 2, 16, torch.float32))
    out, lse = forward(q, k, v, causal=False)
    assert torch.equal(out, torch.zeros_like(q)), "empty rows: out must be 0"
    assert torch.equal(lse, torch.full_like(lse, float("-inf"))), "empty rows: lse must be -inf"
    dq, dk, dv = backward(dout, q, k, v, out, lse, causal=False)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == k.shape and dv.shape == v.shape

    # A row whose given lse is -inf saw no key anywhere: it must contribute nothing to any gradient.
    q, k, v, dout = (t.to(device) for t in make_inputs(1, 24, 20, 2, 16, torch.float32, seed=6))
    out, lse, *_ = reference(q, k, v, dout, causal=False)
    out, lse = out.float(), lse.float()
    lse[:, :, :5] = float("-inf")
    dq, dk, dv = backward(dout, q, k, v, out, lse, causal=False)
    _, _, ref_dq, ref_dk, ref_dv = reference(q[:, 5:], k, v, dout[:, 5:], causal=False)
    torch.testing.assert_close(dq[:, :5], torch.zeros_like(dq[:, :5]), rtol=0, atol=0)
    for grad, ref in ((dq[:, 5:], ref_dq), (dk, ref_dk), (dv, ref_dv)):
        torch.testing.assert_close(grad.double(), ref, rtol=1e-4, atol=1e-5)

    # The dispatcher reaches these kernels by name, and the explicit scale is honoured.
    q, k, v, dout = (t.to(device) for t in make_inputs(1, 20, 20, 2, 16, torch.float32, seed=7))
    out, lse = attention_forward(q, k, v, causal=True, scale=0.3, backend="triton")
    grads = attention_backward(dout, q, k, v, out, lse, causal=True, scale=0.3, backend="triton")
    ref_out, ref_lse = attention_forward(q, k, v, causal=True, scale=0.3, backend="reference")
    ref_grads = attention_backward(dout, q, k, v, ref_out, ref_lse, causal=True, scale=0.3, backend="reference")
    for actual, expected in zip((out, lse, *grads), (ref_out, ref_lse, *ref_grads), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)

    q, k, v, _ = (t.to(device) for t in make_inputs(1, 8, 8, 2, 16, torch.float32))
    _expect_value_errors(
        (lambda: forward(q.double(), k.double(), v.double(), causal=True), "float64"),
        (lambda: forward(q, k.half(), v, causal=True), "one dtype"),
        (lambda: forward(*(torch.zeros(1, 8, 2, 160, device=device) for _ in range(3)), causal=True), "head_dim"),
        (lambda: triton_attention_forward(q, k, v, causal=True, block_m=24), "block_m=24"),
    )


def _expect_value_errors(*cases: tuple[Callable[[], object], str]) -> None:
    """Each (call, message): the call raises a ValueError whose text holds the message."""
    for bad_call, message in cases:
        try:
            bad_call()
        except ValueError as err:
            assert message in str(err), f"expected {message!r} in: {err}"
        else:
            raise AssertionError(f"no ValueError mentioning {message!r}")


def _packed_ids() -> torch.Tensor:
    # Sorted ids (tiles of foreign documents skipped): one-token documents, boundaries inside and on tile edges,
    # a row that is one document. [2, 40]
    return document_ids([1, 15, 1, 7, 16], [40])


def _disjoint_ids() -> tuple[torch.Tensor, torch.Tensor]:
    # Partly disjoint ids: q's documents 0 and 3 have no key anywhere (out 0, lse -inf). [2, 40] each
    return document_ids([4, 16, 20], [8, 8, 16, 8]), document_ids([0, 20, 20], [0, 8, 8, 0, 24])


def check_documents(device: str, blocks: tuple[int | None, int | None]) -> None:
    forward, backward = _kernels(*blocks)
    packed, (q_disjoint, k_disjoint) = _packed_ids(), _disjoint_ids()
    # Unsorted ids: masked pairs only, no skipping.
    unsorted = torch.tensor([[0, 1, 0, 2, 2, 1, 0, 3] * 5] * 2)
    cases = [(packed, packed, True, 40, 40), (packed, packed, False, 40, 40), (packed, packed, True, 24, 40),
             (unsorted, unsorted, True, 40, 40), (q_disjoint, k_disjoint, False, 40, 40)]
    # The masking logic does not depend on the dtype: bf16 only on the first case (the interpreter is slow).
    runs = [(torch.float32, case) for case in cases] + [(torch.bfloat16, cases[0])]
    for dtype, (q_docs, k_docs, causal, seq_q, seq_k) in runs:
        inputs = (t.to(device) for t in make_inputs(2, seq_q, seq_k, 2, 16, dtype, seed=8))
        docs = {"q_docs": q_docs[:, :seq_q].to(device), "k_docs": k_docs[:, :seq_k].to(device)}
        check_block(forward, backward, *inputs, causal=causal, **docs)
    # Ring blocks with documents across the split, and the dispatcher's path.
    for causal in (False, True):
        inputs = (t.to(device) for t in make_inputs(2, 40, 40, 2, 16, torch.float32, seed=9))
        check_split(forward, backward, *inputs, causal=causal, split=24, docs=packed.to(device))
    inputs = (t.to(device) for t in make_inputs(2, 40, 40, 2, 16, torch.float32, seed=10))
    check_block(partial(attention_forward, backend="triton"), partial(attention_backward, backend="triton"),
                *inputs, causal=True, q_docs=packed.to(device), k_docs=packed.to(device))


def _gqa_inputs(device: str, batch: int, seq_q: int, seq_k: int, heads: int, kv_heads: int, dtype: torch.dtype,
                seed: int) -> tuple[torch.Tensor, ...]:
    # q, dout [B, Sq, Hq, 16]; k, v [B, Sk, Hkv, 16], contiguous as a model's K/V projection lays them out.
    q, k, v, dout = make_inputs(batch, seq_q, seq_k, heads, 16, dtype, seed=seed)
    k, v = (t[:, :, :kv_heads].contiguous() for t in (k, v))
    return tuple(t.to(device) for t in (q, k, v, dout))


def check_gqa(device: str, blocks: tuple[int | None, int | None]) -> None:
    forward, backward = _kernels(*blocks)
    # (heads, kv_heads, dtype, causal, seq_q, seq_k). Groups of 2 (4 / 2: a head mapping of h % Hkv instead of
    # h // group reads the wrong K/V head) and 4 (4 / 1), both masks, key and query tails; batch 2 so dk, dv's
    # lse and delta rows are found per (batch, query head).
    cases = [(4, 2, torch.float32, True, 24, 40), (4, 2, torch.float32, False, 40, 17),
             (4, 2, torch.float32, True, 40, 17), (4, 1, torch.float32, False, 24, 40),
             (4, 1, torch.float32, True, 40, 40), (4, 2, torch.bfloat16, True, 40, 17),
             (4, 1, torch.bfloat16, False, 24, 40)]
    for seed, (heads, kv_heads, dtype, causal, seq_q, seq_k) in enumerate(cases, start=11):
        inputs = _gqa_inputs(device, 2, seq_q, seq_k, heads, kv_heads, dtype, seed)
        check_gqa_block(forward, backward, *inputs, causal=causal)
    # Document ids are per batch row and shared by every head: sorted ids (tile skipping) and partly disjoint
    # ones (rows with no key: out 0, lse -inf).
    packed, (q_disjoint, k_disjoint) = _packed_ids(), _disjoint_ids()
    for kv_heads, causal, q_docs, k_docs in ((2, True, packed, packed), (1, False, q_disjoint, k_disjoint)):
        inputs = _gqa_inputs(device, 2, 40, 40, 4, kv_heads, torch.float32, seed=20)
        check_gqa_block(forward, backward, *inputs, causal=causal, q_docs=q_docs.to(device),
                        k_docs=k_docs.to(device))
    # K/V heads strided apart (every other head of a wider tensor).
    q, k, v, dout = make_inputs(2, 24, 21, 4, 16, torch.float32, seed=21)
    check_gqa_block(forward, backward, q.to(device), k[:, :, ::2].to(device), v[:, :, ::2].to(device),
                    dout.to(device), causal=True)

    q, k, v, dout = _gqa_inputs(device, 1, 8, 8, 4, 2, torch.float32, seed=0)
    _expect_value_errors(
        (lambda: forward(q[:, :, :3], k, v, causal=True), "Hq=3, Hkv=2"),
        (lambda: forward(q, k, v[:, :, :1], causal=True), "k, v [B, Sk, Hkv, D]"),
        (lambda: backward(dout, q, k, v, q, torch.zeros(1, 2, 8), causal=True), "lse [B, Hq, Sq]"),
    )


GROUPS = {"block": check_blocks, "split": check_splits, "edge": check_edges, "docs": check_documents,
          "gqa": check_gqa}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="+", choices=sorted(GROUPS))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    # The interpreter is slow, so CPU runs use the smallest tiles; on a GPU also try the default ones.
    tilings = [(16, 16)] if args.device == "cpu" else [(16, 16), (None, None)]
    for name in args.groups:
        for blocks in tilings:
            start = time.perf_counter()
            GROUPS[name](args.device, blocks)
            print(f"{name} blocks={blocks} on {args.device}: ok in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
