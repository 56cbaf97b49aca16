import pytest
import torch

from kernels.attention import attention_forward
from kernels.merge import merge_attention
from kernels.reference import reference_attention_forward

NEG_INF = float("-inf")


def _qkv(dtype, seq=16, heads=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, seq, heads, dim, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_merging_key_blocks_equals_full_attention(dtype):
    q, k, v = _qkv(dtype)
    ref_out, ref_lse = reference_attention_forward(q, k, v, causal=False)
    out, lse = attention_forward(q, k[:, :5], v[:, :5], causal=False)
    for start, stop in ((5, 11), (11, 16)):
        block = attention_forward(q, k[:, start:stop], v[:, start:stop], causal=False)
        out, lse = merge_attention(out, lse, *block)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=tol, atol=tol)


def test_merge_is_symmetric_and_pure():
    q, k, v = _qkv(torch.float64)
    a = attention_forward(q, k[:, :8], v[:, :8], causal=False)
    b = attention_forward(q, k[:, 8:], v[:, 8:], causal=False)
    copies = [t.clone() for t in (*a, *b)]
    ab, ba = merge_attention(*a, *b), merge_attention(*b, *a)
    torch.testing.assert_close(ab[0], ba[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ab[1], ba[1], rtol=1e-12, atol=1e-12)
    for before, after in zip(copies, (*a, *b), strict=True):
        assert torch.equal(before, after)


def test_empty_start_returns_the_block_exactly():
    q, k, v = _qkv(torch.float32)
    block_out, block_lse = attention_forward(q, k, v, causal=True)
    start_out = torch.zeros_like(block_out)
    start_lse = torch.full_like(block_lse, NEG_INF)
    out, lse = merge_attention(start_out, start_lse, block_out, block_lse)
    assert torch.equal(out, block_out) and torch.equal(lse, block_lse)


def test_fully_masked_rows_produce_no_nan():
    out = torch.randn(1, 3, 1, 4)
    lse = torch.tensor([[[0.5, NEG_INF, NEG_INF]]])
    # Garbage (NaN) in rows whose lse is -inf must not leak into the result.
    block_out = torch.full((1, 3, 1, 4), float("nan"))
    block_out[:, 1] = 2.0
    block_lse = torch.tensor([[[NEG_INF, 1.0, NEG_INF]]])
    out[:, 1] = float("nan")
    merged, merged_lse = merge_attention(out, lse, block_out, block_lse)
    assert torch.equal(merged[:, 0], out[:, 0])
    assert torch.equal(merged[:, 1], block_out[:, 1])
    assert not merged[:, :2].isnan().any()
    assert merged_lse.tolist() == [[[0.5, 1.0, NEG_INF]]]


def test_low_precision_blocks_accumulate_in_the_running_dtype():
    q, k, v = _qkv(torch.bfloat16)
    block_out, block_lse = attention_forward(q, k, v, causal=False)
    out = torch.zeros(block_out.shape, dtype=torch.float32)
    lse = torch.full(block_lse.shape, NEG_INF)
    merged, merged_lse = merge_attention(out, lse, block_out, block_lse)
    assert merged.dtype == torch.float32 and merged_lse.dtype == torch.float32


def test_extreme_lse_gap_is_stable():
    out_a, out_b = torch.ones(1, 2, 1, 2), torch.full((1, 2, 1, 2), 3.0)
    lse_a = torch.tensor([[[1000.0, -1000.0]]])
    lse_b = torch.tensor([[[-1000.0, 1000.0]]])
    merged, merged_lse = merge_attention(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(merged[:, 0], out_a[:, 0])
    torch.testing.assert_close(merged[:, 1], out_b[:, 1])
    torch.testing.assert_close(merged_lse, torch.tensor([[[1000.0, 1000.0]]]))
