"""Activations kept for backward, moved to host memory after they are made and brought back one block ahead of the
backward that reads them (`recompute.offload: cpu`).

What moves is what recomputation keeps of each recomputed block (parallel.recompute): full: the block's inputs;
selective: those, the matmul outputs of its cache, attention's own saved tensors and its replayed output. With
int8 stored activations the int8 payloads move (parallel.quantize hands them to the block's storage). Blocks that
do not recompute keep their activations where they are.

On CUDA each tensor is copied into pinned host memory on a side stream once the compute stream has made it (the
device memory returns to the allocator when the copy is done, `record_stream`), and in backward the first read
of a block's tensors starts copying the previous block's back on that stream, so the copy hides behind this
block's backward. On CPU the same mechanism runs with the host being the same memory: each tensor is copied into
a buffer of its own, which `host_allocations()` marks so the memory tracker (lsys.memory.tracker) counts it as
host memory, not as activations. A storage several blocks keep (RoPE tables, document ids) moves once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import weakref
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from parallel._compat import FakeTensor
from parallel.config import RecomputeConfig
from parallel.plan import ParallelPlan

_STATE = threading.local()


def host_allocations_active() -> bool:
    """Whether the tensors being made now are host copies of offloaded activations."""
    return getattr(_STATE, "depth", 0) > 0


@contextlib.contextmanager
def host_allocations() -> Iterator[None]:
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


def _real_cuda(t: Tensor) -> bool:
    return t.is_cuda and not isinstance(t, FakeTensor)


class _Moved:
    """One tensor on the host; `unpack()` gives it back on its device (prefetched, or copied now)."""

    def __init__(self, t: Tensor, offload: ActivationOffload, block: int):
        self.device, self.block, self.offload = t.device, block, offload
        self.spec = (t.device_mesh, t.placements, t.shape, t.stride()) if isinstance(t, DTensor) else None
        local = t.to_local() if isinstance(t, DTensor) else t
        with torch.no_grad(), host_allocations():
            self.host = torch.empty_like(local, device="cpu", pin_memory=_real_cuda(local))
        self.event = offload.copy(self.host, local)
        self.back: Tensor | None = None  # prefetched device copy, held until read
        self.last: weakref.ref | None = None  # the device copy last handed out, while someone holds it

    def prefetch(self) -> None:
        if self.back is None and (self.last is None or self.last() is None):
            self.back = torch.empty_like(self.host, device=self.device)
            self.event = self.offload.copy(self.back, self.host, after=self.event)

    def unpack(self) -> Tensor:
        held = self.last() if self.last is not None else None
        if held is None:
            self.offload.entering(self.block)
            self.prefetch()
            self.offload.wait(self.event, self.back)
            held, self.back = self.back, None
            self.last = weakref.ref(held)
        if self.spec is None:
            return held
        mesh, placements, shape, stride = self.spec
        return DTensor.from_local(held, mesh, placements, run_check=False, shape=shape, stride=stride)


class _Stored:
    """A kept object (tensor or int8 payload) whose tensors are on the host: `unpack()` returns what the object
    itself would (the tensor, or the payload's dequantized tensor)."""

    def __init__(self, template: Any):
        self.template = template

    def unpack(self) -> Any:
        obj = _map_tensors(self.template, lambda moved: moved.unpack(), _Moved)
        return obj.unpack() if hasattr(obj, "unpack") else obj


def _map_tensors(obj: Any, fn, kind: type, memo: dict | None = None) -> Any:
    """obj with every `kind` leaf replaced by fn(leaf), through dataclass fields (the int8 payloads); an object
    reached twice (a payload shared by two views) is mapped once."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, kind):
        result = fn(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        result = dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn, kind, memo)
                                             for f in dataclasses.fields(obj) if f.init})
    else:
        result = obj
    memo[id(obj)] = result
    return result


class ActivationOffload:
    """The host side of every offloaded block of one model, and the copy stream they share."""

    def __init__(self) -> None:
        self.blocks: dict[int, list[weakref.ref]] = defaultdict(list)  # forward order of each block's tensors
        self.moved: dict[tuple, tuple[weakref.ref, _Moved]] = {}  # storage region -> its host copy, while alive
        self.stream: Any = None

    def storage(self, block: int) -> BlockStorage:
        return BlockStorage(self, block)

    # -- copies ---------------------------------------------------------------------------------------------------

    def copy(self, dst: Tensor, src: Tensor, after: Any = None) -> Any:
        """dst <- src; on CUDA on the side stream, ordered after the compute stream (and `after`), returning its
        event. `src`'s device memory is not reused before the copy has read it."""
        if not (_real_cuda(src) or _real_cuda(dst)):
            with torch.no_grad():
                dst.copy_(src)
            return None
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        for t in (src, dst):
            if _real_cuda(t):
                t.record_stream(self.stream)
        return event

    def wait(self, event: Any, back: Tensor) -> None:
        if event is not None:
            torch.cuda.current_stream().wait_event(event)
            back.record_stream(torch.cuda.current_stream())

    # -- bookkeeping ----------------------------------------------------------------------------------------------

    def move(self, t: Tensor, block: int) -> _Moved:
        local = t.to_local() if isinstance(t, DTensor) else t
        region = (id(local.untyped_storage()), local.storage_offset(), tuple(local.shape), local.stride(), t.dtype,
                  isinstance(t, DTensor))
        hit = self.moved.get(region)
        if hit is not None and hit[0]() is not None:
            return hit[1]
        moved = _Moved(t, self, block)
        owner = local if local._base is None else local._base
        self.moved = {k: v for k, v in self.moved.items() if v[0]() is not None}
        self.moved[region] = (weakref.ref(owner), moved)
        refs = self.blocks[block]
        refs[:] = [r for r in refs if r() is not None]
        refs.append(weakref.ref(moved))
        return moved

    def entering(self, block: int) -> None:
        """Backward reads block `block`'s tensors: start bringing back those of the offloaded block before it."""
        earlier = [index for index in self.blocks if index < block]
        for ref in self.blocks[max(earlier)] if earlier else ():
            moved = ref()
            if moved is not None:
                moved.prefetch()


class BlockStorage:
    """Where one block keeps what its backward reads: `store` moves an object's tensors to the host, `_Stored`'s
    `unpack` brings them back. `hooks()` does it for every tensor autograd saves in its scope."""

    def __init__(self, offload: ActivationOffload, block: int):
        self.offload, self.block = offload, block

    def store(self, obj: Any) -> Any:
        if isinstance(obj, Tensor) and not (obj.is_floating_point() or obj.dtype in (torch.int8, torch.int64)):
            return obj
        return _Stored(_map_tensors(obj, lambda t: self.offload.move(t, self.block), Tensor))

    def hooks(self) -> contextlib.AbstractContextManager:
        return torch.autograd.graph.saved_tensors_hooks(self.store, lambda saved: saved.unpack()
                                                        if isinstance(saved, _Stored) else saved)


def apply_offload(plan: ParallelPlan, cfg: RecomputeConfig) -> dict[int, BlockStorage]:
    """The host storage of every recomputed block of `plan` (by block index) when `recompute.offload` is "cpu";
    none otherwise. Recomputation and int8 storage (parallel.recompute, parallel.quantize) keep through them."""
    if cfg.offload == "none":
        return {}
    offload = ActivationOffload()
    return {index: offload.storage(index) for index in cfg.selected(len(plan.blocks))}
