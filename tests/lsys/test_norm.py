"""The memory-lean RMSNorm against the plain autograd formula."""

from __future__ import annotations

import pytest
import torch

import lsys.norm
from lsys.norm import _plain, rms_norm


@pytest.mark.parametrize("rows", [1, 7, 3 * 5])
def test_matches_the_plain_formula_in_float64_forward_and_backward(monkeypatch, rows):
    monkeypatch.setattr(lsys.norm, "SLAB_BYTES", 4 * 16 * 4)  # slabs of 4 rows: several, the last one partial
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 3, 16, generator=gen, dtype=torch.float64)
    w = torch.randn(16, generator=gen, dtype=torch.float64)
    dy = torch.randn(rows, 3, 16, generator=gen, dtype=torch.float64)
    got = [t.clone().requires_grad_() for t in (x, w)]
    want = [t.clone().requires_grad_() for t in (x, w)]
    out, ref = rms_norm(*got, 1e-6), _plain(*want, 1e-6)
    assert torch.equal(out, ref)
    out.backward(dy)
    ref.backward(dy)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_bf16_forward_is_bit_identical_and_grads_in_input_dtypes(monkeypatch):
    monkeypatch.setattr(lsys.norm, "SLAB_BYTES", 4 * 32 * 8)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 32, generator=gen).bfloat16().requires_grad_()
    w = torch.randn(32, generator=gen).requires_grad_()
    assert torch.equal(rms_norm(x, w, 1e-5), _plain(x, w, 1e-5))
    rms_norm(x, w, 1e-5).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_saves_only_the_input_and_one_statistic_per_row():
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm(x.bfloat16(), w, 1e-5)
    sizes = sorted(t.numel() for t in saved)
    assert sizes == [32, 64, 64 * 32]  # weight, per-row reciprocal RMS, the (bf16) input
