"""Choosing a kernel backend: "auto" means the Triton kernels on CUDA tensors and the named torch path elsewhere."""

from __future__ import annotations

from torch import Tensor


def resolve_backend(what: str, backend: str, choices: tuple[str, ...], tensor: Tensor, off_cuda: str) -> str:
    """`backend` checked against `choices` ("auto" among them) -> the backend to run for `tensor`."""
    if backend not in choices:
        raise ValueError(f"{what} backend={backend!r}: choose one of {', '.join(choices)}")
    if backend != "auto":
        return backend
    return "triton" if tensor.is_cuda else off_cuda
