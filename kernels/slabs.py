"""Loops over a long tensor in slabs, and the slabs such a loop must run when the memory planner traces it.

Several loops bound their temporaries by working through a tensor a slab at a time: int8 quantization
(kernels/quant.py), RMSNorm (lsys/norm.py), the tiled feed-forward (lsys/tiling.py). On fake tensors (`lsys plan`)
only their allocations matter, and every slab after the first allocates what the second does, so the planner runs
the first, the second and the last: a trace sees the same peak and breakdown with a few operators instead of one
set per slab (tests/memory/test_plan_fast_paths.py pins it). Callers pass `shapes_only` for fake tensors
(`parallel._compat.FakeTensor`).
"""

from __future__ import annotations


def worked_slabs(total: int, step: int, shapes_only: bool = False) -> list[int]:
    """The starts of the slabs a loop works through: every one, or with `shapes_only` the first, the second and
    the last. A slab allocates the same temporaries as any other of its size while the previous slab's are still
    held (its loop variables), so the first (nothing before it), the second (a full slab before it) and the last
    (the only one that may be shorter) are every state the loop's memory passes through: a tracker sees the same
    peak and breakdown. What the slabs left out would have written is not written."""
    starts = list(range(0, total, step))
    if shapes_only and len(starts) > 3:
        return [starts[0], starts[1], starts[-1]]
    return starts
