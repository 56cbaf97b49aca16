"""Block attention that returns its log-sum-exp, and the backward that consumes it.

These are the building blocks of context-parallel attention: a ring step computes one (q block, kv block)
pair with `attention_forward`, merges partial results by their LSE, and in backward calls
`attention_backward` with the GLOBAL out and lse so every block sees the true softmax normaliser.

K/V may have fewer heads than q (grouped-query attention: query head h reads K/V head h // (Hq // Hkv)). The
Triton kernels read the shared head in place; torch's ops take equal head counts, so for them K/V are expanded
here and dK/dV summed back per group in fp32.

Backends: "aten" (torch's CPU flash op, any float dtype), "flash", "efficient", "cudnn" (torch's CUDA ops,
kernels.torch_attention), "triton" (kernels.triton_attention: CUDA, or CPU under TRITON_INTERPRET), "reference"
(float64-capable twin in kernels.reference). "auto" (`choose_backend`): aten on CPU; on CUDA flash for 16-bit
inputs, efficient for fp32, triton for document masks or what neither takes, reference for float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.document_attention import check_document_ids, document_attention_backward, document_attention_forward
from kernels.reference import reference_attention_backward, reference_attention_forward
from kernels.torch_attention import TORCH_KERNELS

BACKENDS = ("auto", "aten", "flash", "efficient", "cudnn", "triton", "reference")
CUDA_BACKENDS = tuple(name for name, kernel in TORCH_KERNELS.items() if kernel.cuda)


def choose_backend(backend: str, q: Tensor, k: Tensor, *, causal: bool, documents: bool = False) -> str:
    """The backend that runs q [B, Sq, Hq, D] against k [B, Sk, Hkv, D]: `backend` itself unless it is "auto".

    A named backend that cannot take these inputs raises ValueError saying why."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if not q.is_cuda:
            return "aten"
        if q.dtype == torch.float64:
            return "reference"
        if documents:
            return "triton"
        preferred = "flash" if q.dtype in (torch.float16, torch.bfloat16) else "efficient"
        return preferred if TORCH_KERNELS[preferred].unsupported(q, k, causal) is None else "triton"
    if backend in TORCH_KERNELS:
        if documents and backend != "aten":  # on CPU the document path calls the aten op per document
            raise ValueError(f"attention backend={backend!r} takes no document masks; use 'auto' or 'triton'")
        reason = TORCH_KERNELS[backend].unsupported(q, k, causal)
        if reason is not None:
            raise ValueError(f"attention backend={backend!r} cannot run these inputs: {reason}; use 'auto'")
    return backend


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention expects q [B, Sq, Hq, D] and k, v [B, Sk, Hkv, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    check_gqa(q, k)


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float | None = None, backend: str = "auto",
    q_docs: Tensor | None = None, k_docs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """q: [B, Sq, Hq, D]; k, v: [B, Sk, Hkv, D] -> out [B, Sq, Hq, D] (q.dtype), lse [B, Hq, Sq].

    lse is float32, or float64 for float64 inputs. `causal` is top-left aligned (query i sees keys <= i).
    Document ids q_docs [B, Sq], k_docs [B, Sk] (int64, both or neither): a query attends only to keys of its
    own document; a query row with no key to attend gets out 0 and lse -inf.
    """
    _check_shapes(q, k, v)
    check_document_ids(q, k, q_docs, k_docs)
    backend = choose_backend(backend, q, k, causal=causal, documents=q_docs is not None)
    if backend == "triton":
        from kernels.triton_attention import triton_attention_forward

        return triton_attention_forward(q, k, v, causal=causal, scale=scale, q_docs=q_docs, k_docs=k_docs)
    k, v = expand_kv_heads(k, q.shape[2]), expand_kv_heads(v, q.shape[2])
    if backend == "reference":
        return reference_attention_forward(q, k, v, causal=causal, scale=scale, q_docs=q_docs, k_docs=k_docs)
    if q_docs is not None:
        return document_attention_forward(q, k, v, q_docs, k_docs, causal=causal, scale=scale)
    return TORCH_KERNELS[backend].forward(q, k, v, causal, scale)


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
    """dout, out: [B, Sq, Hq, D]; lse: [B, Hq, Sq] -> dq [B, Sq, Hq, D], dk, dv [B, Sk, Hkv, D] (input dtypes).
    q_docs, k_docs: the document ids of `attention_forward`."""
    _check_shapes(q, k, v)
    check_document_ids(q, k, q_docs, k_docs)
    backend = choose_backend(backend, q, k, causal=causal, documents=q_docs is not None)
    if backend == "triton":
        from kernels.triton_attention import triton_attention_backward

        return triton_attention_backward(dout, q, k, v, out, lse, causal=causal, scale=scale, q_docs=q_docs,
                                         k_docs=k_docs)
    num_kv_heads = k.shape[2]
    k, v = expand_kv_heads(k, q.shape[2]), expand_kv_heads(v, q.shape[2])
    if backend == "reference":
        dq, dk, dv = reference_attention_backward(dout, q, k, v, out, lse, causal=causal, scale=scale,
                                                  q_docs=q_docs, k_docs=k_docs)
    elif q_docs is not None:
        dq, dk, dv = document_attention_backward(dout, q, k, v, out, lse, q_docs, k_docs, causal=causal, scale=scale)
    else:
        dq, dk, dv = TORCH_KERNELS[backend].backward(dout, q, k, v, out, lse, causal, scale)
    return dq, reduce_kv_heads(dk, num_kv_heads), reduce_kv_heads(dv, num_kv_heads)


def expand_kv_heads(x: Tensor, num_q_heads: int) -> Tensor:
    """[B, S, Hkv, D] -> [B, S, Hq, D]: query head h reads KV head h // (Hq // Hkv), as in Llama's GQA."""
    groups = num_q_heads // x.shape[2]
    if groups == 1:
        return x
    return x.repeat_interleave(groups, dim=2)


def reduce_kv_heads(grad: Tensor, num_kv_heads: int) -> Tensor:
    """Inverse of expand_kv_heads for gradients: [B, S, Hq, D] -> [B, S, Hkv, D], each group summed.

    torch's sum accumulates 16-bit inputs in fp32 and rounds once, so this is the fp32 sum in grad's dtype without
    an fp32 [B, S, Hkv, D] buffer (at 5.6M tokens of a Ulysses rank that buffer was 2.8 GB at the planned peak)."""
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
        out, lse = attention_forward(q, k, v, causal=causal, scale=scale, backend=backend, q_docs=docs, k_docs=docs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = (causal, scale, backend, docs)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, backend, docs = ctx.options
        dq, dk, dv = attention_backward(dout.contiguous(), q, k, v, out, lse, causal=causal, scale=scale,
                                        backend=backend, q_docs=docs, k_docs=docs)
        return dq, dk, dv, None, None, None, None


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
