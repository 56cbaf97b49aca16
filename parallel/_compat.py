"""Torch's private APIs that lsys uses, fenced in one module (tested with torch 2.13.0).

Torch promises nothing about these. Each is looked up here, by name, when this module is imported (the swapped
methods when their swap is entered), so a torch that lacks one fails at once with a RuntimeError naming it and the
tested version, instead of deep inside a run; tests/test_compat.py checks them all on the installed torch. Where a
public API does the job (`DTensor.to_local()`, ...), the code uses it directly and nothing is fenced.

It lives in `parallel/`, the lowest layer that needs distributed internals, so `parallel/`, `lsys/` and
`launch/` can all import it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

TESTED_TORCH = "2.13.0"


def _missing(what: str) -> RuntimeError:
    return RuntimeError(f"torch {torch.__version__} has no {what}, which lsys uses (tested with torch {TESTED_TORCH})")


def _private(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise _missing(f"{module}.{name}") from e


def _attribute(owner: type, name: str) -> Any:
    try:
        return getattr(owner, name)
    except AttributeError as e:
        raise _missing(f"{owner.__module__}.{owner.__qualname__}.{name}") from e


def _operator(namespace: str, name: str) -> Any:
    try:
        return getattr(getattr(torch.ops, namespace), name).default
    except AttributeError as e:
        raise _missing(f"torch.ops.{namespace}.{name}") from e


# Fake tensors (shapes and storages without memory) and dispatch modes: the memory planner and tracker.
FakeTensor = _private("torch._subclasses.fake_tensor", "FakeTensor")
FakeTensorMode = _private("torch._subclasses.fake_tensor", "FakeTensorMode")
TorchDispatchMode = _private("torch.utils._python_dispatch", "TorchDispatchMode")
is_traceable_wrapper_subclass = _private("torch.utils._python_dispatch", "is_traceable_wrapper_subclass")
tree_leaves = _private("torch.utils._pytree", "tree_leaves")
# c10d's functional collectives: the wait that hands back its input, and the wrapper that waits lazily.
WAIT_TENSOR = _operator("_c10d_functional", "wait_tensor")
AsyncCollectiveTensor = _private("torch.distributed._functional_collectives", "AsyncCollectiveTensor")
# DCP's helper that writes a value into a nested state dict at a path of keys (the restricted loader).
set_element = _private("torch.distributed.checkpoint._traverse", "set_element")
_ShardingPropagator = _private("torch.distributed.tensor._sharding_prop", "ShardingPropagator")
# The profiler's tag of an allocation event (stored-activation measurement).
PROFILER_ALLOCATION = _private("torch._C._profiler", "_EventType").Allocation
_current_graph_task_id = _private("torch._C", "_current_graph_task_id")
_flatten = _attribute(_private("torch.distributed.device_mesh", "DeviceMesh"), "_flatten")
# Where a DTensor's local shard sits in its global tensor (what DCP plans reads with), any placements, FSDP2's
# strided sharding over tensor parallelism included.
_local_shape_and_global_offset = _private("torch.distributed.tensor._utils", "compute_local_shape_and_global_offset")
# CUDA's allocator history, for the memory viewer (https://pytorch.org/memory_viz).
_record_memory_history = _private("torch.cuda.memory", "_record_memory_history")
_dump_snapshot = _private("torch.cuda.memory", "_dump_snapshot")


def operator_returns(func: Any) -> list:
    """The return arguments of an operator overload's schema (each with its alias_info)."""
    return func._schema.returns


def in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (a checkpoint's recompute included)."""
    return _current_graph_task_id() != -1


def flatten_mesh(mesh: Any, name: str) -> Any:
    """One mesh axis `name` over all of `mesh`'s axes (a sub-mesh, e.g. `mesh["dp", "cp_ring"]`), whose process
    group spans them; DeviceMesh has no public way to make one."""
    return _flatten(mesh, name)


def shard_position(param: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's shard of the DTensor `param`."""
    return _local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)


@contextlib.contextmanager
def cuda_memory_history(snapshot: str, max_entries: int) -> Iterator[None]:
    """Records CUDA allocations while entered and dumps them to `snapshot` when left."""
    _record_memory_history(max_entries=max_entries)
    try:
        yield
    finally:
        _dump_snapshot(snapshot)
        _record_memory_history(enabled=None)


@contextlib.contextmanager
def storage_resizes_reported(report: Callable[[torch.UntypedStorage], None]) -> Iterator[None]:
    """While entered, every `UntypedStorage.resize_` calls `report(storage)` once it has resized: FSDP2 grows and
    frees gathered parameters in place, which no operator shows. The swap is process-wide; leaving restores the
    method that was there when it was entered."""
    original = _attribute(torch.UntypedStorage, "resize_")

    def resize_(storage: torch.UntypedStorage, size: int):
        result = original(storage, size)
        report(storage)
        return result

    torch.UntypedStorage.resize_ = resize_
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original


@contextlib.contextmanager
def dtensor_shape_inference_inside(around: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
    """While entered, DTensor's inference of an operator's output shapes (it runs the operator on fake tensors of
    the global shape, outside any fake mode of the caller's) runs inside `around()`. Process-wide, as above."""
    name = "_propagate_tensor_meta_non_cached"
    original = _attribute(_ShardingPropagator, name)

    def infer_shapes(propagator, op_schema):
        with around():
            return original(propagator, op_schema)

    setattr(_ShardingPropagator, name, infer_shapes)
    try:
        yield
    finally:
        setattr(_ShardingPropagator, name, original)
