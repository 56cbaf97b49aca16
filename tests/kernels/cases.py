"""Shared checks for block attention kernels: any (forward, backward) pair against the float64 reference.

Used in-process for the aten path and in a TRITON_INTERPRET=1 subprocess for Triton, so it imports no backend.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kernels.reference import reference_attention_backward, reference_attention_forward

Forward = Callable[..., tuple[Tensor, Tensor]]
Backward = Callable[..., tuple[Tensor, Tensor, Tensor]]

# Against a float64 reference computed from the same (rounded) inputs. bf16 outputs and grads carry one
# bf16 rounding plus bf16 probabilities inside the products; lse is always accumulated in fp32.
TOLERANCES = {
    torch.float64: {"out": (1e-10, 1e-10), "lse": (1e-10, 1e-10), "grad": (1e-10, 1e-10)},
    torch.float32: {"out": (1e-5, 1e-5), "lse": (1e-5, 1e-5), "grad": (1e-4, 1e-5)},
    torch.bfloat16: {"out": (2e-2, 2e-2), "lse": (1e-4, 1e-4), "grad": (5e-2, 5e-2)},
}


def make_inputs(
    batch: int, seq_q: int, seq_k: int, heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> q, dout [B, Sq, H, D]; k, v [B, Sk, H, D] (CPU)."""
    gen = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(batch, seq_q, heads, head_dim, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(batch, seq_k, heads, head_dim, generator=gen, dtype=torch.float64) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype), dout.to(dtype)


