"""A HuggingFace checkpoint loaded into a parallel run's shards, checkpointed by lsys and exported again is the
same checkpoint, bit for bit (bf16 in the files, float32 parameters in between: an exact widening)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from launch.cli import main
from lsys.config import load_config
from lsys.session import distributed_session
from lsys.trainer import Trainer
from tests.distributed import run_ranks
from tests.hf.checkpoints import QWEN2, write_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _load_and_checkpoint(pretrained: str, run_dir: str, layout: list[str]) -> None:
    """On every rank: a run starting from `pretrained`, checkpointed before any step."""
    cfg = load_config("configs/demo.yaml", [f"model.pretrained={pretrained}", "data.seq_len=32",
                                            "data.curriculum.start_len=0", "train.device=cpu",
                                            f"train.run_dir={run_dir}", *layout])
    with distributed_session("cpu", 60.0) as session:
        Trainer(cfg, session)._save(0)


@pytest.mark.parametrize("layout", [["parallel.dp=1", "parallel.cp_ring=1", "parallel.tp=2"],
                                    ["parallel.dp=2", "parallel.cp_ring=1"]], ids=["tp2", "dp2"])
def test_pretrained_to_lsys_to_export_is_bit_identical(tmp_path, layout):
    original = write_checkpoint(tmp_path / "pretrained", QWEN2, files=2, dtype=torch.bfloat16)
    run_ranks(_load_and_checkpoint, 2, str(tmp_path / "pretrained"), str(tmp_path / "run"), layout)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(index) == sorted(original)
    for name, file in index.items():
        with safe_open(str(tmp_path / "out" / file), framework="pt") as f:
            exported = f.get_tensor(name)
        assert exported.dtype == torch.bfloat16 and torch.equal(exported, original[name]), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["num_key_value_heads"] == QWEN2["num_key_value_heads"]
