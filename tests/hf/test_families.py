"""Each family lsys reads gives transformers' logits: a tiny random model built with transformers, saved with
save_pretrained, loaded with lsys.hf.load_pretrained (config.json -> ModelConfig, the safetensors into the shards).

Positions start past 1e5, where RoPE's precision matters most. Two things are made equal on the transformers
side so that what is compared is the model, not known rounding: its rotary embedding forms the angles
position x frequency in float32 (at 1e5 off by up to ~6e-3 rad, far above the tolerance), so its forward is
replaced by one forming them in float64 from the same float32 `inv_freq` and `attention_scaling`, as lsys does;
and (float64 only) its RMSNorm computes in float32 whatever the dtype, which bounds float64 agreement.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from lsys.hf import load_pretrained
from lsys.model import Transformer

SEQ, BATCH, OFFSET = 16, 2, 100_003
SHAPE = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "max_position_embeddings": 128}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
FAMILIES: dict[str, tuple[type, type, dict[str, Any]]] = {
    "llama2": (LlamaConfig, LlamaForCausalLM, {}),
    "llama3": (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 2, "rope_parameters": LLAMA3_ROPE}),
    "llama3.2": (LlamaConfig, LlamaForCausalLM,
                 {"num_key_value_heads": 2, "rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {"num_key_value_heads": 2, "sliding_window": None}),
    # A window no shorter than the sequence: plain causal attention, which lsys accepts.
    "mistral-window": (MistralConfig, MistralForCausalLM, {"num_key_value_heads": 2, "sliding_window": SEQ}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"num_key_value_heads": 2}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"num_key_value_heads": 2, "head_dim": 12}),
}
ROPES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": LLAMA3_ROPE,
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16},
    "yarn-explicit": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
                      "attention_factor": 1.3, "beta_fast": 16.0, "beta_slow": 2.0},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 0.9,
                    "mscale_all_dim": 0.5},
}
# float64 on both sides, except transformers' RMSNorm, which normalises in float32: measured 0.9e-7 to 2.4e-7
# over these cases, against ~1e-16 round-off; the bound leaves room but fails at any real disagreement.
FLOAT64_BOUND = 2e-6


def _float64_angles(rotary: torch.nn.Module, x: torch.Tensor, position_ids: torch.Tensor):
    # transformers' forward with the angles formed in float64 (see the module docstring).
    freqs = position_ids[..., None].double() * rotary.inv_freq.double()
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * rotary.attention_scaling).to(x.dtype), (emb.sin() * rotary.attention_scaling).to(x.dtype)


def _hf_model(family: str, rope: dict[str, Any] | None, directory) -> torch.nn.Module:
    config_type, model_type, extra = FAMILIES[family]
    values = {**SHAPE, **extra}
    if rope is not None:
        values["rope_parameters"] = rope
    values["rope_parameters"] = {"rope_theta": 10000.0, **values.get("rope_parameters", {"rope_type": "default"})}
    torch.manual_seed(0)
    model = model_type(config_type(**values))
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Non-trivial everywhere: norms (q/k norms included) away from one, biases away from zero.
            param.copy_(1 + 0.2 * torch.randn_like(param) if name.endswith("norm.weight")
                        else 0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    return model.eval()


def _lsys_model(directory, dtype: torch.dtype) -> Transformer:
    return load_pretrained(directory, dtype).eval()


def _max_relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _compare(family: str, rope_name: str | None, directory) -> None:
    hf = _hf_model(family, ROPES[rope_name] if rope_name else None, directory)
    rotary = hf.model.rotary_emb
    ours = _lsys_model(directory, torch.float32)
    # The frequencies are transformers' bit for bit, and so is YaRN's table scale.
    assert torch.equal(ours.inv_freq, rotary.inv_freq)
    assert ours.rope_scale == rotary.attention_scaling
    rotary.forward = functools.partial(_float64_angles, rotary)

    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ), generator=generator)
    positions = (OFFSET + torch.arange(SEQ)).expand(BATCH, SEQ)
    errors = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            hf.to(dtype)
            want = hf(input_ids=tokens, position_ids=positions).logits
            got = (ours if dtype == torch.float32 else _lsys_model(directory, dtype))(tokens, positions)
            assert got.dtype == want.dtype == dtype
            errors[str(dtype).removeprefix("torch.")] = _max_relative_error(got, want)
    print(f"\n{family} rope={rope_name or 'own'}: max relative error {errors}")
    assert errors["float32"] <= 1e-5
    assert errors["float64"] <= FLOAT64_BOUND


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_gives_transformers_logits(tmp_path, family):
    _compare(family, None, tmp_path)


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_rope_scaling_gives_transformers_logits(tmp_path, family, rope):
    _compare(family, rope, tmp_path)
