"""A HuggingFace checkpoint's `config.json` <-> lsys's ModelConfig, for the decoder families lsys trains:
Llama 2/3/3.1/3.2 (`llama`), Mistral (`mistral`), Qwen2/2.5 (`qwen2`) and Qwen3 (`qwen3`).

Reading refuses, naming the field and its value, anything whose computation lsys does not reproduce exactly
(another activation, biases on projections lsys has none on, sliding windows, other RoPE rules), so a model
that loads is the model transformers runs. Pure JSON: no torch, no transformers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lsys.config import LsysConfig, ModelConfig, RopeScalingConfig, ffn_hidden_size, head_dim

CONFIG_FILE = "config.json"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
# The keys of ModelConfig that a pretrained checkpoint's config.json decides.
ARCHITECTURE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "ffn_hidden_size", "attention_bias", "qk_norm", "sliding_window", "norm_eps", "tie_embeddings")
# The keys of RopeScalingConfig, each as HuggingFace names it in `rope_scaling` / `rope_parameters`.
ROPE_KEYS = tuple(f.name for f in dataclasses.fields(RopeScalingConfig))
# What `lsys export` writes (torch's dtype names), and its largest file by default, as transformers' writes them.
EXPORT_DTYPES = ("float32", "bfloat16", "float16", "float64")
DEFAULT_MAX_SHARD_SIZE = "5GB"
_ROPE_TYPES = {"default": "default", "linear": "linear", "llama3": "llama3", "yarn": "yarn"}


def read_config_json(directory: str | Path) -> dict[str, Any]:
    """The parsed config.json of a HuggingFace model directory; a ValueError names what is wrong."""
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"model.pretrained={str(directory)!r}: not a directory; give a local HuggingFace model "
                         f"directory (with {CONFIG_FILE} and *.safetensors)")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"model.pretrained={str(directory)!r}: no {CONFIG_FILE}; give a HuggingFace model "
                         "directory as saved by save_pretrained")
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: cannot be read as JSON ({exc}); restore the file") from None
    if not isinstance(values, dict):
        raise ValueError(f"{file}: the top level is not a JSON object; restore the file")
    return values


def _refuse(file: str, key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{file}: {key}={value!r} is not supported: {why}")


def _number(values: dict, key: str, file: str, kind: type = int, default: Any = None) -> Any:
    value = values.get(key, default)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (kind is int and value != int(value)):
        raise ValueError(f"{file}: {key}={value!r}: expected {'an integer' if kind is int else 'a number'}")
    return kind(value)


def _rope_scaling(values: dict, file: str) -> tuple[float, RopeScalingConfig]:
    """(rope_theta, scaling) from the legacy `rope_theta` + `rope_scaling` keys or transformers 5's
    `rope_parameters`."""
    params = values.get("rope_parameters") or {}
    legacy = values.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        raise ValueError(f"{file}: rope_parameters / rope_scaling must be JSON objects")
    merged = {**legacy, **params}
    theta = merged.get("rope_theta", values.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise _refuse(file, "rope_scaling.rope_type", kind, f"lsys implements {', '.join(_ROPE_TYPES)}")
    partial = merged.get("partial_rotary_factor", values.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise _refuse(file, "partial_rotary_factor", partial, "lsys rotates the whole head")
    if kind != "default" and merged.get("factor") is None:
        # lsys's default factor of 1 would silently undo the scaling (transformers derives YaRN's from lengths).
        raise ValueError(f"{file}: rope_scaling.factor is missing for rope_type={kind!r}; add the checkpoint's "
                         "factor to its config.json")
    scaling = {"rope_type": _ROPE_TYPES[kind]}
    for key in ROPE_KEYS[1:]:
        if merged.get(key) is not None:
            scaling[key] = merged[key]
    if kind in ("llama3", "yarn") and not scaling.get("original_max_position_embeddings"):
        # transformers' rule: the pretraining length is max_position_embeddings unless stated.
        scaling["original_max_position_embeddings"] = _number(values, "max_position_embeddings", file)
    return float(theta), RopeScalingConfig(**scaling)


def model_config_from_hf(values: dict[str, Any], source: str = CONFIG_FILE, pretrained: str = "") -> ModelConfig:
    """config.json values -> the ModelConfig computing exactly what transformers computes for them."""
    family = values.get("model_type")
    if family not in FAMILIES:
        raise _refuse(source, "model_type", family, f"lsys trains {', '.join(FAMILIES)} checkpoints")
    act = values.get("hidden_act", "silu")
    if act != "silu":
        raise _refuse(source, "hidden_act", act, "lsys's feed-forward is SwiGLU (silu)")
    if values.get("mlp_bias"):
        raise _refuse(source, "mlp_bias", True, "lsys's feed-forward has no biases")
    # Qwen2 always has q/k/v biases (and none on o_proj); elsewhere attention_bias puts one on o_proj too.
    if family != "qwen2" and values.get("attention_bias"):
        raise _refuse(source, "attention_bias", True, "lsys has no bias on the attention output projection")
    for key in ("attention_dropout", "hidden_dropout"):
        if values.get(key):
            raise _refuse(source, key, values[key], "lsys trains without dropout; set it to 0.0")
    window = 0
    if family == "mistral" and values.get("sliding_window") is not None:
        window = _number(values, "sliding_window", source)
    if family in ("qwen2", "qwen3") and values.get("use_sliding_window"):
        raise _refuse(source, "use_sliding_window", True, "sliding-window attention is not implemented")
    heads = _number(values, "num_attention_heads", source)
    theta, scaling = _rope_scaling(values, source)
    return ModelConfig(
        pretrained=pretrained,
        vocab_size=_number(values, "vocab_size", source),
        hidden_size=_number(values, "hidden_size", source),
        num_layers=_number(values, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=_number(values, "num_key_value_heads", source, default=heads),
        head_dim=_number(values, "head_dim", source, default=0) if values.get("head_dim") else 0,
        ffn_hidden_size=_number(values, "intermediate_size", source),
        attention_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        sliding_window=window,
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=_number(values, "rms_norm_eps", source, float, 1e-6),
        init_std=_number(values, "initializer_range", source, float, 0.02),
        tie_embeddings=bool(values.get("tie_word_embeddings", False)),
    )


def resolve_pretrained(cfg: LsysConfig) -> LsysConfig:
    """With model.pretrained set: the config whose model section is the checkpoint's architecture, keeping the
    RoPE settings the user gave (context extension). A key the user set to another value than the checkpoint's
    is refused: silently training another shape than asked would be worse than an error."""
    m = cfg.model
    if not m.pretrained:
        return cfg
    values = read_config_json(m.pretrained)
    source = str(Path(m.pretrained) / CONFIG_FILE)
    loaded = model_config_from_hf(values, source, pretrained=m.pretrained)
    defaults = ModelConfig()
    for key in ARCHITECTURE_KEYS:
        given, theirs = getattr(m, key), getattr(loaded, key)
        if given != getattr(defaults, key) and given != theirs:
            raise ValueError(f"model.{key}={given!r} conflicts with {source} ({key} {theirs!r}): the checkpoint "
                             f"decides the architecture; remove model.{key}")
    rope_theta = m.rope_theta if m.rope_theta != defaults.rope_theta else loaded.rope_theta
    scaling = m.rope_scaling if m.rope_scaling.rope_type != "default" else loaded.rope_scaling
    model = dataclasses.replace(loaded, rope_theta=rope_theta, rope_scaling=scaling, init_std=m.init_std,
                                mlp_chunk_tokens=m.mlp_chunk_tokens)
    return dataclasses.replace(cfg, model=model)


def family_of(cfg: ModelConfig) -> str:
    """The HuggingFace family a model of this shape is written as (lsys's own models: Llama unless they use a
    Qwen feature)."""
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.attention_bias else "llama"


def hf_config(cfg: ModelConfig, base: dict[str, Any] | None, max_positions: int, dtype: str) -> dict[str, Any]:
    """The config.json of `cfg`: `base` (the pretrained checkpoint's, kept for its other keys: token ids,
    initializer range, ...) updated with lsys's architecture and RoPE settings, in the legacy `rope_theta` +
    `rope_scaling` form every transformers version reads."""
    values = dict(base or {})
    family = values.get("model_type") or family_of(cfg)
    values.pop("rope_parameters", None)
    r = cfg.rope_scaling
    scaling = None
    if r.rope_type != "default":
        keep = {"linear": ("factor",),
                "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
                "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate")}
        scaling = {"rope_type": r.rope_type, **{k: getattr(r, k) for k in keep[r.rope_type]}}
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if r.rope_type == "yarn" and getattr(r, key):
                scaling[key] = getattr(r, key)
    values.update({
        "architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": ffn_hidden_size(cfg),
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": head_dim(cfg), "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": dtype,
        "max_position_embeddings": max(max_positions, int(values.get("max_position_embeddings") or 0)),
    })
    values.pop("dtype", None)
    if family != "qwen2":
        values["attention_bias"] = False
    if family == "mistral":
        values["sliding_window"] = cfg.sliding_window or None
    return values
