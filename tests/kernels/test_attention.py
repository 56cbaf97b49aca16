"""The aten (CPU flash) path of the block attention kernels against the float64 reference."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from kernels import attention, attention_backward, attention_forward
from kernels.attention import reduce_kv_heads
from tests.kernels.cases import check_block, check_split, make_inputs

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
aten_forward = partial(attention_forward, backend="aten")
aten_backward = partial(attention_backward, backend="aten")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("causal", "seq_q", "seq_k"),
    [(True, 37, 37), (False, 37, 37), (False, 29, 45), (False, 45, 29), (True, 29, 45), (True, 45, 29)],
)
def test_aten_block_matches_reference(dtype, causal, seq_q, seq_k):
    q, k, v, dout = make_inputs(2, seq_q, seq_k, 3, 16, dtype)
    check_block(aten_forward, aten_backward, q, k, v, dout, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_aten_split_keys_with_global_lse(dtype, causal):
    # What ring attention relies on: per-block backward with the global out/lse sums to the full backward.
    q, k, v, dout = make_inputs(2, 40, 40, 2, 16, dtype, seed=1)
    check_split(aten_forward, aten_backward, q, k, v, dout, causal=causal, split=24)


def test_auto_backend_is_aten_on_cpu():
    q, k, v, dout = make_inputs(1, 20, 20, 2, 16, torch.float32)
    out_auto, lse_auto = attention_forward(q, k, v, causal=True)
    out_aten, lse_aten = aten_forward(q, k, v, causal=True)
    torch.testing.assert_close(out_auto, out_aten, rtol=0, atol=0)
    torch.testing.assert_close(lse_auto, lse_aten, rtol=0, atol=0)


def test_reference_backend_dispatch():
    q, k, v, dout = make_inputs(1, 20, 20, 2, 16, torch.float64)
    out, lse = attention_forward(q, k, v, causal=True, backend="reference")
    out_aten, lse_aten = aten_forward(q, k, v, causal=True)
    torch.testing.assert_close(out, out_aten, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, lse_aten, rtol=1e-10, atol=1e-10)
    grads = attention_backward(dout, q, k, v, out, lse, causal=True, backend="reference")
    grads_aten = aten_backward(dout, q, k, v, out, lse, causal=True)
    for grad, expected in zip(grads, grads_aten, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-10)


def test_explicit_scale():
    q, k, v, dout = make_inputs(1, 20, 24, 2, 16, torch.float64)
    out, lse = aten_forward(q, k, v, causal=False, scale=0.5)
    ref_out, ref_lse = attention_forward(q, k, v, causal=False, scale=0.5, backend="reference")
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    grads = aten_backward(dout, q, k, v, out, lse, causal=False, scale=0.5)
    ref_grads = attention_backward(dout, q, k, v, out, lse, causal=False, scale=0.5, backend="reference")
    for grad, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("causal", [False, True])
def test_differentiable_attention_gqa_matches_sdpa(num_kv_heads, causal):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 33, 4, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (
        torch.randn(2, 33, num_kv_heads, 16, generator=gen, dtype=torch.float64, requires_grad=True)
        for _ in range(2)
    )
    dout = torch.randn(2, 33, 4, 16, generator=gen, dtype=torch.float64)

    out = attention(q, k, v, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    # SDPA works in [B, H, S, D].
    ref = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
    ).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)

    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for grad, expected in zip(grads, ref_grads, strict=True):
        assert grad.shape == expected.shape
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-10)


def test_bad_backend_name():
    q, k, v, _ = make_inputs(1, 8, 8, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="backend='cuda'"):
        attention_forward(q, k, v, causal=True, backend="cuda")
    with pytest.raises(ValueError, match="choose one of"):
        attention(q, k, v, backend="fast")
    with pytest.raises(ValueError, match="backend='flash' cannot run these inputs: it runs on CUDA tensors"):
        attention(q, k, v, backend="flash")


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "v_shape"),
    [
        ((1, 8, 2, 16), (1, 8, 2, 16), (1, 9, 2, 16)),  # k, v disagree
        ((1, 8, 2, 16), (1, 8, 2, 32), (1, 8, 2, 32)),  # head dim differs
        ((1, 8, 2, 16), (2, 8, 2, 16), (2, 8, 2, 16)),  # batch differs
        ((8, 2, 16), (8, 2, 16), (8, 2, 16)),  # not 4-D
    ],
)
def test_mismatched_shapes(q_shape, k_shape, v_shape):
    q, k, v = torch.randn(q_shape), torch.randn(k_shape), torch.randn(v_shape)
    with pytest.raises(ValueError, match=r"q \[B, Sq, Hq, D\]"):
        attention_forward(q, k, v, causal=False)
    with pytest.raises(ValueError, match=r"q \[B, Sq, Hq, D\]"):
        attention_backward(q, q, k, v, q, torch.zeros(1), causal=False)


@pytest.mark.parametrize("backend", ["aten", "reference"])
@pytest.mark.parametrize("num_kv_heads", [2, 1])
@pytest.mark.parametrize(("causal", "seq_q", "seq_k"), [(True, 21, 21), (False, 21, 30)])
def test_block_kernels_take_grouped_kv(backend, num_kv_heads, causal, seq_q, seq_k):
    # Grouped K/V go in as they are; dK/dV come back with their heads, each group's sum in fp32 or better.
    q, k, v, dout = make_inputs(2, seq_q, seq_k, 4, 16, torch.float64, seed=5)
    k, v = k[:, :, :num_kv_heads].contiguous(), v[:, :, :num_kv_heads].contiguous()
    out, lse = attention_forward(q, k, v, causal=causal, backend=backend)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, causal=causal, backend=backend)
    group = 4 // num_kv_heads
    k_full, v_full = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    ref_out, ref_lse = attention_forward(q, k_full, v_full, causal=causal, backend="reference")
    ref_dq, ref_dk, ref_dv = attention_backward(dout, q, k_full, v_full, ref_out, ref_lse, causal=causal,
                                                backend="reference")
    assert dk.shape == dv.shape == k.shape
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dq, ref_dq, rtol=1e-10, atol=1e-10)
    for grad, full in ((dk, ref_dk), (dv, ref_dv)):
        torch.testing.assert_close(grad, full.unflatten(2, (num_kv_heads, group)).sum(3), rtol=1e-10, atol=1e-10)


def test_gqa_heads_not_multiple():
    q, k, v = torch.randn(1, 8, 3, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        attention(q, k, v)


def test_grouped_gradients_are_summed_in_fp32_and_rounded_once():
    # What the fp32 reduction of dK/dV must be, without an fp32 buffer: torch's 16-bit sum accumulates in fp32.
    grad = torch.randn(2, 50, 8, 16, generator=torch.Generator().manual_seed(3)).bfloat16()
    reduced = reduce_kv_heads(grad, 2)
    assert reduced.dtype == torch.bfloat16
    assert torch.equal(reduced, grad.float().unflatten(2, (2, 4)).sum(3).bfloat16())
