"""The analytic estimate (Megatron's formula with the context-parallel term) and the budget search."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from launch.local import spawn
from lsys.config import config_from_dict, load_config, to_dict
from lsys.memory.analytic import analytic_estimate, parameter_count
from lsys.model import Transformer, count_parameters
from lsys.optim import BUCKET_ELEMENTS, GRADIENT_BUFFERS

VOCAB = 1000


def _cfg(*overrides: str):
    base = ["model.hidden_size=128", "model.num_layers=3", "model.num_heads=8", "model.num_kv_heads=2",
            f"model.vocab_size={VOCAB}", "data.seq_len=4096", "train.global_batch_size=2", "parallel.dp=-1",
            "parallel.cp_ring=1", "data.curriculum.start_len=0"]
    return load_config("configs/demo.yaml", [*base, *overrides])


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_is_the_models(tied):
    cfg = _cfg(f"model.tie_embeddings={tied}", "model.ffn_hidden_size=320")
    with torch.device("meta"):
        model = Transformer(cfg.model)
    assert parameter_count(cfg, VOCAB) == count_parameters(model)


def test_megatron_formula_with_the_context_parallel_term():
    # 8 ranks: ring 2 x tp 2 x dp 2; 4096 tokens -> 2048 per context-parallel rank; micro-batch 1 per replica.
    cfg = _cfg("parallel.cp_ring=2", "parallel.tp=2", "train.compute_dtype=bfloat16")
    s, b, h, t, layers = 2048, 1, 128, 2, 3
    shards = parameter_count(cfg, VOCAB) / 8
    plain = analytic_estimate(cfg, 8, VOCAB)
    assert plain.activations_per_layer == round(34 * s * b * h / t)  # the score term is gone: flash attention
    assert plain.activations == layers * plain.activations_per_layer
    assert plain.output == 4 * s * b * VOCAB
    assert plain.params == plain.grads == round(4 * shards)
    assert plain.optimizer == round(8 * shards)
    full = analytic_estimate(replace(cfg, recompute=replace(cfg.recompute, mode="full")), 8, VOCAB)
    assert full.activations_per_layer == round(2 * s * b * h / t)
    int8 = analytic_estimate(replace(cfg, quant=replace(cfg.quant, activations="int8")), 8, VOCAB)
    assert int8.activations_per_layer == plain.activations_per_layer / 2
    fp32 = analytic_estimate(replace(cfg, train=replace(cfg.train, compute_dtype="float32")), 8, VOCAB)
    assert fp32.activations_per_layer == 2 * plain.activations_per_layer
    offloaded = analytic_estimate(replace(cfg, optim=replace(cfg.optim, offload="cpu", fraction=0.5)), 8, VOCAB)
    # A tiled feed-forward keeps only its input: the MLP's 19 s b h become 2; full recomputation keeps 2 anyway.
    tiled = replace(cfg, model=replace(cfg.model, mlp_chunk_tokens=1024))
    assert analytic_estimate(tiled, 8, VOCAB).activations_per_layer == round(17 * s * b * h / t)
    tiled_full = replace(tiled, recompute=replace(cfg.recompute, mode="full"))
    assert analytic_estimate(tiled_full, 8, VOCAB).activations_per_layer == full.activations_per_layer
    assert offloaded.optimizer == round(plain.optimizer / 2)
    # fp32 master weights and moments of the offloaded half, and the host buffers its gradients leave through
    assert offloaded.host == round(12 * shards / 2 + GRADIENT_BUFFERS * 4 * min(shards / 2, BUCKET_ELEMENTS))
    # Host memory: offloaded activations leave two layers' on the device; offloaded state leaves none.
    moved = analytic_estimate(replace(cfg, recompute=replace(cfg.recompute, mode="full", offload="cpu")), 8, VOCAB)
    assert moved.activations == 2 * full.activations_per_layer and moved.host == layers * full.activations_per_layer
    state = analytic_estimate(replace(cfg, parallel=replace(cfg.parallel, fsdp_offload="cpu")), 8, VOCAB)
    assert state.params == state.grads == state.optimizer == 0
    assert state.host == plain.params + plain.grads + plain.optimizer
    assert state.total == plain.total - state.host


def _search(values: dict[str, Any], world_size: int, budget: int) -> dict[str, Any]:
    from lsys.memory.search import Budget, search, with_seq_len
    from lsys.memory.trace import trace_rank

    cfg = config_from_dict(values)
    found = search(cfg, world_size, Budget(budget), VOCAB, top=2)
    best = found[0]
    longer = with_seq_len(best.cfg, best.traced_seq_len + best.cfg.parallel.seq_granularity)
    return {"candidates": [c.describe() for c in found], "longer_peak": trace_rank(longer, world_size).peak_bytes}


def _search_both_ways(values: dict[str, Any], world_size: int, budget: int) -> list[list[dict[str, Any]]]:
    from lsys.memory.search import Budget, search

    cfg = config_from_dict(values)
    return [[c.describe() for c in search(cfg, world_size, Budget(budget), VOCAB, top=2, workers=workers)]
            for workers in (1, 2)]


def test_traces_side_by_side_find_what_one_at_a_time_finds():
    serial, parallel = spawn(_search_both_ways, 1, (to_dict(_cfg()), 4, 48 * 1024**2), timeout_s=300)[0]
    assert parallel == serial and serial[0]["confirmed"]


@pytest.mark.slow
def test_search_returns_the_longest_sequence_that_fits():
    budget = 48 * 1024**2
    result = spawn(_search, 1, (to_dict(_cfg()), 4, budget), timeout_s=300)[0]
    best = result["candidates"][0]
    assert best["confirmed"] and best["traced_peak_bytes"] <= budget
    assert best["traced_seq_len"] > 0
    assert result["longer_peak"] > budget, "one granule more must not fit, or the search stopped short"
    assert all(c["traced_seq_len"] <= best["traced_seq_len"] for c in result["candidates"])
