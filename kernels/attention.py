"""Block attention that returns its log-sum-exp, and the backward that consumes it.

These are the building blocks of context-parallel attention: a ring step computes one (q block, kv block)
pair with `attention_forward`, merges partial results by their LSE, and in backward calls
`attention_backward` with the GLOBAL out and lse so every block sees the true softmax normaliser.

Backends: "aten" (torch's flash-attention-for-CPU ops, any float dtype), "triton" (CUDA), "reference"
(float64-capable twin in kernels.reference). "auto" picks triton on CUDA and aten elsewhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.dispatch import resolve_backend
from kernels.document_attention import check_document_ids, document_attention_backward, document_attention_forward
from kernels.reference import reference_attention_backward, reference_attention_forward

BACKENDS = ("auto", "aten", "triton", "reference")


def _resolve(backend: str, q: Tensor) -> str:
    return resolve_backend("attention", backend, BACKENDS, q, off_cuda="aten")


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention expects q [B, Sq, H, D] and k, v [B, Sk, H, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"block kernels need equal head counts (q {q.shape[2]}, kv {k.shape[2]}); expand KV first")


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float | None = None, backend: str = "auto",
    q_docs: Tensor | None = None, k_docs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """q: [B, Sq, H, D]; k, v: [B, Sk, H, D] -> out [B, Sq, H, D] (q.dtype), lse [B, H, Sq].

    lse is float32, or float64 for float64 inputs. `causal` is top-left aligned (query i sees keys <= i).
    Document ids q_docs [B, Sq], k_docs [B, Sk] (int64, both or neither): a query attends only to keys of its
    own document; a query row with no key to attend gets out 0 and lse -inf.
    """
    _check_shapes(q, k, v)
    check_document_ids(q, k, q_docs, k_docs)
    backend = _resolve(backend, q)
    if backend == "reference":
        return reference_attention_forward(q, k, v, causal=causal, scale=scale, q_docs=q_docs, k_docs=k_docs)
    if backend == "triton":
        from kernels.triton_attention import triton_attention_forward

        return triton_attention_forward(q, k, v, causal=causal, scale=scale, q_docs=q_docs, k_docs=k_docs)
    if q_docs is not None:
        return document_attention_forward(q, k, v, q_docs, k_docs, causal=causal, scale=scale)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale
    )
    return out.transpose(1, 2), lse


def attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    backend: str = "auto",
    q_docs: Tensor | None = None,
    k_docs: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """dout, out: [B, Sq, H, D]; lse: [B, H, Sq] -> dq [B, Sq, H, D], dk, dv [B, Sk, H, D] (input dtypes).
    q_docs, k_docs: the document ids of `attention_forward`."""
    _check_shapes(q, k, v)
    check_document_ids(q, k, q_docs, k_docs)
    backend = _resolve(backend, q)
    if backend == "reference":
        return reference_attention_backward(dout, q, k, v, out, lse, causal=causal, scale=scale, q_docs=q_docs,
                                            k_docs=k_docs)
    if backend == "triton":
        from kernels.triton_attention import triton_attention_backward

        return triton_attention_backward(dout, q, k, v, out, lse, causal=causal, scale=scale, q_docs=q_docs,
                                         k_docs=k_docs)
    if q_docs is not None:
        return document_attention_backward(dout, q, k, v, out, lse, q_docs, k_docs, causal=causal, scale=scale)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2),
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        out.transpose(1, 2),
        lse,
        0.0,
        causal,
        scale=scale,
    )
    return tuple(g.transpose(1, 2) for g in grads)


def expand_kv_heads(x: Tensor, num_q_heads: int) -> Tensor:
    """[B, S, Hkv, D] -> [B, S, Hq, D]: query head h reads KV head h // (Hq // Hkv), as in Llama's GQA."""
    groups = num_q_heads // x.shape[2]
    if groups == 1:
        return x
    return x.repeat_interleave(groups, dim=2)


def reduce_kv_heads(grad: Tensor, num_kv_heads: int) -> Tensor:
    """Inverse of expand_kv_heads for gradients: [B, S, Hq, D] -> [B, S, Hkv, D] by summing each group."""
    b, s, hq, d = grad.shape
    if hq == num_kv_heads:
        return grad
    return grad.view(b, s, num_kv_heads, hq // num_kv_heads, d).sum(dim=3)


def check_gqa(q: Tensor, k: Tensor) -> None:
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]}); "
            "set model.num_kv_heads to a divisor of model.num_heads"
        )


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, backend, docs):
        k_full, v_full = expand_kv_heads(k, q.shape[2]), expand_kv_heads(v, q.shape[2])
        out, lse = attention_forward(q, k_full, v_full, causal=causal, scale=scale, backend=backend, q_docs=docs,
                                     k_docs=docs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (causal, scale, backend, docs)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, backend, docs = ctx.options
        k_full, v_full = expand_kv_heads(k, q.shape[2]), expand_kv_heads(v, q.shape[2])
        dq, dk, dv = attention_backward(
            dout.contiguous(), q, k_full, v_full, out, lse, causal=causal, scale=scale, backend=backend, q_docs=docs,
            k_docs=docs,
        )
        return dq, reduce_kv_heads(dk, k.shape[2]), reduce_kv_heads(dv, k.shape[2]), None, None, None, None


def attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: float | None = None, backend: str = "auto",
    document_ids: Tensor | None = None,
) -> Tensor:
    """Differentiable single-device attention with GQA. q: [B, S, Hq, D]; k, v: [B, S, Hkv, D] -> [B, S, Hq, D].

    document_ids [B, S] (packed documents): a query attends only to keys of its own document; a row with no key
    gives 0. Saves only q, k, v, out and lse (flash-style: the [S, S] probabilities are never stored).
    """
    check_gqa(q, k)
    if document_ids is not None and q.shape[1] != k.shape[1]:
        raise ValueError(f"document_ids need equal query and key lengths; got {q.shape[1]} and {k.shape[1]}")
    return _Attention.apply(q, k, v, causal, scale, backend, document_ids)
