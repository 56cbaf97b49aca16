"""torch's CUDA attention ops as block kernels, checked on CPU: on fake CUDA tensors every call runs the op's
meta kernel, which checks the arguments against the op's schema and gives the outputs' shapes and dtypes.
Their numerics need a GPU: bench/gpu_check.py compares them with the float64 reference there."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kernels.torch_attention as torch_attention
from kernels import attention_backward, attention_forward
from kernels.attention import choose_backend


@pytest.fixture
def fake_cuda():
    """Fake tensors on a device that says it is CUDA compute capability 9.0 (an H100/H200)."""
    with mock.patch.object(torch_attention, "_capability", lambda device: (9, 0)), FakeTensorMode():
        yield


def _inputs(dtype, seq_q=100, seq_k=100, heads=8, kv_heads=2, head_dim=64):
    q = torch.empty(2, seq_q, heads, head_dim, dtype=dtype, device="cuda")
    k = torch.empty(2, seq_k, kv_heads, head_dim, dtype=dtype, device="cuda")
    return q, k, torch.empty_like(k)


CASES = [("flash", torch.bfloat16), ("flash", torch.float16), ("efficient", torch.bfloat16),
         ("efficient", torch.float32), ("cudnn", torch.bfloat16)]


@pytest.mark.parametrize(("backend", "dtype"), CASES, ids=lambda x: str(x))
@pytest.mark.parametrize(("causal", "seq_q", "seq_k"), [(True, 100, 100), (False, 100, 70), (False, 33, 130)])
def test_cuda_ops_keep_the_block_contract(fake_cuda, backend, dtype, causal, seq_q, seq_k):
    # Sequence lengths off multiples of 32 exercise the memory-efficient op's padded lse both ways.
    q, k, v = _inputs(dtype, seq_q, seq_k)
    out, lse = attention_forward(q, k, v, causal=causal, backend=backend)
    assert (out.shape, out.dtype, out.device.type) == (q.shape, dtype, "cuda")
    assert (lse.shape, lse.dtype) == ((2, 8, seq_q), torch.float32)
    dq, dk, dv = attention_backward(out, q, k, v, out, lse, causal=causal, backend=backend)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert dq.dtype == dk.dtype == dv.dtype == dtype


@pytest.mark.parametrize(
    ("dtype", "head_dim", "documents", "expected"),
    [
        (torch.bfloat16, 128, False, "flash"),
        (torch.float16, 64, False, "flash"),
        (torch.float32, 64, False, "efficient"),
        (torch.float32, 20, False, "efficient"),  # fp32 needs only 4-element alignment
        (torch.bfloat16, 20, False, "triton"),  # 16-bit ops need head_dim % 8 == 0
        (torch.bfloat16, 64, True, "triton"),  # document masks
        (torch.float64, 64, False, "reference"),
    ],
)
def test_auto_on_cuda(fake_cuda, dtype, head_dim, documents, expected):
    q, k, _ = _inputs(dtype, head_dim=head_dim)
    assert choose_backend("auto", q, k, causal=True, documents=documents) == expected


def test_auto_falls_back_below_flash_hardware():
    with mock.patch.object(torch_attention, "_capability", lambda device: (7, 5)), FakeTensorMode():
        q, k, _ = _inputs(torch.float16)
        assert choose_backend("auto", q, k, causal=True) == "triton"


@pytest.mark.parametrize(
    ("backend", "dtype", "seq_k", "head_dim", "documents", "reason"),
    [
        ("flash", torch.float32, 100, 64, False, "takes torch.bfloat16, torch.float16"),
        ("flash", torch.bfloat16, 70, 64, False, "causal blocks must be square"),
        ("cudnn", torch.bfloat16, 100, 256, False, "head_dim <= 128"),
        ("efficient", torch.float32, 100, 64, True, "takes no document masks"),
        ("aten", torch.float32, 100, 64, False, "runs on CPU tensors"),
    ],
)
def test_named_cuda_backend_refuses_what_it_cannot_run(fake_cuda, backend, dtype, seq_k, head_dim, documents,
                                                        reason):
    q, k, _ = _inputs(dtype, seq_k=seq_k, head_dim=head_dim)
    with pytest.raises(ValueError, match=f"backend='{backend}'.*{reason}"):
        choose_backend(backend, q, k, causal=True, documents=documents)
