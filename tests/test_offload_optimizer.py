"""The offloaded optimizer in one process (its store an in-process AdamShard, no Ray): AdamW's update, clipping
and schedule included, for any offloaded fraction; its state survives a checkpoint round trip exactly."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
from torch import nn

from launch.ray_offload import from_wire, local_store, to_wire
from lsys.optim import OffloadedAdamW, parameter_groups, state_bytes

BETAS, EPS, WEIGHT_DECAY = (0.9, 0.95), 1e-8, 0.1


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 11)).to(dtype)


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    tokens = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(step))
    logits = model(tokens).float()
    return nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(1, dims=1).flatten())


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range, stream: bool = False) -> None:
    """As lsys.trainer does it: with `stream`, gradients leave during backward, before clipping, and the step
    gets the clipping factor instead."""
    for step in steps:
        with optimizer.stream_gradients() if stream else contextlib.nullcontext():
            _loss(model, step).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * (0.5 + 0.5 * math.cos(step / 3))  # a schedule: the store gets each step's lr
        if stream:
            optimizer.step(grad_scale=torch.clamp(0.5 / (norm + 1e-6), max=1.0).item())
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _offloaded(model: nn.Module, fraction: float) -> OffloadedAdamW:
    # Buckets of 100 elements: several per group, sent one by one as backward reaches them.
    return OffloadedAdamW(parameter_groups(model, WEIGHT_DECAY), local_store(), lr=1e-2, betas=BETAS, eps=EPS,
                          fraction=fraction, bucket_elements=100)


@pytest.mark.parametrize(("fraction", "stream"), [(1.0, True), (0.5, True), (0.5, False)])
def test_offloaded_adamw_matches_torch_adamw(fraction, stream):
    reference, model = _model(), _model()
    adamw = torch.optim.AdamW(parameter_groups(reference, WEIGHT_DECAY), lr=1e-2, betas=BETAS, eps=EPS)
    optimizer = _offloaded(model, fraction)
    assert (optimizer.kept is None) == (fraction == 1.0)
    assert len(optimizer.buckets) > (2 if fraction == 1.0 else 0)
    _train(reference, adamw, range(6))
    _train(model, optimizer, range(6), stream)
    for (name, expected), got in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got, expected, msg=lambda m, n=name: f"{n}: {m}")


def test_state_round_trip_continues_exactly():
    model, twin = _model(), _model()
    optimizer = _offloaded(model, 0.5)
    _train(model, optimizer, range(3))
    buffer = io.BytesIO()
    torch.save(optimizer.rank_state(), buffer)
    twin.load_state_dict(model.state_dict())
    restored = _offloaded(twin, 0.5)
    restored.load_rank_state(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    _train(model, optimizer, range(3, 6), stream=True)
    _train(twin, restored, range(3, 6), stream=True)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = _offloaded(_model(), 1.0)
    with pytest.raises(ValueError, match="resume with the parallel layout and optim.fraction it was saved with"):
        other.load_rank_state(optimizer.rank_state())


def test_bf16_parameters_keep_fp32_masters_off_the_rank():
    model = _model(torch.bfloat16)
    optimizer = _offloaded(model, 1.0)
    _train(model, optimizer, range(2))
    held = state_bytes(model, optimizer)
    count = sum(p.numel() for p in model.parameters())
    assert held == {"parameters": 2 * count, "gradients": 2 * count, "optimizer": 0}
    masters = optimizer.rank_state()["offloaded"]
    assert masters["master.0"].dtype == torch.float32 and masters["exp_avg_sq.0"].dtype == torch.float32
    # what the rank holds is its fp32 master rounded to bf16
    flat = torch.cat([p.detach().reshape(-1) for p in optimizer.buckets[0].params])
    torch.testing.assert_close(flat, masters["master.0"].to(torch.bfloat16), rtol=0, atol=0)


def test_bf16_travels_as_its_bit_pattern():
    values = torch.randn(1000).to(torch.bfloat16)
    wire = to_wire(values)
    assert wire.dtype.itemsize == 2
    assert torch.equal(from_wire(wire, torch.bfloat16), values)
