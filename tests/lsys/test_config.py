import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from lsys.config import (
    LsysConfig,
    config_from_dict,
    load_config,
    save_config,
    to_dict,
)
from lsys.validation import validate, validate_for_cluster
from tests.hf.checkpoints import write_checkpoint

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_preset_loads_and_validates(name, tmp_path):
    # A preset extending a pretrained model names a directory an earlier step makes: a tiny one stands in.
    overrides = []
    if "pretrained:" in (CONFIGS / name).read_text():
        write_checkpoint(tmp_path / "pretrained")
        overrides.append(f"model.pretrained={tmp_path / 'pretrained'}")
    cfg = load_config(CONFIGS / name, overrides)
    assert isinstance(cfg, LsysConfig)
    # The rank count the preset's header tells users to launch with must be one it accepts.
    launched = re.search(r"--nproc (\d+)", (CONFIGS / name).read_text())
    validate(cfg, int(launched.group(1)) if launched else cfg.cluster.num_workers)
    validate_for_cluster(cfg)  # and `lsys submit` runs it as it is


def test_overrides_are_typed_and_applied():
    cfg = load_config(CONFIGS / "demo.yaml", ["train.steps=7", "model.num_kv_heads=1", "data.passkey.key_len=3"])
    assert cfg.train.steps == 7 and cfg.model.num_kv_heads == 1 and cfg.data.passkey.key_len == 3


def test_roundtrip_through_dict_and_yaml(tmp_path):
    cfg = load_config(None, ["train.steps=3", "parallel.cp_layout=contiguous"])
    assert config_from_dict(to_dict(cfg)) == cfg
    path = save_config(cfg, tmp_path)
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["train"]["steps"] == 3


