"""lsys parameter names <-> HuggingFace tensor names, the same for every family lsys reads (Llama, Mistral,
Qwen2, Qwen3 name their decoder tensors alike). Layouts are the same too: nn.Linear's [out, in], q/k rows in
the half-split RoPE order both use, so a tensor moves between them unchanged."""

from __future__ import annotations

import re

_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wv.bias": "self_attn.v_proj.bias",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w_gate.weight": "mlp.gate_proj.weight",
    "ffn.w_up.weight": "mlp.up_proj.weight",
    "ffn.w_down.weight": "mlp.down_proj.weight",
}
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight"}
_BLOCK_BACK = {v: k for k, v in _BLOCK.items()}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_LSYS_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_name(name: str) -> str:
    """An lsys parameter name (as `named_parameters()` gives it) -> the HuggingFace tensor name."""
    if name in _TOP:
        return _TOP[name]
    match = _LSYS_BLOCK.match(name)
    if match and match.group(2) in _BLOCK:
        return f"model.layers.{match.group(1)}.{_BLOCK[match.group(2)]}"
    raise KeyError(f"no HuggingFace name for lsys parameter {name!r}")


def lsys_name(name: str) -> str | None:
    """A HuggingFace tensor name -> the lsys parameter name; None for tensors lsys has no parameter for."""
    if name in _TOP_BACK:
        return _TOP_BACK[name]
    match = _HF_BLOCK.match(name)
    if match and match.group(2) in _BLOCK_BACK:
        return f"blocks.{match.group(1)}.{_BLOCK_BACK[match.group(2)]}"
    return None
