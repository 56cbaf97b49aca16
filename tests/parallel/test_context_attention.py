"""Context-parallel attention on 2 and 4 gloo ranks against single-process float64 attention.

Contract under test: gather(attention(shard(q), shard(k), shard(v))) equals full attention over the original
order, and the gathered gradients of q, k, v equal the full gradients. Every case of one world size runs in
a single spawn (spawning dominates the cost of these tiny shapes); ranks assert themselves. With document ids
the reference is full attention masked to each query's document, and the ring's skipped blocks are counted.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

import parallel.context.ring
from kernels.attention import attention_forward, expand_kv_heads
from kernels.reference import reference_attention_forward
from parallel.context import attention, balance_layout, gather, shard
from tests.distributed import run_ranks

TOLERANCES = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-5)}
# (Hq, Hkv): MHA, GQA, MQA, and KV heads (3) that the Ulysses size 2 does not divide.
HEADS = ((4, 4), (4, 2), (4, 1))
HEADS_TWO_RANKS = (*HEADS, (6, 3))
# bf16 inputs against a float64 reference on the same rounded values.
BF16_BOUNDS = {"out": 2e-2, "dq": 8e-2, "dk": 8e-2, "dv": 8e-2}


def _full_inputs(dtype, seq, heads, seed, batch=2, dim=8):
    """-> q, dout [B, S, Hq, D]; k, v [B, S, Hkv, D]: identical on every rank (same seed)."""
    num_q, num_kv = heads
    gen = torch.Generator().manual_seed(seed)
    shapes = ((batch, seq, num_q, dim), (batch, seq, num_kv, dim), (batch, seq, num_kv, dim), (batch, seq, num_q, dim))
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in shapes]


def _reference(q, k, v, dout, causal, scale=None, document_ids=None):
    """float64 out, dq, dk, dv by autograd through the einsum reference (independent of the block kernels)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, _ = reference_attention_forward(
        q, expand_kv_heads(k, q.shape[2]), expand_kv_heads(v, q.shape[2]), causal=causal, scale=scale,
        q_docs=document_ids, k_docs=document_ids,
    )
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def _distributed(q, k, v, dout, causal, groups, layout, scale=None, loss_on_gathered=False, backend="auto",
                 document_ids=None):
    """out, dq, dk, dv of context-parallel attention, gathered to full sequences on every rank."""
    ring_group, ulysses_group = groups
    split = {"seq_dim": 1, "ring_group": ring_group, "ulysses_group": ulysses_group, "layout": layout}
    local = [shard(t, **split).detach().requires_grad_() for t in (q, k, v)]
    local_docs = None if document_ids is None else shard(document_ids, **split)
    out = attention(*local, causal=causal, ring_group=ring_group, ulysses_group=ulysses_group, layout=layout,
                    scale=scale, backend=backend, document_ids=local_docs)
    assert out.dtype == q.dtype and out.shape == local[0].shape
    if loss_on_gathered:
        # gather's backward hands each rank its own shard of the gradient.
        (gather(out, **split) * dout).sum().backward()
    else:
        out.backward(shard(dout, **split))
    return [gather(t, **split) for t in (out.detach(), *(t.grad for t in local))]


def _check(name, q, k, v, dout, causal, groups, layout, **options):
    got = _distributed(q, k, v, dout, causal, groups, layout, **options)
    _compare(name, q.dtype, got, _reference(q, k, v, dout, causal, options.get("scale"), options.get("document_ids")))


def _compare(name, dtype, got, expected):
    rtol, atol = TOLERANCES[dtype]
    for what, actual, ref in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
        assert actual.dtype == dtype
        torch.testing.assert_close(
            actual.double(), ref, rtol=rtol, atol=atol, msg=lambda m, what=what: f"{name} {what}: {m}"
        )


def _check_all(configs, seq, heads_cases):
    """Every config x layout x causal x heads x dtype; returns the number of cases checked."""
    cases = itertools.product(configs.items(), ("zigzag", "contiguous"), (True, False), heads_cases,
                              (torch.float64, torch.float32))
    count = 0
    for seed, ((config, groups), layout, causal, heads, dtype) in enumerate(cases):
        q, k, v, dout = _full_inputs(dtype, seq, heads, seed)
        name = f"{config} layout={layout} causal={causal} heads={heads} {dtype}"
        _check(name, q, k, v, dout, causal, groups, layout)
        count += 1
    return count


