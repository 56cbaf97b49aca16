"""The planner's shortcuts change how long a trace takes, never what it finds: the traced peak, its breakdown and
the stored activations equal those of the slow path on a tiny model."""

from __future__ import annotations

from typing import Any

import pytest

from launch.local import spawn
from lsys.config import config_from_dict, load_config, to_dict

SMALL = ["train.device=cpu", "train.global_batch_size=4", "data.seq_len=256", "data.curriculum.start_len=0",
         "parallel.dp=-1", "parallel.cp_ring=2", "quant.activations=int8"]
# Everything a trace finds but its clock (the timeline and phases count allocation events, and a shortcut makes
# fewer of them).
FOUND = ("peak_bytes", "start_bytes", "params", "gathered_params", "grads", "optimizer", "activations",
         "temporaries", "activations_by_layer", "stored_activations_bytes", "peak_at")


def _int8_trace(values: dict[str, Any], world_size: int, every_slab: bool) -> tuple[dict[str, Any], int]:
    """Trace with the quantizer's slabs 256 elements long (many slabs even on this model), every slab run
    (`every_slab`: as if the tensors had values) or only those the fake-tensor path runs; and how many slabs
    were left out. Without garbage collection: when it runs depends on how many Python objects were made
    before, which the shortcut changes by design, and a tensor in a reference cycle is freed when it runs (a
    trace with it on differs from run to run now and then by such a tensor, shortcut or not)."""
    import gc

    import kernels.quant
    import parallel.quantize
    from lsys.memory.trace import trace_rank

    kernels.quant.CHUNK = 256
    if every_slab:
        parallel.quantize.FakeTensor = type("NotAFakeTensor", (), {})  # isinstance(t, FakeTensor) is False
    left_out, worked = [0], kernels.quant.worked_slabs

    def counted(total: int, step: int, shapes_only: bool = False) -> list[int]:
        starts = worked(total, step, shapes_only)
        left_out[0] += len(range(0, total, step)) - len(starts)
        return starts

    kernels.quant.worked_slabs = counted
    gc.collect()
    gc.disable()
    usage = trace_rank(config_from_dict(values), world_size).to_dict()
    return {key: usage[key] for key in FOUND}, left_out[0]


@pytest.mark.parametrize("mode", ["none", "selective"])
def test_fake_quantizer_traces_the_same_memory_as_every_slab(mode):
    values = to_dict(load_config("configs/demo.yaml", [*SMALL, f"recompute.mode={mode}"]))
    slow, slow_left_out = spawn(_int8_trace, 1, (values, 2, True), timeout_s=300)[0]
    fast, fast_left_out = spawn(_int8_trace, 1, (values, 2, False), timeout_s=300)[0]
    assert slow_left_out == 0 and fast_left_out > 100, "the shortcut must be the only difference, and taken"
    assert fast == slow


class _NoOptimizer:
    def held_state_tensors(self) -> list:
        return []

    def host_buffers(self) -> list:
        return []


def _quantize_peak(shapes_only: bool) -> dict[str, Any]:
    import torch

    import kernels.quant
    from lsys.memory.tracker import MemoryTracker
    from parallel._compat import FakeTensorMode

    fake = FakeTensorMode()
    with fake:
        x = torch.randn(1000, 64, dtype=torch.bfloat16)  # 1000 rows of 64 channels: 7 slabs of 152 rows + 88
        scale, shift = torch.ones(8), torch.zeros(8)
    tracker = MemoryTracker(torch.nn.Module(), _NoOptimizer(), fake_mode=fake)
    with fake, tracker:
        kernels.quant.rand_quantize_int8(x, scale, shift, channel_dim=1, seed=0, shapes_only=shapes_only)
    usage = tracker.usage()
    return {"peak_bytes": usage.peak_bytes, "temporaries": usage.breakdown["temporaries"]}


def test_fake_quantizer_loop_passes_through_the_same_memory(monkeypatch):
    import kernels.quant

    monkeypatch.setattr(kernels.quant, "CHUNK", 608)  # 608 * 16 // 64 = 152 rows a slab
    every, shortcut = _quantize_peak(False), _quantize_peak(True)
    assert every == shortcut
    # The codes (128,000 B) and, at the peak, a slab's temporaries next to the previous slab's loop variables.
    assert every["peak_bytes"] > 128_000 + 2 * 152 * 64 * 4
