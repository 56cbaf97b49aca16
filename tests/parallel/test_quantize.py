"""8-bit stored activations on one process: exact forward, stored bytes, gradients near the exact ones.

Context-parallel runs with int8 activations are checked in tests/lsys/test_trainer.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from lsys.config import ModelConfig
from lsys.model import build_model
from parallel.activations import measure_stored_activations
from parallel.config import QuantConfig, RecomputeConfig
from parallel.quantize import apply_activation_quantization
from parallel.recompute import apply_recompute

CFG = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
BATCH, SEQ = 2, 128


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    return tokens, torch.arange(SEQ).expand(BATCH, SEQ)


def _step(quant: QuantConfig, recompute: RecomputeConfig | None = None, bf16: bool = False, model=None) -> dict:
    recompute, quantizers = recompute or RecomputeConfig(), {}
    if model is None:
        model = build_model(CFG, torch.device("cpu"), torch.float32, seed=0)
        plan = model.parallel_plan()
        quantizers = apply_activation_quantization(model, plan, quant, recompute)
        apply_recompute(model, plan, recompute, quantizers)
    tokens, positions = _batch()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def loss_fn() -> torch.Tensor:
        with autocast:
            logits = model(tokens, positions)
        return F.cross_entropy(logits.float().flatten(0, 1), tokens.roll(-1, 1).flatten())

    loss, stored = measure_stored_activations(model, loss_fn)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    blocks = sum(size for layer, size in stored.by_layer().items() if layer.startswith("blocks."))
    return {"loss": loss.detach(), "grads": grads, "stored": blocks, "total": stored.total_bytes(), "model": model,
            "quantizers": quantizers}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def exact() -> dict:
    return _step(QuantConfig())


def test_forward_is_exact_and_int8_stores_a_quarter_of_fp32(exact):
    result = _step(QuantConfig("int8"))
    assert torch.equal(result["loss"], exact["loss"])
    assert result["stored"] <= 0.3 * exact["stored"]
    assert _relative_error(result["grads"], exact["grads"]) < 5e-2


def test_int8_saves_at_least_40_percent_against_bf16_storage():
    exact16, int8 = _step(QuantConfig(), bf16=True), _step(QuantConfig("int8"), bf16=True)
    assert torch.equal(int8["loss"], exact16["loss"])
    # 0.56 measured: the 16-bit baseline's norms keep only their input (lsys/norm.py), so less is left to compress
    assert int8["stored"] <= 0.6 * exact16["stored"]
    assert _relative_error(int8["grads"], exact16["grads"]) < 5e-2


@pytest.mark.parametrize("kinds", [["attention"], ["linear"], ["elementwise"], ["norm"]])
def test_each_kind_alone_stores_less_and_stays_close(exact, kinds):
    result = _step(QuantConfig("int8", kinds=kinds))
    assert torch.equal(result["loss"], exact["loss"])
    assert result["stored"] < exact["stored"]
    assert _relative_error(result["grads"], exact["grads"]) < 5e-2


def test_same_seed_same_gradients_and_seed_changes_rounding():
    first, again = _step(QuantConfig("int8")), _step(QuantConfig("int8"))
    other_seed = _step(QuantConfig("int8", seed=1))
    assert torch.equal(first["grads"], again["grads"])
    assert not torch.equal(first["grads"], other_seed["grads"])


def test_running_range_starts_at_the_batch_and_moves_with_decay():
    result = _step(QuantConfig("int8", decay=0.5))
    site = result["quantizers"][0].sites[("attention", 0)]  # the ring/flash q
    first_lo, first_hi = site.lo.clone(), site.hi.clone()
    assert (first_lo < 0).all() and (first_hi > 0).all()
    result["model"].zero_grad()
    with torch.no_grad():
        for p in result["model"].parameters():
            p.mul_(2.0)  # larger activations: the range must grow half way towards them
    _step(QuantConfig("int8", decay=0.5), model=result["model"])
    assert (site.hi > first_hi).all() and (site.lo < first_lo).all()


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_composes_with_recompute(exact, mode):
    quantized = _step(QuantConfig("int8"), RecomputeConfig(mode))
    unquantized = _step(QuantConfig(), RecomputeConfig(mode))
    assert torch.equal(quantized["loss"], exact["loss"])
    assert _relative_error(quantized["grads"], exact["grads"]) < 5e-2
    if mode == "selective":
        # Kept block input, matmul outputs and attention's tensors are int8: a quarter of fp32, plus
        # per-row ranges (one group per row at this width) and the fp32 lse.
        assert quantized["stored"] < 0.33 * unquantized["stored"]
    else:
        # Each block keeps only its fp32 input [B, S, hidden], now int8: 3 of every 4 bytes saved, less ranges.
        kept_inputs = CFG.num_layers * BATCH * SEQ * CFG.hidden_size * 4
        assert unquantized["total"] - quantized["total"] > 0.7 * kept_inputs


def test_recompute_keeps_its_input_exact_without_the_norm_kind(exact):
    full = _step(QuantConfig("int8", kinds=["attention", "linear", "elementwise"]), RecomputeConfig("full"))
    torch.testing.assert_close(full["grads"], exact["grads"], rtol=1e-5, atol=1e-7)


def test_bad_quant_config_names_the_fix():
    with pytest.raises(ValueError, match=r"quant.activations='int4'.*none, int8"):
        QuantConfig("int4").validate()
    with pytest.raises(ValueError, match=r"quant.kinds=\['mlp'\]"):
        QuantConfig("int8", kinds=["mlp"]).validate()
    with pytest.raises(ValueError, match=r"quant.decay=1.0"):
        QuantConfig("int8", decay=1.0).validate()