def document_ids(*rows: list[int]) -> Tensor:
    """Document ids [B, S] int64 from each batch row's document lengths (ids 0, 1, ... in order)."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])


def reference(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, *, causal: bool, **docs: Tensor) -> tuple[Tensor, ...]:
    """float64 out, lse, dq, dk, dv from the given (possibly rounded) inputs. docs: q_docs, k_docs or nothing."""
    q, k, v, dout = (t.double() for t in (q, k, v, dout))
    out, lse = reference_attention_forward(q, k, v, causal=causal, **docs)
    return (out, lse, *reference_attention_backward(dout, q, k, v, out, lse, causal=causal, **docs))


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, kind: str, name: str) -> None:
    rtol, atol = TOLERANCES[dtype][kind]
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name} ({dtype}): {m}"
    )


def check_block(
    forward: Forward, backward: Backward, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, *, causal: bool,
    **docs: Tensor,
) -> None:
    """One block's out, lse and grads (computed from its own out, lse) against the reference.
    docs: q_docs [B, Sq] and k_docs [B, Sk], or nothing."""
    dtype = q.dtype
    ref_out, ref_lse, *ref_grads = reference(q, k, v, dout, causal=causal, **docs)
    out, lse = forward(q, k, v, causal=causal, **docs)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.promote_types(dtype, torch.float32)
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert_close(out, ref_out, dtype, "out", "out")
    assert_close(lse, ref_lse, dtype, "lse", "lse")
    assert not out.isnan().any() and not lse.isnan().any()
    grads = backward(dout, q, k, v, out, lse, causal=causal, **docs)
    for name, grad, ref, inp in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v), strict=True):
        assert grad.dtype == dtype and grad.shape == inp.shape, f"{name}: {grad.dtype} {tuple(grad.shape)}"
        assert_close(grad, ref, dtype, "grad", name)


def check_gqa_block(
    forward: Forward, backward: Backward, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, *, causal: bool,
    **docs: Tensor,
) -> None:
    """check_block for grouped-query attention: q, dout [B, Sq, Hq, D]; k, v [B, Sk, Hkv, D], Hkv dividing Hq.
    The float64 reference expands K/V (query head h reads K/V head h // (Hq // Hkv)) and sums dk, dv per group."""
    dtype, kv_heads = q.dtype, k.shape[2]
    group = q.shape[2] // kv_heads
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference(
        q, *(t.double().repeat_interleave(group, dim=2) for t in (k, v)), dout, causal=causal, **docs
    )
    ref_dk, ref_dv = (grad.unflatten(2, (kv_heads, group)).sum(3) for grad in (ref_dk, ref_dv))
    out, lse = forward(q, k, v, causal=causal, **docs)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert_close(out, ref_out, dtype, "out", "gqa out")
    assert_close(lse, ref_lse, dtype, "lse", "gqa lse")
    grads = backward(dout, q, k, v, out, lse, causal=causal, **docs)
    for name, grad, ref, inp in zip(("dq", "dk", "dv"), grads, (ref_dq, ref_dk, ref_dv), (q, k, v), strict=True):
        assert grad.dtype == dtype and grad.shape == inp.shape, f"gqa {name}: {grad.dtype} {tuple(grad.shape)}"
        assert_close(grad, ref, dtype, "grad", f"gqa {name}")

def merge(out: Tensor, lse: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """LSE merge of two partial attentions over disjoint key sets. out: [B, S, H, D]; lse: [B, H, S]."""
    acc = torch.promote_types(lse.dtype, torch.float32)
    # A side with lse -inf saw no key (document masks): weight 0, and no (-inf) - (-inf) anywhere.
    weight_b = torch.where(torch.isneginf(lse_b), 0.0, torch.sigmoid(lse_b - lse)).transpose(1, 2)[..., None]
    merged = out.to(acc) - weight_b * (out.to(acc) - out_b.to(acc))
    return merged.to(out.dtype), torch.logaddexp(lse, lse_b)


def _blocks(seq: int, split: int, causal: bool) -> list[tuple[slice, slice, bool]]:
    # (query rows, key rows, causal) blocks covering the attention pattern, as two ring ranks would see it.
    first, second = slice(0, split), slice(split, seq)
    if causal:
        return [(first, first, True), (second, first, False), (second, second, True)]
    return [(first, first, False), (first, second, False), (second, first, False), (second, second, False)]


def check_split(
    forward: Forward,
    backward: Backward,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    *,
    causal: bool,
    split: int,
    docs: Tensor | None = None,
) -> None:
    """Ring decomposition: keys (and queries) split at `split`; partial forwards merged by LSE must equal the
    full attention, and block backwards given the GLOBAL out/lse, summed over blocks, must equal its grads.
    docs [B, S]: document ids shared by queries and keys, sliced with them."""
    assert q.shape[1] == k.shape[1], "the split is applied to queries and keys alike"
    dtype = q.dtype

    def block_docs(rows: slice, cols: slice) -> dict[str, Tensor]:
        return {} if docs is None else {"q_docs": docs[:, rows], "k_docs": docs[:, cols]}

    everything = slice(0, q.shape[1])
    ref_out, ref_lse, *ref_grads = reference(q, k, v, dout, causal=causal, **block_docs(everything, everything))

    # Per query half (keyed by its first row), the LSE merge of its partial results.
    partial: dict[int, tuple[Tensor, Tensor]] = {}
    blocks = _blocks(q.shape[1], split, causal)
    for rows, cols, block_causal in blocks:
        out_b, lse_b = forward(q[:, rows], k[:, cols], v[:, cols], causal=block_causal, **block_docs(rows, cols))
        partial[rows.start] = merge(*partial[rows.start], out_b, lse_b) if rows.start in partial else (out_b, lse_b)
    out = torch.cat([partial[0][0], partial[split][0]], dim=1)
    lse = torch.cat([partial[0][1], partial[split][1]], dim=2)
    assert_close(out, ref_out, dtype, "out", "merged out")
    assert_close(lse, ref_lse, dtype, "lse", "merged lse")

    acc = torch.promote_types(dtype, torch.float32)
    dq, dk, dv = (torch.zeros_like(t, dtype=acc) for t in (q, k, v))
    # Global out/lse come from the reference so the backward is checked on its own.
    global_out, global_lse = ref_out.to(dtype), ref_lse.to(acc)
    for rows, cols, block_causal in blocks:
        grads = backward(
            dout[:, rows], q[:, rows], k[:, cols], v[:, cols], global_out[:, rows], global_lse[:, :, rows],
            causal=block_causal, **block_docs(rows, cols),
        )
        dq[:, rows] += grads[0]
        dk[:, cols] += grads[1]
        dv[:, cols] += grads[2]
    for name, grad, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, strict=True):
        assert_close(grad, ref, dtype, "grad", f"split {name}")
