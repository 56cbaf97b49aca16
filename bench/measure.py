"""What bench/context_attention.py measures on one rank: peak allocated bytes, bytes saved for backward, time.

The memory counters look at the allocations themselves rather than the process RSS: ranks share one machine
and the CPU allocator keeps freed pages, so RSS would blur the methods into one another.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor


def peak_allocated(step: Callable[[], None]) -> int:
    """Peak net bytes allocated (allocations minus frees) while `step` runs, on top of what was live before."""
    return allocation_totals(step)[0]


def allocation_totals(step: Callable[[], None]) -> tuple[int, int]:
    """(peak, net) bytes allocated while `step` runs: the running total's maximum, and what is still live after it
    of what it allocated (frees of memory allocated before it are not seen)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # The public key_averages() only sums allocations per op; the event tree keeps each one with its time, so
    # the running total (frees have negative sizes) gives the true peak.
    allocations, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        if node.tag == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak, live


def saved_bytes_of(forward: Callable[[], Tensor]) -> tuple[Tensor, int]:
    """Run `forward`; bytes of the distinct storages it saved for backward (views of one storage count once)."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, sum(storages.values())


def timed(step: Callable[[], None]) -> float:
    """Seconds this rank spends in `step`, started together with the other ranks."""
    dist.barrier()
    start = time.perf_counter()
    step()
    return time.perf_counter() - start
