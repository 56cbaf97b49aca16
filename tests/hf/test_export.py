"""`lsys export`: a tiny run's checkpoint, written as a HuggingFace directory, runs in transformers exactly as the
lsys model restored from the same checkpoint does; any layout's checkpoint gives the same files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from launch.cli import main
from lsys.checkpoint import checkpoint_root, read_model_tensors
from lsys.checkpoint_verify import MANIFEST, checkpoints_by_step, write_manifest
from lsys.config import config_from_dict
from lsys.hf.export import checkpoint_entries, plan_export, write_export
from lsys.model import build_model
from lsys.rope import inverse_frequencies

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

pytestmark = pytest.mark.slow  # three 2-rank training runs shared by the module, about 20 s

MODEL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
         "data.seq_len=32", "data.curriculum.start_len=0", "train.steps=2", "train.global_batch_size=4",
         "train.warmup_steps=1", "train.eval_samples=0", "train.device=cpu", "train.log_every=1"]
FLOAT64 = ["train.param_dtype=float64", "train.compute_dtype=float64"]
YARN = ["model.tie_embeddings=true", "model.rope_scaling.rope_type=yarn", "model.rope_scaling.factor=4",
        "model.rope_scaling.original_max_position_embeddings=16"]
# FSDP2 shards over data and context ranks alike; tensor parallelism splits the weights another way.
LAYOUTS = {"dp": ["parallel.dp=2", "parallel.cp_ring=1"],
           "tp": ["parallel.dp=1", "parallel.cp_ring=1", "parallel.tp=2"],
           "ring": ["parallel.dp=1", "parallel.cp_ring=2"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Run directories: the same float64 training on data and on tensor parallelism, and a float32 one on a
    ring with tied embeddings and YaRN scaling."""
    root = tmp_path_factory.mktemp("runs")
    specs = {"dp": [*LAYOUTS["dp"], *FLOAT64], "tp": [*LAYOUTS["tp"], *FLOAT64], "yarn": [*LAYOUTS["ring"], *YARN]}
    for name, overrides in specs.items():
        assert main(["train", "configs/demo.yaml", *MODEL, *overrides, f"train.run_dir={root / name}",
                     "--nproc", "2"]) == 0
    return {name: root / name for name in specs}


def _export(run: Path, out: Path, *options: str) -> Path:
    assert main(["export", str(run), str(out), *options]) == 0
    return out


def _newest(run: Path) -> tuple[Path, dict]:
    path = checkpoints_by_step(checkpoint_root(run))[-1][1]
    return path, json.loads((path / MANIFEST).read_text())


def _lsys_logits(run: Path, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The lsys model restored from the run's newest checkpoint, its logits for `tokens` [1, S]."""
    path, manifest = _newest(run)
    cfg = config_from_dict(manifest["config"])
    model_cfg = cfg.model.__class__(**{**vars(cfg.model), "vocab_size": manifest["model_shape"]["vocab_size"]})
    model = build_model(model_cfg, torch.device("cpu"), dtype, seed=123)  # every value overwritten below
    params = dict(model.named_parameters())
    values = read_model_tensors(path, {n: (p.shape, getattr(torch, cfg.train.param_dtype)) for n, p in params.items()})
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)
        return model(tokens, torch.arange(tokens.shape[1])[None])


