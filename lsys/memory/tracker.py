"""Which tensors a rank holds at every moment of a training step, and why: a dispatch-mode memory tracker.

    tracker = MemoryTracker(model, optimizer)
    with tracker:
        work.probe = tracker          # the step announces its phases
        ...run steps...
    usage = tracker.usage()           # peak, breakdown at the peak, timeline

Every operator's outputs are seen here; each new storage gets a record (bytes, when it was born and freed, the
phase and innermost module running at birth). A storage's weak reference tells when it is freed, so the same
tracker works on real tensors (the profiler) and on fake ones, which own no memory (the planner). Categories:

- params: the rank's parameter shards (and buffers), held before the step;
- gathered_params: full parameters FSDP2 gathers for a block (it grows and frees their storage in place, which
  no operator shows, so `UntypedStorage.resize_` is watched while tracking);
- grads: a gradient once it is final (post-accumulate-grad hook), for its whole life;
- optimizer: the optimizer's state tensors this rank holds (Adam moments, step counts; not a store's);
- activations: born in a forward and still alive when that forward ends: what backward keeps, whatever keeps it
  (autograd, a checkpoint's inputs, a selective-recompute cache, int8 payloads), by layer;
- temporaries: everything else (workspaces, communication buffers, recomputed activations, unsharded gradients).

Host memory is counted apart (`host_peak_bytes`): host copies of offloaded activations (recompute.offload,
parallel.offload), made under `parallel.offload.host_allocations()`; with optim.offload the buffers gradients
leave the rank through (the optimizer's `host_buffers()`; both in the timeline's "offloaded"); and with
`host_state` (parallel.fsdp_offload: FSDP2 keeps parameter and gradient shards on the host, where the optimizer
steps) the params, grads and optimizer categories. `peak_bytes` is the device's; the breakdown gives every
category at that moment, host ones included, and `host_categories` names the host ones. On CPU the host is the
same memory, but a run on GPUs would hold them in host memory, which is what the planner is asked about.

Operators on DTensors are left to DTensor (this mode declines them), so the local operators it runs, and their
buffers, are seen too. DTensor works out each new operator's output sharding by running it on fake tensors of the
global shape; those hold no memory, and when planning they are tensors of the planner's own fake mode, so
`ShardingPropagator`'s shape inference is watched too and what it runs is not recorded.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lsys.optim import TrainingOptimizer, local_shard
from parallel._compat import (
    WAIT_TENSOR,
    FakeTensor,
    FakeTensorMode,
    TorchDispatchMode,
    dtensor_shape_inference_inside,
    is_traceable_wrapper_subclass,
    operator_returns,
    storage_resizes_reported,
    tree_leaves,
)
from parallel.activations import OUTSIDE, split_path
from parallel.offload import host_allocations_active

CATEGORIES = ("params", "gathered_params", "grads", "optimizer", "activations", "temporaries")  # device memory
HOST = "offloaded"  # host copies of offloaded activations, the optimizer's host buffers
HOST_STATE = ("params", "grads", "optimizer")  # on the host too when FSDP2 offloads the state
TIMELINE_POINTS = 600


class _Record:
    __slots__ = ("nbytes", "start", "end", "phase", "module", "category", "refs", "holders")

    def __init__(self, nbytes: int, start: int, phase: str, module: str, category: str | None):
        self.nbytes, self.start, self.end = nbytes, start, None
        self.phase, self.module, self.category = phase, module, category
        self.refs: list[weakref.ref] = []  # one per storage object over this memory
        self.holders = 0


@dataclass
class MemoryUsage:
    """One rank's tracked memory: the peak and its breakdown, and the timeline of every category."""

    peak_bytes: int  # device memory
    start_bytes: int  # held when tracking began (the state carried from step to step)
    breakdown: dict[str, int]  # category -> bytes at the peak (the device categories sum to peak_bytes)
    activations_by_layer: dict[str, int]  # at the peak
    stored_activations_bytes: int  # the most any forward left alive for its backward
    peak_step: int
    peak_phase: str
    timeline: dict[str, list[int]] = field(default_factory=dict)  # "clock" and one series per category
    phases: list[dict] = field(default_factory=list)  # {"step", "phase", "start", "end"} on the same clock
    host_peak_bytes: int = 0  # the most held in host memory at once (offloaded activations, host categories)
    host_categories: tuple[str, ...] = ()  # categories held in host memory

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "start_bytes": self.start_bytes, **self.breakdown,
                "host_peak_bytes": self.host_peak_bytes, "host_categories": list(self.host_categories),
                "activations_by_layer": self.activations_by_layer,
                "stored_activations_bytes": self.stored_activations_bytes,
                "peak_at": {"step": self.peak_step, "phase": self.peak_phase},
                "timeline": self.timeline, "phases": self.phases}