def _document_ids(pattern, seq, seed, batch=2):
    """[B, S] int64 ids; the batch rows differ, so the mask is per row."""
    if pattern == "single":  # one document: must be plain attention
        return torch.zeros(batch, seq, dtype=torch.int64)
    if pattern == "tokens":  # every token its own document
        return torch.arange(seq).repeat(batch, 1)
    if pattern == "unsorted":  # not packed data: ids recur in separate runs
        return torch.randint(0, 3, (batch, seq), generator=torch.Generator().manual_seed(seed))
    # packed: documents cross rank and chunk boundaries, some shorter than a chunk (2 ranks: 4, 4 ranks: 4 or 8)
    rows = []
    for lengths in ((5, 1, 3, 7), (11, 5)):
        lengths = torch.tensor(lengths).repeat(seq // sum(lengths))
        ids = torch.arange(lengths.numel()).repeat_interleave(lengths)
        rows.append(ids + 7 * len(rows))  # ids need not start at 0
    return torch.stack(rows)


def _count_block_calls(fn, *args, **kwargs):
    """-> (fn's result, how many forward block kernels the ring called meanwhile)."""
    ring, calls = parallel.context.ring, []
    original = ring.attention_forward
    ring.attention_forward = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    try:
        return fn(*args, **kwargs), len(calls)
    finally:
        ring.attention_forward = original


def _check_documents(configs, seq, backend, ring_config):
    """Document masks: every config x layout x causal x id pattern, float64, GQA. "balanced" is the layout
    balance_layout chooses for the ids (4 chunks per ring rank, so these short sequences have several).

    -> (cases checked, forward block calls per pattern of `ring_config` with zigzag causal)."""
    patterns = ("packed", "single", "tokens", "unsorted", None)
    cases = itertools.product(configs.items(), ("zigzag", "contiguous", "balanced"), (True, False), patterns)
    count, block_calls = 0, {}
    for seed, ((config, groups), layout, causal, pattern) in enumerate(cases):
        q, k, v, dout = _full_inputs(torch.float64, seq, (4, 2), seed)
        docs = None if pattern is None else _document_ids(pattern, seq, seed)
        if layout == "balanced":
            ring_size = 1 if groups[0] is None else dist.get_world_size(groups[0])
            ids = torch.zeros(2, seq, dtype=torch.int64) if docs is None else docs
            layout = balance_layout(ids, ring_size, causal, chunks_per_rank=4)
        got, calls = _count_block_calls(
            _distributed, q, k, v, dout, causal, groups, layout, backend=backend, document_ids=docs
        )
        # One document is plain attention: compared with the reference without ids.
        expected = _reference(q, k, v, dout, causal, document_ids=None if pattern == "single" else docs)
        _compare(f"{config} layout={layout} causal={causal} documents={pattern}", q.dtype, got, expected)
        if config == ring_config and layout == "zigzag" and causal:
            block_calls[pattern] = calls
        count += 1
    return count, block_calls


def _bf16_errors(groups, seq=64, heads=(4, 2)):
    """Max and RMS abs error of bf16 context-parallel out and grads against float64 on the same rounded inputs."""
    q, k, v, dout = _full_inputs(torch.bfloat16, seq, heads, seed=1234)
    got = _distributed(q, k, v, dout, True, groups, "zigzag")
    expected = _reference(q, k, v, dout, True)
    errors = {}
    for what, actual, ref in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
        diff = actual.double() - ref
        errors[what] = {"max": diff.abs().max().item(), "rms": diff.square().mean().sqrt().item()}
    return errors


def _two_rank_cases():
    world = dist.group.WORLD
    count = _check_all({"ring2": (world, None), "ulysses2": (None, world)}, 16, HEADS_TWO_RANKS)
    q, k, v, dout = _full_inputs(torch.float64, 16, (4, 2), seed=99)
    _check("ring2 scale", q, k, v, dout, True, (world, None), "zigzag", scale=0.3)
    _check("ring2 gathered loss", q, k, v, dout, True, (world, None), "zigzag", loss_on_gathered=True)
    _check("ulysses2 gathered loss", q, k, v, dout, True, (None, world), "zigzag", loss_on_gathered=True)
    _check("no groups", q, k, v, dout, True, (None, None), "zigzag")
    return count + 4


def _two_rank_document_cases(backend):
    world = dist.group.WORLD
    configs = {"ring2": (world, None), "ulysses2": (None, world), "no groups": (None, None)}
    return _check_documents(configs, 16, backend, "ring2")


def _four_rank_configs() -> tuple[dict, dist.ProcessGroup]:
    """(name -> (ring group, Ulysses group) of this rank, this rank's pair group {0, 1} or {2, 3})."""
    rank, world = dist.get_rank(), dist.group.WORLD
    # new_group is collective: every rank creates every group, in the same order.
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    strided = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    configs = {
        "ring4": (world, None),
        "ulysses4": (None, world),
        "hybrid ring{0,2} x ulysses{0,1}": (strided[rank % 2], pairs[rank // 2]),
        "hybrid ring{0,1} x ulysses{0,2}": (pairs[rank // 2], strided[rank % 2]),
    }
    return configs, pairs[rank // 2]


def _four_rank_cases():
    configs, pair = _four_rank_configs()
    count = _check_all(configs, 32, HEADS)
    errors = {"ring2": _bf16_errors((pair, None)), "ring4": _bf16_errors((dist.group.WORLD, None))}
    return count, errors


def _four_rank_document_cases(backend):
    configs, _ = _four_rank_configs()
    del configs["hybrid ring{0,1} x ulysses{0,2}"]  # one hybrid grouping is enough for the document cases
    return _check_documents(configs, 32, backend, "ring4")


def test_two_ranks_ring_and_ulysses_match_full_attention():
    counts = run_ranks(_two_rank_cases, 2)
    assert counts == [68, 68]


def test_four_ranks_ring_ulysses_hybrid_match_full_attention_and_bf16_error_does_not_grow():
    results = run_ranks(_four_rank_cases, 4)
    assert [count for count, _ in results] == [96] * 4
    errors = results[0][1]
    for what, bound in BF16_BOUNDS.items():
        ring2, ring4 = errors["ring2"][what], errors["ring4"][what]
        assert ring2["max"] < bound and ring4["max"] < bound, f"bf16 {what} max error: {ring2} vs {ring4}"
        # fp32 accumulation: more ring steps must not mean noticeably more error. The max error alone is
        # one element's final bf16 rounding (a single ulp flip doubles it), so growth is judged on the RMS.
        assert ring4["rms"] <= 1.5 * ring2["rms"], f"bf16 {what} error grows with ring size: {ring2} vs {ring4}"


# Adding a block kernel backend to the document-mask tests is one word here.
DOCUMENT_BACKENDS = ("reference", "aten")


def _skip_without_document_masks(backend):
    ids = torch.zeros(1, 2, dtype=torch.int64)
    q = torch.zeros(1, 2, 1, 8, dtype=torch.float64)
    try:
        attention_forward(q, q, q, causal=True, backend=backend, q_docs=ids, k_docs=ids)
    except NotImplementedError as error:
        pytest.skip(f"the {backend} block kernel has no document masks yet ({error})")


@pytest.mark.parametrize("backend", DOCUMENT_BACKENDS)
@pytest.mark.parametrize(("world_size", "cases", "expected_count"), [
    pytest.param(2, _two_rank_document_cases, 90, id="2ranks"),
    pytest.param(4, _four_rank_document_cases, 90, id="4ranks"),
])
def test_document_masks_match_masked_full_attention_and_skip_blocks(backend, world_size, cases, expected_count):
    _skip_without_document_masks(backend)
    results = run_ranks(cases, world_size, backend)
    assert [count for count, _ in results] == [expected_count] * world_size
    for rank, (_, calls) in enumerate(results):
        # Zigzag causal ring: every step computes a block without ids; with one document per token only the
        # own block shares documents, and one document must not lose any block.
        assert calls[None] == calls["single"] == world_size, f"rank {rank}: {calls}"
        assert calls["tokens"] == 1, f"rank {rank}: {calls}"
        assert calls["packed"] <= calls[None], f"rank {rank}: {calls}"
    if world_size == 4:  # documents shorter than the zigzag chunks leave some ranks blocks without shared ones
        assert sum(calls["packed"] for _, calls in results) < world_size * world_size, results


def test_bad_document_ids_raise_value_error_naming_the_expected_shape():
    q = torch.zeros(2, 4, 2, 8)
    for bad in (torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"document_ids must be int64 \[B, S_local\] = \(2, 4\)"):
            attention(q, q, q, document_ids=bad)
