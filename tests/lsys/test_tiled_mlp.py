"""The sequence-tiled feed-forward (model.mlp_chunk_tokens) and chunked evaluation: trainer-level exactness
against the untiled run and one rank, in float64, and the memory it saves."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lsys.config import ModelConfig, load_config
from lsys.model import FeedForward, build_model
from parallel.activations import measure_stored_activations
from tests.distributed import run_ranks
from tests.lsys.harness import assert_same_training, losses_and_grads, tiny_config

# seq_len 32: a chunk of 5 divides neither the sequence nor any rank's share of it.
TILED = ("model.mlp_chunk_tokens=5",)


def _each_config(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Several layouts of one world size in one spawn: far cheaper than a spawn per layout.
    return [losses_and_grads(values, evaluate=True) for values in configs]


def _assert_same(result: dict[str, Any], expected: dict[str, Any]) -> None:
    assert_same_training(result, expected)
    assert result["eval"] == pytest.approx(expected["eval"], rel=1e-9)


def test_tiled_feed_forward_trains_exactly_like_the_untiled_one(tmp_path):
    variants = [(), TILED, ("model.mlp_chunk_tokens=8",), (*TILED, "recompute.mode=selective"),
                (*TILED, "recompute.mode=full"), (*TILED, "train.micro_batch_size=1"),
                # Evaluation with the loss chunked: losses and predictions made a chunk at a time.
                (*TILED, "train.loss_chunk_tokens=5")]
    configs = [tiny_config(tmp_path / str(i), *variant) for i, variant in enumerate(variants)]
    reference, *tiled = run_ranks(_each_config, 1, configs)[0]
    for result in tiled:
        _assert_same(result, reference)


def test_tiled_feed_forward_on_two_ranks_trains_exactly_like_one(tmp_path):
    reference = run_ranks(_each_config, 1, [tiny_config(tmp_path / "one")])[0][0]
    layouts = [("parallel.cp_ring=2",), ("parallel.cp_ring=2", "recompute.mode=selective"),
               ("parallel.cp_ulysses=2", "recompute.mode=full"), ("parallel.tp=2",),
               ("parallel.tp=2", "recompute.mode=selective", "train.micro_batch_size=2"),
               ("parallel.tp=2", "recompute.mode=full"), ("parallel.dp=2",),
               ("parallel.dp=2", "recompute.mode=selective", "train.loss_chunk_tokens=5"),
               ("parallel.dp=2", "recompute.mode=full")]
    configs = [tiny_config(tmp_path / "-".join(layout), *TILED, *layout) for layout in layouts]
    int8_layouts = [("parallel.cp_ring=2",), ("parallel.tp=2", "recompute.mode=selective")]
    configs += [tiny_config(tmp_path / ("int8-" + "-".join(layout)), *TILED, "quant.activations=int8", *layout)
                for layout in int8_layouts]
    for per_rank in run_ranks(_each_config, 2, configs, timeout_s=600):
        for result in per_rank[:len(layouts)]:
            _assert_same(result, reference)
        for result in per_rank[len(layouts):]:  # int8 storage: the forward exact, gradients close
            torch.testing.assert_close(result["losses"][0], reference["losses"][0], rtol=1e-10, atol=0)
            got = torch.cat([g.flatten() for g in result["grads"][0]])
            want = torch.cat([g.flatten() for g in reference["grads"][0]])
            assert ((got - want).norm() / want.norm()).item() < 5e-2


def test_tiled_feed_forward_stores_only_its_input():
    # fp32, [1, 256] tokens, hidden 64, ffn 256: the untiled feed-forward stores four [256, 256] fp32 tensors
    # (gate output, SiLU output, up output, product) per layer; the tiled one none (its input is the norm's).
    def stored(chunk: int) -> dict[str, int]:
        cfg = ModelConfig(vocab_size=32, hidden_size=64, ffn_hidden_size=256, num_layers=2, num_heads=4,
                          num_kv_heads=4, mlp_chunk_tokens=chunk)
        model = build_model(cfg, torch.device("cpu"), torch.float32, seed=0)
        tokens = torch.randint(0, 32, (1, 256))
        _, counted = measure_stored_activations(model, lambda: model(tokens, torch.arange(256)[None]).sum())
        return counted.by_kind()

    whole, tiled = stored(0), stored(64)
    inside = lambda kind: kind == "ffn" or kind.startswith("ffn.")  # noqa: E731 - not the norm before it
    assert sum(size for kind, size in whole.items() if inside(kind)) >= 2 * 4 * 256 * 256 * 4
    assert not any(inside(kind) for kind in tiled)
    assert tiled == {kind: size for kind, size in whole.items() if not inside(kind)}


def test_mlp_chunk_tokens_must_not_be_negative():
    with pytest.raises(ValueError, match=r"model.mlp_chunk_tokens=-1: use 0"):
        load_config(None, ["model.mlp_chunk_tokens=-1"])


def test_tiled_feed_forward_recomputes_under_the_forwards_autocast():
    # bf16 compute: backward's recompute runs under the forward's autocast, so the input gradient is exactly the
    # untiled bf16 feed-forward's (an fp32 recompute differs by about 1e-3 here).
    whole = FeedForward(ModelConfig(hidden_size=16, ffn_hidden_size=64))
    tiled = FeedForward(ModelConfig(hidden_size=16, ffn_hidden_size=64, mlp_chunk_tokens=4))
    tiled.load_state_dict(whole.state_dict())
    x = torch.randn(1, 12, 16, generator=torch.Generator().manual_seed(0))
    grads = []
    for ffn in (whole, tiled):
        leaf = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            out = ffn(leaf)
        assert out.dtype == torch.bfloat16
        out.float().pow(2).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