def _hf_logits(out: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        return model(tokens).logits


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # 1e-5 relative to the logits' scale: float32 weights and compute, and transformers' float32 RoPE angles.
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_transformers_reproduces_lsys_logits_from_sharded_files(runs, tmp_path):
    out = _export(runs["dp"], tmp_path / "hf", "--dtype", "float32", "--max-shard-size", "20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    assert "lm_head.weight" in index["weight_map"]
    tokens = torch.randint(0, 60, (1, 32), generator=torch.Generator().manual_seed(0))
    _close(_hf_logits(out, tokens), _lsys_logits(runs["dp"], tokens, torch.float64))


def test_layouts_export_the_same_bytes(runs, tmp_path):
    # The two float64 runs agree to round-off (the trainer's tests); float32 rounding hides it bit for bit.
    a = _export(runs["dp"], tmp_path / "a", "--dtype", "float32")
    b = _export(runs["tp"], tmp_path / "b", "--dtype", "float32")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _inv_freq_matches(out: Path, run: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    cfg = config_from_dict(_newest(run)[1]["config"])
    inv_freq, scale = inverse_frequencies(8, cfg.model.rope_theta, cfg.model.rope_scaling)
    assert torch.equal(model.model.rotary_emb.inv_freq, inv_freq)
    assert model.model.rotary_emb.attention_scaling == pytest.approx(scale, rel=1e-12) and scale != 1.0


def test_yarn_scaling_and_tied_embeddings_export_no_head(runs, tmp_path):
    out = _export(runs["yarn"], tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "float32"
    assert config["rope_scaling"]["rope_type"] == "yarn" and config["rope_scaling"]["factor"] == 4
    assert "lm_head.weight" not in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    _inv_freq_matches(out, runs["yarn"])
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokens = torch.randint(0, 60, (1, 32), generator=torch.Generator().manual_seed(1))
    _close(_hf_logits(out, tokens), _lsys_logits(runs["yarn"], tokens, torch.float32))


def _untied_copy(run: Path, copy: Path) -> tuple[Path, torch.Tensor]:
    """A copy of the tied yarn run whose checkpoint's head differs from its embedding (as one trained before
    lsys kept the tie when materialising would be); written in one process: dcp.save without a process group."""
    source, manifest = _newest(run)
    target = checkpoint_root(copy) / source.name
    target.mkdir(parents=True)
    entries = {k.removeprefix("model."): v for k, v in checkpoint_entries(source).items() if k.startswith("model.")}
    state = read_model_tensors(source, {n: (m.size, m.properties.dtype) for n, m in entries.items()})
    state["lm_head.weight"] = state["embed.weight"] + 0.01
    dcp.save({"model": state, "progress": {"step": torch.tensor(manifest["step"])}}, checkpoint_id=target,
             no_dist=True)
    write_manifest(target, manifest["step"], manifest["model_shape"], manifest["layout"], manifest["config"])
    return copy, state["lm_head.weight"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_head_trained_apart_from_its_tied_embedding_is_exported_untied(runs, tmp_path):
    run, head = _untied_copy(runs["yarn"], tmp_path / "run")
    out = _export(run, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(model.lm_head.weight.data, head, rtol=0, atol=0)


def _pretrained_dir(path: Path, **config) -> Path:
    """A tiny HuggingFace directory as a pretrained run would name: config.json, tokenizer and generation files."""
    path.mkdir()
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2}, unk_token="<unk>"))
    tok.add_special_tokens(["</s>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "max_new_tokens": 7}))
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 60, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
        "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16", "initializer_range": 0.02, **config}))
    return path


def _claim_pretrained(run: Path, copy: Path, pretrained: Path) -> Path:
    """A copy of `run` whose checkpoints' saved config names `pretrained` (a stand-in until runs can start from
    one: the manifest lists the files it hashes, not itself)."""
    shutil.copytree(run, copy)
    for _, path in checkpoints_by_step(checkpoint_root(copy)):
        manifest = json.loads((path / MANIFEST).read_text())
        manifest["config"]["model"]["pretrained"] = str(pretrained)
        (path / MANIFEST).write_text(json.dumps(manifest))
    return copy


def test_pretrained_base_config_tokenizer_and_dtype(runs, tmp_path):
    base = _pretrained_dir(tmp_path / "base")
    run = _claim_pretrained(runs["dp"], tmp_path / "run", base)
    out = _export(run, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["bos_token_id"] == 0
    assert config["max_position_embeddings"] == 4096 and config["initializer_range"] == 0.02
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token == "</s>"


def test_pretrained_config_changed_since_training_is_refused(runs, tmp_path):
    run = _claim_pretrained(runs["dp"], tmp_path / "run", _pretrained_dir(tmp_path / "base", hidden_size=64))
    with pytest.raises(ValueError, match="hidden_size"):
        plan_export(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_step_and_generation_config_without_pretrained(runs, tmp_path):
    plan = plan_export(runs["tp"], tmp_path / "hf", step=2)
    assert plan.step == 2 and plan.dtype == "float64" and plan.generation_config == {} and plan.copies == {}
    write_export(plan)
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == {}
    assert not (tmp_path / "hf.tmp").exists()
