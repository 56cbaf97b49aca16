"""The offloaded optimizer in one process (its store an in-process AdamShard, no Ray): AdamW's update, clipping
and schedule included, for any offloaded fraction; its state survives a checkpoint round trip exactly; gradients
reach the store through one host buffer per bucket, in the order backward finishes the buckets."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
from torch import nn

from launch.ray_offload import from_wire, local_store, to_wire
from lsys.memory.tracker import MemoryTracker
from lsys.optim import GRADIENT_BUFFERS, OffloadedAdamW, OptimizerStore, parameter_groups, state_bytes

BETAS, EPS, WEIGHT_DECAY = (0.9, 0.95), 1e-8, 0.1


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.Linear(16, 11)).to(dtype)


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    tokens = torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(step))
    tokens = tokens.to(next(model.parameters()).device)
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


def _offloaded(model: nn.Module, fraction: float, store: OptimizerStore | None = None) -> OffloadedAdamW:
    # Buckets of 100 elements: several per group, sent one by one as backward reaches them.
    return OffloadedAdamW(parameter_groups(model, WEIGHT_DECAY), store or local_store(), lr=1e-2, betas=BETAS,
                          eps=EPS, fraction=fraction, bucket_elements=100)


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


def test_a_bucket_the_last_micro_batch_does_not_reach_is_clipped_once():
    """Two micro-batches, the last reaching only the output layer: the other buckets are not final in the
    streamed backward, so they leave at the step, already clipped; the store must not scale them again."""
    reference, model = _model(), _model()
    adamw = torch.optim.AdamW(parameter_groups(reference, WEIGHT_DECAY), lr=1e-2, betas=BETAS, eps=EPS)
    optimizer = _offloaded(model, 1.0)
    for step in range(3):
        for net, opt, stream in ((reference, adamw, False), (model, optimizer, True)):
            _loss(net, step).backward()
            with opt.stream_gradients() if stream else contextlib.nullcontext():
                (3.0 * net[3].weight.square().sum()).backward()
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
            assert norm > 1.0  # clipping scales every gradient
            if stream:
                opt.step(grad_scale=torch.clamp(0.5 / (norm + 1e-6), max=1.0).item())
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
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


class _Recording:
    """The store, keeping what each put_grad got (a copy: the buffer is the optimizer's again once it returns)."""

    def __init__(self, store: OptimizerStore):
        self.store = store
        self.log: list[tuple[str, int, int, torch.Tensor | None]] = []  # (call, bucket, buffer address, gradient)

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    def put_grad(self, bucket: int, grad: torch.Tensor) -> None:
        self.log.append(("put_grad", bucket, grad.data_ptr(), grad.clone()))
        self.store.put_grad(bucket, grad)

    def drop_gradients(self) -> None:
        self.log.append(("drop_gradients", -1, 0, None))
        self.store.drop_gradients()

    def sent(self) -> list[int]:
        return [bucket for call, bucket, _, _ in self.log if call == "put_grad"]


def _streamed_backward(model: nn.Module, optimizer: OffloadedAdamW, step: int) -> tuple[dict, list[int]]:
    """The step's last backward, gradients streamed as lsys.step runs it. Returns each bucket's flat gradient as
    backward left it, on the CPU (what the store must get), and the buckets in the order backward made their last
    gradient final."""
    final: list[int] = []
    bucket_of = {id(p): index for index, bucket in enumerate(optimizer.buckets) for p in bucket.params}
    handles = [p.register_post_accumulate_grad_hook(lambda p: final.append(bucket_of[id(p)]))
               for bucket in optimizer.buckets for p in bucket.params]
    try:
        with optimizer.stream_gradients():
            _loss(model, step).backward()
    finally:
        for handle in handles:
            handle.remove()
    flat = {index: torch.cat([p.grad.reshape(-1) for p in bucket.params]).cpu()
            for index, bucket in enumerate(optimizer.buckets)}
    last = {index: position for position, index in enumerate(final)}
    return flat, sorted(last, key=last.__getitem__)


def _clipped_step(model: nn.Module, optimizer: OffloadedAdamW) -> None:
    """Clipping scales the local gradients in place (after the copies have read them); the step gets its factor."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    optimizer.step(grad_scale=torch.clamp(0.5 / (norm + 1e-6), max=1.0).item())
    optimizer.zero_grad(set_to_none=True)


def test_each_bucket_reaches_the_store_through_a_reused_buffer_as_backward_finishes_it():
    model = _model()
    store = _Recording(local_store())
    optimizer = _offloaded(model, 1.0, store)
    buffers = None
    for step in range(3):
        store.log.clear()
        flat, finished = _streamed_backward(model, optimizer, step)
        assert finished != sorted(finished)  # backward finishes the groups' buckets interleaved
        assert store.sent() == finished, "each bucket once, as soon as backward has finished it"
        _clipped_step(model, optimizer)
        addresses = [b.data_ptr() for b in optimizer.host_buffers()]
        for _, bucket, address, grad in store.log:
            assert address in addresses  # sent from one of the buffers
            assert torch.equal(grad, flat[bucket])
        assert buffers in (None, addresses), "the buffers are made at the first step and reused after"
        buffers = addresses
    assert len(set(buffers)) == len(buffers) == GRADIENT_BUFFERS
    largest = max(sum(p.numel() for p in bucket.params) for bucket in optimizer.buckets)
    assert all(b.numel() == largest for b in optimizer.host_buffers())
    assert not any(b.is_pinned() for b in optimizer.host_buffers())  # CPU gradients: plain host memory


class _SlowCopy:
    """Stands for a copy's CUDA event: the copy arrives once it has been asked about twice, or waited for."""

    def __init__(self):
        self.asked, self.arrived = 0, False

    def query(self) -> bool:
        self.asked += 1
        self.arrived = self.arrived or self.asked >= 2
        return self.arrived

    def synchronize(self) -> None:
        self.arrived = True


def test_copies_under_way_reach_the_store_once_arrived_in_the_order_they_started(monkeypatch):
    """The CUDA path's bookkeeping on CPU: each copy is reported under way until its (stand-in) event says it has
    arrived; the result is the same, bit for bit, as with copies that arrive at once."""
    model, twin = _model(), _model()
    store = _Recording(local_store())
    optimizer, reference = _offloaded(model, 1.0, store), _offloaded(twin, 1.0)
    copies: dict[int, _SlowCopy] = {}
    started: list[int] = []
    copy, put_grad = optimizer._copy, store.put_grad

    def slow_copy(grads, host):
        assert copy(grads, host) is None  # made now on CPU; its stand-in event says it is still under way
        started.append(next(i for i, bucket in enumerate(optimizer.buckets) if bucket.params[0].grad is grads[0]))
        copies[started[-1]] = _SlowCopy()
        return copies[started[-1]]

    def arrived_put_grad(bucket, grad):
        assert copies[bucket].arrived, f"bucket {bucket} sent before its copy arrived"
        put_grad(bucket, grad)

    monkeypatch.setattr(optimizer, "_copy", slow_copy)
    monkeypatch.setattr(store, "put_grad", arrived_put_grad)
    for step in range(3):
        store.log.clear()
        started.clear()
        _, finished = _streamed_backward(model, optimizer, step)
        _streamed_backward(twin, reference, step)
        during_backward = len(store.log)
        if step == 2:  # a skipped step: what is under way arrives, then the store drops it
            optimizer.discard_gradients()
            reference.discard_gradients()
            assert store.log[-1][0] == "drop_gradients" and store.sent() == started
            break
        _clipped_step(model, optimizer)
        _clipped_step(twin, reference)
        assert 0 < during_backward < len(optimizer.buckets), "some arrive at later hooks, the step waits for the rest"
        assert started == finished and store.sent() == started
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_parameter_without_gradient_still_stops_the_step():
    model = _model()
    optimizer = _offloaded(model, 1.0)
    with optimizer.stream_gradients():
        model[0](torch.arange(11)).sum().backward()  # the embedding alone: the linear layers get no gradient
    with pytest.raises(RuntimeError, match="offloaded parameters have no gradient; every parameter must take part"):
        optimizer.step()


def test_a_gradient_after_its_bucket_was_sent_is_refused():
    model = _model()
    optimizer = _offloaded(model, 1.0)
    with optimizer.stream_gradients():
        _loss(model, 0).backward()  # every bucket sent
        with pytest.raises(RuntimeError, match="gradient changed after its bucket was sent"):
            _loss(model, 1).backward()


def test_the_memory_tracker_counts_the_buffers_as_host_memory():
    model = _model()
    optimizer = _offloaded(model, 0.5)

    def tracked_step(tracker: MemoryTracker, step: int) -> None:
        with optimizer.stream_gradients():
            with tracker.phase("forward"):
                loss = _loss(model, step)
            with tracker.phase("backward"):
                loss.backward()
        with tracker.phase("optimizer"):
            _clipped_step(model, optimizer)

    first, later = MemoryTracker(model, optimizer), MemoryTracker(model, optimizer)
    with first:  # the buffers are made in the first step's backward
        for step in range(2):
            tracked_step(first, step)
    with later:  # they are there before tracking starts
        tracked_step(later, 2)
    held = sum(t.nbytes for t in optimizer.host_buffers())
    largest = max(sum(p.numel() for p in bucket.params) for bucket in optimizer.buckets)
    assert held == GRADIENT_BUFFERS * 4 * largest
    assert first.usage().host_peak_bytes == later.usage().host_peak_bytes == held


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side-stream copies need a CUDA device")
def test_side_stream_copies_give_the_parameters_of_synchronous_ones():
    """On CUDA the hooks copy into pinned buffers on a side stream and return at once; clipping then scales the
    gradients in place. The store must still get the gradients as backward left them, and two steps must end
    where the synchronous copies of the CPU path end."""
    on_gpu, on_cpu = _model().cuda(), _model()
    store = _Recording(local_store())
    gpu, cpu = _offloaded(on_gpu, 1.0, store), _offloaded(on_cpu, 1.0)
    for step in range(2):
        store.log.clear()
        flat, finished = _streamed_backward(on_gpu, gpu, step)
        _streamed_backward(on_cpu, cpu, step)
        _clipped_step(on_gpu, gpu)
        _clipped_step(on_cpu, cpu)
        assert store.sent() == finished
        for _, bucket, _, grad in store.log:
            assert torch.equal(grad, flat[bucket])
    assert all(b.is_pinned() for b in gpu.host_buffers())
    for a, b in zip(on_gpu.parameters(), on_cpu.parameters(), strict=True):
        torch.testing.assert_close(a.cpu(), b)
