"""Tiny HuggingFace-format checkpoints written by the tests themselves: config.json plus safetensors files
(safetensors.torch.save_file, no transformers), with random values of the model's shapes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lsys.hf.checkpoint import INDEX_FILE, expected_shapes
from lsys.hf.config import model_config_from_hf
from lsys.hf.names import hf_name

# Qwen2: q/k/v biases (vectors that tensor parallelism splits too); 64 / 32 / 40 divide by every degree used.
QWEN2 = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 40, "rms_norm_eps": 1e-6,
         "max_position_embeddings": 128, "tie_word_embeddings": False}


def write_checkpoint(directory: Path, config: dict[str, Any] | None = None, files: int = 2, index: bool = True,
                     dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a checkpoint of `config` (default QWEN2) into `directory` over `files` files, with the index file
    or without; returns its tensors by HuggingFace name."""
    config = config or QWEN2
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(seed)
    tensors = {hf_name(name): torch.randn(shape, generator=generator).to(dtype)
               for name, shape in expected_shapes(model_config_from_hf(config)).items()}
    names = list(tensors)
    weight_map = {}
    for i in range(files):
        file = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        part = names[i::files]
        save_file({n: tensors[n] for n in part}, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    if index:
        (directory / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors
