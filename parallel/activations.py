"""What a forward pass stores until backward, measured per layer and kind from the allocator's own records.

    loss, stored = measure_stored_activations(model, lambda: model(tokens, positions).sum())
    stored.total_bytes(); stored.by_layer(); stored.by_kind()

Stored = allocated during the forward and still alive when it returns, minus the returned tensor itself.
That is what backward keeps alive whatever keeps it: autograd's saved tensors, a checkpoint's kept inputs,
a selective-checkpoint cache, or int8 payloads from saved-tensor hooks; counting only saved-tensor hooks
would miss all but the first. torch.profiler records every allocation and free with the operator it came
from; module hooks open a record_function range per module, so each allocation is attributed to the
innermost module running when it was made ("blocks.3.attn.wq" -> layer "blocks.3", kind "attn.wq").
Works on CPU and CUDA (the profiler tracks both allocators).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

OUTSIDE = "(outside modules)"


def split_path(path: str) -> tuple[str, str]:
    """"blocks.3.attn.wq" -> ("blocks.3", "attn.wq"); a path without an index is its own layer."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1]), ".".join(parts[i + 1 :]) or "(block)"
    return parts[0], ".".join(parts[1:]) or "(module)"


@dataclass
class StoredActivations:
    bytes_by_path: dict[str, int] = field(default_factory=dict)

    def total_bytes(self) -> int:
        return sum(self.bytes_by_path.values())

    def by_layer(self) -> dict[str, int]:
        return self._grouped(0)

    def by_kind(self) -> dict[str, int]:
        """Bytes per kind summed over layers ("attn.wq" of every block together)."""
        return self._grouped(1)

    def _grouped(self, part: int) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for path, size in self.bytes_by_path.items():
            totals[split_path(path)[part] if path != OUTSIDE else OUTSIDE] += size
        return dict(totals)


def _module_windows(model: nn.Module, windows: list[list]) -> list:
    """Forward hooks appending [path, start_ns, end_ns] for every module forward, on the profiler's clock
    (Unix time in ns). Plain timestamps rather than profiler ranges: ranges opened from hooks are lost when a
    dispatch mode (selective checkpointing, FlopCounterMode) is active, timestamps are not."""
    handles, open_windows = [], []

    def enter(path: str) -> None:
        window = [path, time.time_ns(), None]
        open_windows.append(window)
        windows.append(window)

    def leave() -> None:
        open_windows.pop()[2] = time.time_ns()

    for name, module in model.named_modules():
        path = name or OUTSIDE
        handles.append(module.register_forward_pre_hook(lambda *_, p=path: enter(p)))
        handles.append(module.register_forward_hook(lambda *_: leave(), always_call=True))
    return handles


def _owner(start_ns: int, windows: list[list]) -> str:
    """The innermost module forward running at `start_ns`: the latest-starting window that contains it."""
    inside = [w for w in windows if w[1] <= start_ns <= w[2]]
    return max(inside, key=lambda w: w[1])[0] if inside else OUTSIDE


def measure_stored_activations(model: nn.Module, forward: Callable[[], Tensor]) -> tuple[Tensor, StoredActivations]:
    """Run `forward` (a closure over `model`); returns its output and the bytes it left alive, per module."""
    from torch.profiler import ProfilerActivity, profile

    from parallel._compat import PROFILER_ALLOCATION

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    windows: list[list] = []
    handles = _module_windows(model, windows)
    try:
        with profile(activities=activities, profile_memory=True) as prof:
            output = forward()
    finally:
        for handle in handles:
            handle.remove()
    events, pending = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        if node.tag == PROFILER_ALLOCATION:
            events.append(node)
    live: dict[tuple[str, int], tuple[int, str]] = {}  # (device, ptr) -> (bytes, owner)
    for node in sorted(events, key=lambda n: n.start_time_ns):
        fields = node.extra_fields
        key = (str(fields.device), fields.ptr)
        if fields.alloc_size > 0:
            live[key] = (fields.alloc_size, _owner(node.start_time_ns, windows))
        else:
            live.pop(key, None)  # frees of memory allocated before the forward are not ours to count
    returned = output.untyped_storage().data_ptr()
    totals: dict[str, int] = defaultdict(int)
    for (_, ptr), (size, owner) in live.items():
        if ptr != returned:
            totals[owner] += size
    return output, StoredActivations(dict(totals))
