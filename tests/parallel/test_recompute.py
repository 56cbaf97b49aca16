"""Recomputation on one process: exact gradients, what is recomputed (FlopCounterMode), what is stored.

Context-parallel runs with recomputation are checked against one rank in tests/lsys/test_trainer.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lsys.config import ModelConfig
from lsys.model import build_model
from parallel.activations import measure_stored_activations, split_path
from parallel.config import RecomputeConfig
from parallel.recompute import apply_recompute

CFG = ModelConfig(vocab_size=50, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2)
BATCH, SEQ = 2, 64


def _step(recompute: RecomputeConfig, dtype=torch.float64) -> dict:
    """One forward+backward: gradients, stored bytes by layer, and flops of forward and backward."""
    model = build_model(CFG, torch.device("cpu"), dtype, seed=0)
    apply_recompute(model, model.parallel_plan(), recompute)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=gen)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    with FlopCounterMode(display=False) as forward_flops:
        loss, stored = measure_stored_activations(model, lambda: model(tokens, positions).square().mean())
    with FlopCounterMode(display=False) as backward_flops:
        loss.backward()
    return {
        "grads": {name: p.grad for name, p in model.named_parameters()},
        "stored": stored,
        "forward_flops": forward_flops.get_flop_counts(),
        "backward_flops": backward_flops.get_total_flops(),
    }


@pytest.fixture(scope="module")
def baseline() -> dict:
    return _step(RecomputeConfig())


@pytest.mark.parametrize("recompute", [
    RecomputeConfig("selective"), RecomputeConfig("full"), RecomputeConfig("selective", every=2),
    RecomputeConfig("full", first=1), RecomputeConfig("full", every=2, first=2),
], ids=["selective", "full", "selective-every2", "full-first1", "full-every2-first2"])
def test_gradients_equal_no_recompute(baseline, recompute):
    result = _step(recompute)
    for name, grad in baseline["grads"].items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-12, atol=1e-14, msg=name)


def test_selective_recomputes_no_matmul_and_full_reruns_the_blocks(baseline):
    selective, full = _step(RecomputeConfig("selective")), _step(RecomputeConfig("full"))
    assert selective["backward_flops"] == baseline["backward_flops"]
    # Full reruns every block's forward matmuls except its last (w_down), whose output backward never reads:
    # the checkpoint stops recomputing once every tensor backward needs is back.
    counts = baseline["forward_flops"]
    rerun = sum(sum(counts[f"Transformer.blocks.{i}"].values()) - sum(counts[f"Transformer.blocks.{i}.ffn.w_down"]
                                                                         .values()) for i in range(CFG.num_layers))
    assert full["backward_flops"] == baseline["backward_flops"] + rerun


def test_stored_bytes_full_keeps_block_inputs_and_selective_less_than_none(baseline):
    # Bytes are attributed to the module that allocated them: under full recompute a block keeps only its
    # output (the next block's kept input; block 0's input is the embedding's output).
    block_input = BATCH * SEQ * CFG.hidden_size * 8  # float64 [B, S, hidden]
    stored = {mode: _step(RecomputeConfig(mode))["stored"].by_layer() for mode in ("selective", "full")}
    stored["none"] = baseline["stored"].by_layer()
    assert stored["full"]["embed"] == stored["none"]["embed"] == block_input
    for i in range(CFG.num_layers):
        layer = f"blocks.{i}"
        assert block_input <= stored["full"][layer] <= 1.2 * block_input
        # Selective keeps matmul outputs and attention's tensors but drops the elementwise intermediates.
        assert stored["full"][layer] < stored["selective"][layer] <= 0.7 * stored["none"][layer]
    for outside_blocks in ("norm", "lm_head"):
        assert stored["full"][outside_blocks] == stored["selective"][outside_blocks] == stored["none"][outside_blocks]


def test_selective_keeps_no_output_that_backward_never_reads(baseline):
    # q/k/v projections feed only the replayed attention; the feed-forward's output projection only the
    # residual. v itself stays: attention saves it (allocated by wv).
    kept = _step(RecomputeConfig("selective"))["stored"].bytes_by_path
    for i in range(CFG.num_layers):
        for unread in ("attn.wq", "attn.wk", "ffn.w_down"):
            assert f"blocks.{i}.{unread}" not in kept
        for read in ("attn.wv", "ffn.w_gate", "ffn.w_up"):  # saved by attention, SiLU, the product
            assert kept[f"blocks.{i}.{read}"] == baseline["stored"].bytes_by_path[f"blocks.{i}.{read}"]
        assert kept[f"blocks.{i}.attn.wo"] == BATCH * SEQ * CFG.hidden_size * 8  # the residual's recompute


def test_every_and_first_select_blocks():
    assert RecomputeConfig("full").selected(4) == [0, 1, 2, 3]
    assert RecomputeConfig("full", every=2).selected(5) == [0, 2, 4]
    assert RecomputeConfig("selective", first=2).selected(4) == [0, 1]
    assert RecomputeConfig("none").selected(4) == []
    with pytest.raises(ValueError, match=r"recompute.mode='some'.*none, selective, full"):
        RecomputeConfig("some").validate()
    with pytest.raises(ValueError, match=r"recompute.every=0"):
        RecomputeConfig("full", every=0).validate()


def test_eval_without_grad_is_not_recomputed_or_remembered():
    model = build_model(CFG, torch.device("cpu"), torch.float32, seed=0)
    apply_recompute(model, model.parallel_plan(), RecomputeConfig("selective"))
    tokens, positions = torch.zeros(1, 8, dtype=torch.long), torch.arange(8)[None]
    with torch.no_grad():
        model(tokens, positions)
    assert all(len(block.attn.attn_fn.outputs) == 0 for block in model.blocks)


def test_split_path_names_layer_and_kind():
    assert split_path("blocks.3.attn.wq") == ("blocks.3", "attn.wq")
    assert split_path("blocks.0") == ("blocks.0", "(block)")
    assert split_path("lm_head") == ("lm_head", "(module)")


@pytest.mark.parametrize(("mode", "calls_per_block"), [("none", 1), ("selective", 1), ("full", 2)])
def test_selective_never_reruns_attention(mode, calls_per_block):
    # With ring attention a rerun would repeat the ring's communication; selective must replay instead.
    model = build_model(CFG, torch.device("cpu"), torch.float32, seed=0)
    calls = []
    for block in model.blocks:
        inner = block.attn.attn_fn
        block.attn.attn_fn = lambda *args, inner=inner, **kwargs: calls.append(1) or inner(*args, **kwargs)
    apply_recompute(model, model.parallel_plan(), RecomputeConfig(mode))
    tokens, positions = torch.zeros(2, 16, dtype=torch.long), torch.arange(16).expand(2, 16)
    model(tokens, positions).sum().backward()
    assert len(calls) == calls_per_block * CFG.num_layers


def test_each_transform_refuses_to_run_twice():
    from parallel.config import QuantConfig
    from parallel.quantize import apply_activation_quantization

    model = build_model(CFG, torch.device("cpu"), torch.float32, seed=0)
    plan = model.parallel_plan()
    quantizers = apply_activation_quantization(model, plan, QuantConfig("int8"), RecomputeConfig("selective"))
    apply_recompute(model, plan, RecomputeConfig("selective"), quantizers)
    with pytest.raises(ValueError, match="recomputation was already applied"):
        apply_recompute(model, plan, RecomputeConfig("full"))
    with pytest.raises(ValueError, match="activation quantization was already applied"):
        apply_activation_quantization(model, plan, QuantConfig("int8"), RecomputeConfig("selective"))


QWEN = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12,
                   attention_bias=True, qk_norm=True)


def _qwen_grads(recompute: RecomputeConfig, projections_read: bool | None = None) -> dict:
    model = build_model(QWEN, torch.device("cpu"), torch.float64, seed=0)
    plan = model.parallel_plan()
    if projections_read is not None:
        plan = dataclasses.replace(plan, blocks=tuple(
            dataclasses.replace(block, projections_read_in_backward=projections_read) for block in plan.blocks))
    apply_recompute(model, plan, recompute)
    tokens = torch.randint(0, QWEN.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    model(tokens, torch.arange(SEQ).expand(BATCH, SEQ)).square().mean().backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_selective_keeps_the_projections_per_head_norms_read_in_backward():
    # Per-head q/k norms sit between the q/k/v projections and attention, so their backward reads the
    # projections' outputs: the plan says so and selective recompute keeps them. Told otherwise, it would hand
    # the norms zeros in their place, and their gradients (and everything upstream) would be wrong.
    want = _qwen_grads(RecomputeConfig())
    for name, grad in _qwen_grads(RecomputeConfig("selective")).items():
        torch.testing.assert_close(grad, want[name], rtol=1e-12, atol=1e-14, msg=name)
    wrong = _qwen_grads(RecomputeConfig("selective"), projections_read=False)
    assert not torch.allclose(wrong["blocks.0.attn.q_norm.weight"], want["blocks.0.attn.q_norm.weight"])
