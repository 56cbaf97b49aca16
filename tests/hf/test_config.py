"""What lsys.hf.config refuses in a checkpoint's config.json, and lsys.config in the family switches: each
error is one line naming the field and its value."""

from __future__ import annotations

import json

import pytest

from lsys.config import load_config
from lsys.hf.config import model_config_from_hf, resolve_pretrained

LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
         "max_position_embeddings": 128, "rope_theta": 10000.0, "hidden_act": "silu"}


def _one_line_error(call, *args, match: str) -> str:
    with pytest.raises(ValueError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    assert match in message, message
    return message


def test_a_supported_config_reads_back():
    cfg = model_config_from_hf({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    assert (cfg.num_kv_heads, cfg.ffn_hidden_size, cfg.rope_scaling.rope_type) == (2, 48, "llama3")
    # transformers' rule: without it, the pretraining length is max_position_embeddings.
    assert cfg.rope_scaling.original_max_position_embeddings == 128


REFUSED = {
    "model_type": ({"model_type": "gemma"}, "model_type='gemma' is not supported"),
    "hidden_act": ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    "mlp_bias": ({"mlp_bias": True}, "mlp_bias=True is not supported"),
    "attention_bias-llama": ({"attention_bias": True}, "attention_bias=True is not supported"),
    "attention_bias-qwen3": ({"model_type": "qwen3", "attention_bias": True}, "attention_bias=True is not supported"),
    "dynamic": ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type='dynamic'"),
    "longrope": ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
                 "rope_scaling.rope_type='longrope'"),
    "no factor": ({"rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 32}},
                  "rope_scaling.factor is missing for rope_type='yarn'"),
    "partial_rotary_factor": ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
    "use_sliding_window": ({"model_type": "qwen2", "use_sliding_window": True},
                           "use_sliding_window=True is not supported"),
    "dropout": ({"attention_dropout": 0.1}, "attention_dropout=0.1 is not supported"),
    "vocab_size": ({"vocab_size": "64"}, "vocab_size='64': expected an integer"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_config_json_lsys_cannot_reproduce_is_refused(case):
    changes, match = REFUSED[case]
    message = _one_line_error(model_config_from_hf, {**LLAMA, **changes}, "ckpt/config.json", match=match)
    assert message.startswith("ckpt/config.json: ")


def test_qwen2_biases_are_read_and_qwen3_norms_switched_on():
    assert model_config_from_hf({**LLAMA, "model_type": "qwen2"}).attention_bias
    qwen3 = model_config_from_hf({**LLAMA, "model_type": "qwen3", "head_dim": 12})
    assert (qwen3.qk_norm, qwen3.head_dim, qwen3.attention_bias) == (True, 12, False)


def _pretrained(tmp_path, *overrides: str):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    return resolve_pretrained(load_config(None, [f"model.pretrained={tmp_path}", *overrides]))


def test_pretrained_sets_the_architecture_and_keeps_the_users_rope(tmp_path):
    cfg = _pretrained(tmp_path, "model.rope_scaling.rope_type=linear", "model.rope_scaling.factor=4")
    assert (cfg.model.hidden_size, cfg.model.num_kv_heads, cfg.model.vocab_size) == (32, 2, 64)
    assert (cfg.model.rope_scaling.rope_type, cfg.model.rope_scaling.factor) == ("linear", 4.0)


def test_a_model_key_conflicting_with_the_checkpoint_is_refused(tmp_path):
    message = _one_line_error(_pretrained, tmp_path, "model.hidden_size=64", match="model.hidden_size=64 conflicts")
    assert "(hidden_size 32)" in message and "remove model.hidden_size" in message


@pytest.mark.parametrize(("overrides", "match"), [
    (["model.rope_scaling.rope_type=dynamic"], "model.rope_scaling.rope_type='dynamic': choose one of"),
    (["model.rope_scaling.rope_type=linear", "model.rope_scaling.factor=0.5"], "model.rope_scaling.factor=0.5"),
    (["model.rope_scaling.rope_type=llama3", "model.rope_scaling.factor=8"],
     "model.rope_scaling.original_max_position_embeddings=0"),
    (["model.rope_scaling.rope_type=llama3", "model.rope_scaling.factor=8",
      "model.rope_scaling.original_max_position_embeddings=64", "model.rope_scaling.high_freq_factor=1"],
     "model.rope_scaling.high_freq_factor=1.0: must be above low_freq_factor=1.0"),
    (["model.rope_scaling.rope_type=yarn", "model.rope_scaling.original_max_position_embeddings=64",
      "model.rope_scaling.beta_slow=0"], "model.rope_scaling.beta_slow=0.0"),
    (["model.rope_scaling.rope_type=yarn", "model.rope_scaling.original_max_position_embeddings=64",
      "model.rope_scaling.attention_factor=-1"], "model.rope_scaling.attention_factor=-1.0"),
    (["model.sliding_window=128", "data.seq_len=256"], "model.sliding_window=128: sliding-window attention"),
])
def test_family_switches_are_validated(overrides, match):
    _one_line_error(load_config, None, overrides, match=match)


def test_a_window_as_long_as_the_sequence_is_accepted():
    assert load_config(None, ["model.sliding_window=256", "data.seq_len=256"]).model.sliding_window == 256