class MemoryTracker(TorchDispatchMode):
    def __init__(self, model: nn.Module, optimizer: TrainingOptimizer, fake_mode: FakeTensorMode | None = None,
                 host_state: bool = False):
        """`fake_mode`: the mode whose fake tensors stand for memory (planning); None on real tensors.
        `host_state`: parameters, gradients and optimizer state live in host memory (parallel.fsdp_offload)."""
        super().__init__()
        self.model, self.optimizer, self.fake_mode = model, optimizer, fake_mode
        self.host_categories = HOST_STATE if host_state else ()
        self._records: list[_Record] = []
        self._live: dict[int, _Record] = {}  # id(storage) -> record; a storage's Python object lives as long as it
        self._clock = 0
        self._lock = threading.RLock()  # frees come from autograd's device threads, or from a collection inside
        self._phase, self._phase_start, self._step = "setup", 0, 0
        self._modules: list[str] = []
        self._phases: list[dict] = []
        self._handles: list = []
        self._stored_max = 0
        self._swaps: contextlib.ExitStack | None = None  # torch's methods swapped while tracking
        self._inferring_shapes = 0
        self._start_clock = self._end_clock = 0

    # -- recording ------------------------------------------------------------------------------------------

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _open(self, storage: torch.UntypedStorage, category: str | None) -> _Record:
        if category is None and host_allocations_active():
            category = HOST
        with self._lock:
            record = _Record(storage.nbytes(), self._tick(), self._phase,
                             self._modules[-1] if self._modules else OUTSIDE, category)
            self._hold(storage, record)
            self._records.append(record)
            return record

    def _hold(self, storage: torch.UntypedStorage, record: _Record) -> None:
        """One more storage object over the record's memory; the memory is freed when the last one is."""
        key = id(storage)
        record.refs.append(weakref.ref(storage, lambda _, r=record, k=key: self._release(r, k)))
        record.holders += 1
        self._live[key] = record

    def _release(self, record: _Record, key: int) -> None:
        with self._lock:
            if self._live.get(key) is record:
                del self._live[key]
            record.holders -= 1
            if record.holders == 0:
                self._close(record)

    def _close(self, record: _Record) -> None:
        with self._lock:
            if record.end is None:
                record.end = self._tick()

    def _forget(self, storage: torch.UntypedStorage, record: _Record) -> None:
        """The storage's memory changed size in place: its record ends now (a new one starts if it has bytes)."""
        self._live.pop(id(storage), None)
        self._close(record)

    def _share(self, output: Tensor, source: Tensor) -> None:
        """`output` holds `source`'s memory: c10d's wait_tensor hands back its input, but on fake tensors the
        output gets a storage object of its own."""
        storage = output.untyped_storage()
        record = self._live.get(id(source.untyped_storage()))
        if id(storage) in self._live:
            return
        if record is None:
            self._see(output)
        else:
            self._hold(storage, record)

    def _see(self, tensor: Tensor, category: str | None = None) -> _Record | None:
        try:
            storage = local_shard(tensor).untyped_storage()
        except (NotImplementedError, RuntimeError):  # tensors without a storage (sparse, nested)
            return None
        record = self._live.get(id(storage))
        if record is None and not _holds_memory(storage):
            return None
        if record is not None and record.nbytes != storage.nbytes():  # an out= operator resized it
            self._forget(storage, record)
            record = self._open(storage, record.category)
        if record is None:
            record = self._open(storage, category)
        elif category is not None:
            record.category = category
        return record

    def _resized(self, storage: torch.UntypedStorage) -> None:
        record = self._live.get(id(storage))
        if record is not None and record.nbytes == storage.nbytes():
            return
        if record is not None:
            if record.category in (None, "activations"):  # made by an operator, but it is a gathered buffer
                record.category = "gathered_params"
            self._forget(storage, record)
        if storage.nbytes():
            self._open(storage, "gathered_params")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor runs local operators, which come back here
        out = func(*args, **(kwargs or {}))
        if self._inferring_shapes:
            return out
        if func is WAIT_TENSOR:
            self._share(out, args[0])
            return out
        if _returns_alias(func):  # views and in-place operators: no new memory (fake views may not share storage)
            return out
        for leaf in tree_leaves(out):
            if isinstance(leaf, Tensor) and self._counts(leaf):
                self._see(leaf)
        return out

    def _counts(self, tensor: Tensor) -> bool:
        """A wrapper subclass (c10d's AsyncCollectiveTensor) reports its inner tensor's size, and the inner tensor
        is counted on its own; fake tensors of another fake mode (DTensor's sharding propagation) hold nothing."""
        if is_traceable_wrapper_subclass(tensor):
            return False
        return not isinstance(tensor, FakeTensor) or tensor.fake_mode is self.fake_mode

    # -- what the step tells it -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Around one phase of the step ("forward", "backward", "optimizer"); a new forward after an optimizer
        phase starts a new step."""
        if name == "forward" and self._phases and self._phases[-1]["phase"] == "optimizer":
            self._step += 1
        self._phase, self._phase_start = name, self._clock
        try:
            yield
        finally:
            self._end_phase(name)

    def _end_phase(self, name: str) -> None:
        if name == "forward":
            stored = 0
            for record in list(self._live.values()):
                if record.category is None and record.phase == "forward" and record.start > self._phase_start:
                    record.category = "activations"
                    stored += record.nbytes
            self._stored_max = max(self._stored_max, stored)
        if name == "optimizer":
            for tensor in self.optimizer.held_state_tensors():
                self._see(tensor, "optimizer")
            for tensor in self.optimizer.host_buffers():  # made at the first step's backward
                self._see(tensor, HOST)
        self._phases.append({"step": self._step, "phase": name, "start": self._phase_start, "end": self._clock})
        self._phase = "between"

    def _enter_module(self, path: str) -> None:
        self._modules.append(path)

    def _leave_module(self) -> None:
        self._modules.pop()

    def _final_grad(self, param: Tensor) -> None:
        if param.grad is not None:
            self._see(param.grad, "grads")

    # -- entering and leaving ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _inferring(self) -> Iterator[None]:
        self._inferring_shapes += 1
        try:
            yield
        finally:
            self._inferring_shapes -= 1

    def __enter__(self):
        if self._swaps is not None:
            raise RuntimeError("a MemoryTracker is entered once")
        for param in self.model.parameters():
            self._see(param, "params")
            if param.grad is not None:
                self._see(param.grad, "grads")
            self._handles.append(param.register_post_accumulate_grad_hook(self._final_grad))
        for buffer in self.model.buffers():
            self._see(buffer, "params")
        for tensor in self.optimizer.held_state_tensors():
            self._see(tensor, "optimizer")
        for tensor in self.optimizer.host_buffers():
            self._see(tensor, HOST)
        for name, module in self.model.named_modules():
            path = name or OUTSIDE
            self._handles.append(module.register_forward_pre_hook(lambda *_, p=path: self._enter_module(p)))
            self._handles.append(module.register_forward_hook(lambda *_: self._leave_module(), always_call=True))
        self._start_clock = self._clock
        with contextlib.ExitStack() as swaps:
            swaps.enter_context(storage_resizes_reported(self._resized))
            swaps.enter_context(dtensor_shape_inference_inside(self._inferring))
            self._swaps = swaps.pop_all()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._swaps.close()
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            with self._lock:
                self._end_clock = self._tick()

    # -- the result -----------------------------------------------------------------------------------------------

    def usage(self) -> MemoryUsage:
        """Peak, breakdown and timeline of everything recorded while the tracker was entered."""
        end = self._end_clock
        deltas = {c: np.zeros(end + 2, dtype=np.int64) for c in (*CATEGORIES, HOST)}
        records = list(self._records)
        for record in records:
            series = deltas[record.category or "temporaries"]
            series[record.start] += record.nbytes
            if record.end is not None and record.end <= end:  # else still held when tracking stopped
                series[record.end] -= record.nbytes
        levels = {c: np.cumsum(d) for c, d in deltas.items()}
        host = levels.pop(HOST) + sum(levels[c] for c in self.host_categories)
        total = sum(level for c, level in levels.items() if c not in self.host_categories)
        at = int(np.argmax(total))
        by_layer: dict[str, int] = {}
        for record in records:
            alive = record.start <= at and (record.end is None or at < record.end)
            if alive and record.category == "activations":
                layer = split_path(record.module)[0] if record.module != OUTSIDE else OUTSIDE
                by_layer[layer] = by_layer.get(layer, 0) + record.nbytes
        between = {"step": self._step, "phase": "between"}
        where = next((p for p in self._phases if p["start"] <= at <= p["end"]), between)
        # The highest moment of each stretch of the clock, so narrow peaks survive the sampling.
        edges = np.linspace(0, end + 1, TIMELINE_POINTS + 1).astype(np.int64)
        stretches = [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True) if hi > lo]
        clock = np.unique([lo + int(np.argmax(total[lo:hi])) for lo, hi in stretches])
        return MemoryUsage(
            peak_bytes=int(total[at]),
            start_bytes=int(total[self._start_clock]),
            breakdown={c: int(levels[c][at]) for c in CATEGORIES},
            activations_by_layer=dict(sorted(by_layer.items(), key=_layer_order)),
            stored_activations_bytes=self._stored_max,
            peak_step=where["step"],
            peak_phase=where["phase"],
            timeline={"clock": clock.tolist(), **{c: levels[c][clock].tolist() for c in CATEGORIES},
                      HOST: host[clock].tolist()},
            phases=self._phases,
            host_peak_bytes=int(host.max()),
            host_categories=self.host_categories,
        )


@functools.cache
def _returns_alias(func) -> bool:
    """Whether every output of the operator aliases an input (views, in-place and out= variants)."""
    returns = operator_returns(func)
    return bool(returns) and all(r.alias_info is not None for r in returns)


def _holds_memory(storage: torch.UntypedStorage) -> bool:
    """False for a storage without data of its own (a wrapper subclass's, seen through a view of it)."""
    if storage.device.type == "meta":
        return True
    try:
        storage.data_ptr()
    except RuntimeError:
        return False
    return True


def _layer_order(item: tuple[str, int]) -> tuple:
    """blocks.2 before blocks.10; named layers (embed, lm_head) after the blocks by name."""
    parts = item[0].split(".")
    return (0, parts[0], int(parts[-1])) if parts[-1].isdigit() else (1, item[0], 0)