BAD = [
    (["model.hidden_size=-8"], "model.hidden_size=-8"),
    (["model.num_heads=3"], "divisible by model.num_heads=3"),
    (["model.num_kv_heads=3"], "model.num_kv_heads=3"),
    (["model.hidden_size=12", "model.num_heads=4"], "must be even for RoPE"),
    (["data.task=wiki"], "data.task='wiki': choose one of passkey, mqar, text"),
    (["data.task=text"], "data.text.path"),
    (["data.seq_len=4"], "data.seq_len=4"),
    (["data.passkey.pack=3"], "data.passkey.pack=3: must divide data.seq_len=256"),
    (["data.task=mqar", "data.mqar.pack=0"], "data.mqar.pack=0: use 1"),
    (["data.passkey.pack=2", "data.curriculum.start_len=32", "data.curriculum.steps=9"], "data.passkey.pack=2: "
     "packing with a sequence-length curriculum"),
    (["data.document_masks=sometimes"], "data.document_masks"),
    (["parallel.cp_layout=striped"], "parallel.cp_layout='striped': choose one of zigzag, contiguous, balanced"),
    (["recompute.offload=gpu"], "recompute.offload='gpu': choose one of none, cpu"),
    (["recompute.offload=cpu"], "recompute.offload=cpu: it moves what recomputation keeps"),
    (["parallel.fsdp_offload=disk"], "parallel.fsdp_offload='disk'"),
    (["logging.wandb_mode=cloud"], "logging.wandb_mode='cloud'"),
    (["train.steps=0"], "train.steps=0"),
    (["train.min_lr=1.0", "train.lr=0.1"], "train.min_lr=1.0"),
    (["train.warmup_steps=-1"], "train.warmup_steps=-1"),
    (["train.param_dtype=fp8"], "train.param_dtype='fp8'"),
    (["train.compute_dtype=float32", "train.param_dtype=bfloat16"], "train.compute_dtype='float32'"),
    (["train.device=tpu"], "train.device='tpu'"),
    (["train.beta2=1.0"], "train.beta2=1.0"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last=0"),
    (["train.exit_at_step=500", "train.steps=100"], "train.exit_at_step=500"),
    (["parallel.cp_layout=striped"], "parallel.cp_layout='striped'"),
    (["parallel.cp_ring=0"], "parallel.cp_ring=0"),
    (["parallel.tp=3"], "parallel.tp=3: must divide model.num_heads=4"),
    (["parallel.tp=2", "model.num_kv_heads=1"], "parallel.tp=2: must divide model.num_kv_heads=1"),
    (["parallel.tp=2", "model.tie_embeddings=true"], "model.tie_embeddings=True"),
    (["parallel.tp=2", "parallel.cp_ring=2", "data.seq_len=36"], "data.seq_len=36: must be divisible by 8"),
    (["model.hidden_sise=64"], "'model.hidden_sise'"),
    (["model.attention_backend=fast"], "model.attention_backend='fast': choose one of auto, aten, flash"),
    (["model.attention_backend=flash", "train.device=cpu"], "CUDA attention ops need a GPU"),
    (["train.steps=many"], "'train.steps'"),
    (["trainsteps"], "not key=value"),
    (["parallel.cp_ring=2", "data.seq_len=30"], "data.seq_len=30: must be divisible by 4"),
    (["parallel.cp_ring=2", "parallel.cp_ulysses=2", "data.seq_len=18"], "pick a multiple of 4, e.g. 20 or 16"),
    (["parallel.cp_ulysses=3", "data.seq_len=300"], "cp_ulysses=3: times parallel.tp=1 must divide model.num_heads=4"),
    (["recompute.mode=some"], "recompute.mode='some': choose one of none, selective, full"),
    (["recompute.every=0"], "recompute.every=0"),
    (["quant.activations=int4"], "quant.activations='int4'"),
    (["quant.kinds=[mlp]"], "quant.kinds=['mlp']"),
    (["quant.decay=1.5"], "quant.decay=1.5"),
    (["train.fail_at_step=200", "train.steps=100"], "train.fail_at_step=200"),
    (["train.fail_target=node"], "train.fail_target='node': choose rank or optimizer"),
    (["train.fail_target=optimizer"], "killing the optimizer's actor needs optim.offload=cpu"),
    (["optim.offload=gpu"], "optim.offload='gpu': choose one of none, cpu"),
    (["optim.offload=cpu", "optim.placement=resource"], "optim.resource='': optim.placement=resource needs"),
    (["optim.fraction=0"], "optim.fraction=0.0: must lie in (0, 1]"),
    (["cluster.num_workers=0"], "cluster.num_workers=0: run at least one worker"),
    (["cluster.placement_strategy=RANDOM"], "cluster.placement_strategy='RANDOM'"),
    (["cluster.resources_per_worker.CPU=2"], "cluster.resources_per_worker.CPU=2.0"),
    (["cluster.max_failures=-2"], "cluster.max_failures=-2"),
    (["train.loss_chunk_tokens=-1"], "train.loss_chunk_tokens=-1: use 0"),
    (["parallel.tp=2", "train.loss_chunk_tokens=64"], "train.loss_chunk_tokens=64: needs parallel.tp=1"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_is_rejected_with_key_value_and_fix(overrides, message):
    with pytest.raises(ValueError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_package_is_rejected_naming_the_install():
    with pytest.raises(ValueError, match=r"logging.wandb=true: the wandb package is not installed; `pip install"):
        load_config(None, ["logging.wandb=true"])


def test_hybrid_length_is_accepted_when_the_layout_can_shard_it():
    # Zigzag over 2 ring ranks cuts 4 chunks, and each rank's 2 chunks split over 2 Ulysses ranks: 4 divides 20.
    cfg = load_config(None, ["parallel.cp_ring=2", "parallel.cp_ulysses=2", "data.seq_len=20"])
    assert cfg.parallel.seq_multiple == 4 and cfg.parallel.seq_granularity == 8


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_key_in_yaml_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ValueError, match="stepz"):
        load_config(path)


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["parallel.dp=3"], 2, "parallel.dp=3"),
        (["train.global_batch_size=3"], 2, "divisible by the data-parallel degree 2"),
        (["train.global_batch_size=8", "train.micro_batch_size=3"], 2, "must divide the per-rank batch 4"),
    ],
)
def test_world_size_checks(overrides, world, message):
    cfg = load_config(None, overrides)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg, world_size=world)
