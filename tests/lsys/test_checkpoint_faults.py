"""Damaged, planted and mismatched checkpoints: resume skips them with a reason, loads the newest good one, and
never unpickles a run directory's files with full pickle.

One uninterrupted 2-rank float64 run with checkpoints at steps 2, 4 and 6 is the template: each test damages a
copy of it, and resumed runs are compared with its per-step losses.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from launch.local import RankFailedError
from lsys.checkpoint import SafeFileSystemReader, prunable
from lsys.checkpoint_verify import (
    Unusable,
    load_dcp_metadata,
    model_shape,
    preflight_resume,
    resume_messages,
    run_layout,
    select_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from lsys.config import config_from_dict
from lsys.trainer import train_from_dict
from tests.distributed import run_ranks
from tests.lsys.harness import tiny_config

COMMON = ("train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=5")
STEPS = ("step_00000002", "step_00000004", "step_00000006")


def _train_capturing_stderr(values: dict[str, Any]) -> dict[str, Any]:
    """train_from_dict, plus what this rank printed to stderr (the resume messages)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        summary = train_from_dict(values)
    return {**summary, "stderr": err.getvalue()}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("straight")
    values = tiny_config(run_dir, *COMMON, "parallel.dp=2")
    summary = run_ranks(train_from_dict, 2, values)[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == list(STEPS)
    return {"run_dir": run_dir, "values": values, "summary": summary}


def _copy(template: dict[str, Any], tmp_path: Path) -> Path:
    """A copy of the template run directory; returns its checkpoints root."""
    shutil.copytree(template["run_dir"] / "checkpoints", tmp_path / "checkpoints")
    return tmp_path / "checkpoints"


def _shape(values: dict[str, Any]) -> dict[str, Any]:
    """The model shape the trainer computes for `values` (passkey with the harness' options: 60 tokens)."""
    model = config_from_dict(values).model
    model.vocab_size = 60
    return model_shape(model)


def _flip_bytes(path: Path, count: int = 64) -> None:
    """Overwrite `count` bytes in the middle of `path` with different ones (size unchanged)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _rewrite_manifest(directory: Path) -> None:
    """Re-hash `directory` as a forger would, so that only the content checks can refuse it."""
    manifest = json.loads((directory / "manifest.json").read_text())
    write_manifest(directory, manifest["step"], manifest["model_shape"], manifest["layout"], manifest["config"])


class _Planted:
    """Pickles to a call of `fn(arg)`: what a planted `.metadata` would run under full pickle."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _plant(directory: Path, marker: Path, how: str) -> str:
    """Replace `.metadata` with a pickle that creates `marker` when fully unpickled; returns the global it names."""
    if how == "os.system":
        payload, name = _Planted(os.system, f"touch {marker}"), f"{os.system.__module__}.system"
    else:
        payload, name = _Planted(builtins.exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"
    (directory / ".metadata").write_bytes(pickle.dumps(payload))
    return name


# -- resume through the trainer ------------------------------------------------------------------------------


def test_corrupt_shard_of_newest_is_skipped_and_resume_repeats_the_uninterrupted_losses(template, tmp_path):
    root = _copy(template, tmp_path)
    _flip_bytes(root / "step_00000006" / "__0_0.distcp")
    # keep_last=1: the corrupt step 6 has its recorded size, so pruning counts it; the step-4 checkpoint the run
    # resumed from may go only once a new verified step 6 exists.
    values = tiny_config(tmp_path, *COMMON, "parallel.dp=2", "checkpoint.keep_last=1")
    resumed = run_ranks(_train_capturing_stderr, 2, values)
    straight = template["summary"]
    assert resumed[0]["start_step"] == 4
    assert resumed[0]["losses"] == straight["losses"][4:]  # same layout, float64: bit for bit
    assert resumed[0]["evals"] == straight["evals"]
    assert "lsys: skipping checkpoint step_00000006: shard __0_0.distcp: sha256 mismatch (corrupt)\n" in \
        resumed[0]["stderr"]
    assert "skipping" not in resumed[1]["stderr"]  # rank 0 alone verifies and reports
    assert sorted(p.name for p in root.iterdir()) == ["step_00000006"]
    assert verify_checkpoint(root / "step_00000006")["step"] == 6


def test_planted_metadata_and_truncated_shard_fall_back_to_the_oldest_on_one_rank(template, tmp_path):
    root = _copy(template, tmp_path)
    marker = tmp_path / "planted_ran"
    metadata_size = (root / "step_00000006" / ".metadata").stat().st_size
    _plant(root / "step_00000006", marker, "os.system")
    planted_size = (root / "step_00000006" / ".metadata").stat().st_size
    _truncate(root / "step_00000004" / "__1_0.distcp")
    resumed = run_ranks(_train_capturing_stderr, 1, tiny_config(tmp_path, *COMMON))[0]
    assert not marker.exists()
    assert resumed["start_step"] == 2
    # Two replicas' checkpoint resumed on one rank: equal up to float64 summation order.
    torch.testing.assert_close(resumed["losses"], template["summary"]["losses"][2:], rtol=1e-10, atol=0)
    lines = [line for line in resumed["stderr"].splitlines() if "skipping" in line]
    size = (root / "step_00000002" / "__1_0.distcp").stat().st_size  # same tensors as step 4, same size
    assert lines == [f"lsys: skipping checkpoint step_00000006: .metadata: size {planted_size} != {metadata_size} "
                     "(truncated)",
                     f"lsys: skipping checkpoint step_00000004: shard __1_0.distcp: size {size // 2} != {size} "
                     "(truncated)"]


@pytest.fixture(scope="module")
def wider(tmp_path_factory) -> Path:
    """A run directory whose only checkpoint (step 8) is of a model with hidden_size 64."""
    run_dir = tmp_path_factory.mktemp("wider")
    run_ranks(train_from_dict, 1, tiny_config(run_dir, "train.steps=8", "model.hidden_size=64"))
    return run_dir


def test_checkpoint_of_another_shape_alone_stops_the_run_naming_both_shapes(template, wider):
    with pytest.raises(RankFailedError, match=r"hidden_size 64 != 32") as info:
        run_ranks(train_from_dict, 1, tiny_config(wider, "train.steps=10"))
    assert "ValueError" in info.value.detail and "checkpoint.resume=false" in info.value.detail
    with pytest.raises(ValueError) as preflight:
        preflight_resume(wider, _shape(template["values"]))
    message = str(preflight.value)
    assert "\n" not in message
    assert "configured model (vocab_size=60 hidden_size=32 num_layers=2" in message
    assert "found vocab_size=60 hidden_size=64 num_layers=2" in message
    assert "step_00000008: model shape differs: hidden_size 64 != 32, ffn_hidden_size 192 != 128" in message
    assert "checkpoint.resume=false" in message and "train.run_dir" in message


def test_checkpoint_of_another_shape_is_skipped_when_an_older_one_fits(template, wider, tmp_path):
    root = _copy(template, tmp_path)
    shutil.copytree(wider / "checkpoints" / "step_00000008", root / "step_00000008")
    selection = select_checkpoint(root, _shape(template["values"]))
    assert selection.path == root / "step_00000006" and selection.step == 6
    # head_dim follows hidden_size / num_heads: it differs too
    assert selection.skipped == ["step_00000008: model shape differs: hidden_size 64 != 32, "
                                 "ffn_hidden_size 192 != 128, head_dim 16 != 8 (checkpoint != config)"]
    # The CLI may not know the vocabulary yet (model.vocab_size=0): it is then not compared.
    assert preflight_resume(tmp_path, model_shape(config_from_dict(template["values"]).model)) == [
        "lsys: skipping checkpoint " + selection.skipped[0]]


def _train_offloaded(values: dict[str, Any]) -> dict[str, Any]:
    """A run with optim.offload=cpu whose optimizer state lives in an in-process store (no Ray)."""
    from launch.ray_offload import local_store
    from lsys.trainer import train

    return train(config_from_dict(values), optimizer_store=local_store())


def test_offloaded_optimizer_state_is_in_the_manifest_and_ties_the_checkpoint_to_its_layout(tmp_path):
    values = tiny_config(tmp_path, "train.steps=2", "optim.offload=cpu")
    run_ranks(_train_offloaded, 1, values)
    directory = tmp_path / "checkpoints" / "step_00000002"
    manifest = verify_checkpoint(directory)
    assert sorted(manifest["files"]) == [".metadata", "__0_0.distcp", "optimizer_rank00000.pt"]
    assert manifest["layout"] == {"world_size": 1, "dp": 1, "cp_ring": 1, "cp_ulysses": 1, "tp": 1,
                                  "offload": "cpu"}
    cfg, shape = config_from_dict(values), _shape(values)
    assert select_checkpoint(directory.parent, shape, run_layout(cfg, 1)).path == directory
    with pytest.raises(ValueError, match=r"no checkpoint fits this run's layout: step_00000002: layout differs: "
                                         r"offloaded optimizer state of 1 ranks, 2 now\. Resume with"):
        select_checkpoint(directory.parent, shape, run_layout(cfg, 2))
    cfg.optim.offload = "none"
    with pytest.raises(ValueError, match=r"layout differs: optim\.offload cpu != none"):
        select_checkpoint(directory.parent, shape, run_layout(cfg, 1))
    _flip_bytes(directory / "optimizer_rank00000.pt")
    with pytest.raises(Unusable, match=r"^optimizer_rank00000\.pt: sha256 mismatch \(corrupt\)$"):
        verify_checkpoint(directory)


# -- selection, without ranks ---------------------------------------------------------------------------------


def _drop_from_manifest(directory: Path, name: str) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["files"][name]
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda d: _truncate(d / "__0_0.distcp"), r"shard __0_0\.distcp: size \d+ != \d+ \(truncated\)"),
    (lambda d: _flip_bytes(d / "__1_0.distcp"), r"shard __1_0\.distcp: sha256 mismatch \(corrupt\)"),
    (lambda d: (d / "__1_0.distcp").unlink(), r"shard __1_0\.distcp missing"),
    (lambda d: _flip_bytes(d / ".metadata"), r"\.metadata: sha256 mismatch \(corrupt\)"),
    (lambda d: (d / ".metadata").unlink(), r"\.metadata missing"),
    (lambda d: (_flip_bytes(d / ".metadata", 4096), _rewrite_manifest(d)), r"\.metadata: .*not readable DCP metadata"),
    (lambda d: _drop_from_manifest(d, "__1_0.distcp"),
     r"\.metadata names shard __1_0\.distcp, which the manifest does not list"),
    (lambda d: (d / "manifest.json").unlink(), r"no manifest\.json \(.*\): unverifiable"),
    (lambda d: (d / "manifest.json").write_text("{\"format\": 1, \"files\""), r"manifest\.json is damaged"),
    (lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text().replace(
        '"__0_0.distcp"', '"../step_00000004/__0_0.distcp"')), r"manifest\.json is damaged \(unexpected format\)"),
], ids=["truncated-shard", "corrupt-shard", "missing-shard", "corrupt-metadata", "missing-metadata",
        "unreadable-metadata-rehashed", "unlisted-shard", "no-manifest", "damaged-manifest", "manifest-path-escape"])
def test_damaged_newest_checkpoint_is_skipped_with_its_reason(template, tmp_path, damage, reason):
    root = _copy(template, tmp_path)
    damage(root / "step_00000006")
    selection = select_checkpoint(root, _shape(template["values"]))
    assert selection.path == root / "step_00000004"
    assert len(selection.skipped) == 1
    assert selection.skipped[0].startswith("step_00000006: ")
    with pytest.raises(Unusable, match=reason):
        verify_checkpoint(root / "step_00000006")


def test_every_checkpoint_damaged_is_an_error_naming_them(template, tmp_path):
    root = _copy(template, tmp_path)
    for name in STEPS:
        _flip_bytes(root / name / "__0_0.distcp")
    with pytest.raises(ValueError, match=r"every checkpoint is damaged or unverifiable: step_00000006: shard "
                                         r"__0_0\.distcp: sha256 mismatch \(corrupt\); step_00000004: .*; "
                                         r"step_00000002: .*checkpoint\.resume=false"):
        select_checkpoint(root, _shape(template["values"]))
    assert select_checkpoint(tmp_path / "nothing", _shape(template["values"])).path is None


def test_changed_settings_are_reported_in_one_line(template, tmp_path):
    root = _copy(template, tmp_path)
    selection = select_checkpoint(root, _shape(template["values"]))
    values = json.loads(json.dumps(template["values"]))
    values["train"]["lr"], values["train"]["exit_at_step"] = 0.002, 5  # a stop point differs by design: quiet
    assert resume_messages(selection, values) == [
        "lsys: resuming step_00000006 with changed settings: train.lr 0.001 -> 0.002"]
    assert resume_messages(selection, template["values"]) == []


def test_pruning_counts_only_size_verified_checkpoints_and_keeps_the_one_just_written(template, tmp_path):
    root = _copy(template, tmp_path)
    shutil.copytree(root / "step_00000006", root / "step_00000008")
    (root / "step_00000008" / "manifest.json").unlink()  # unverifiable: neither counted nor deleted
    _truncate(root / "step_00000006" / "__0_0.distcp")  # damaged: neither counted nor deleted
    assert prunable(root, root / "step_00000004", keep_last=1) == [root / "step_00000002"]
    assert prunable(root, root / "step_00000004", keep_last=2) == []
    assert prunable(root, root / "step_00000002", keep_last=1) == [root / "step_00000004"]


# -- the restricted unpickler ---------------------------------------------------------------------------------


def test_restricted_unpickler_loads_a_real_checkpoints_metadata(template):
    path = template["run_dir"] / "checkpoints" / "step_00000002" / ".metadata"
    with path.open("rb") as f:
        safe = load_dcp_metadata(f, path)
    with path.open("rb") as f:
        full = pickle.load(f)  # our own file, just written: the reference
    assert safe == full
    assert any(m.chunks for m in safe.state_dict_metadata.values() if hasattr(m, "chunks"))
    reader = SafeFileSystemReader(path.parent)
    metadata = reader.read_metadata()
    assert metadata.state_dict_metadata == full.state_dict_metadata
    assert metadata.storage_meta.load_id == reader.load_id


@pytest.mark.parametrize("how", ["os.system", "builtins.exec"])
def test_planted_metadata_is_refused_even_with_a_rehashed_manifest(template, tmp_path, how):
    root = _copy(template, tmp_path)
    marker = tmp_path / "planted_ran"
    directory = root / "step_00000006"
    name = _plant(directory, marker, how)
    _rewrite_manifest(directory)  # the hashes now match: only the unpickler stands in the way
    selection = select_checkpoint(root, _shape(template["values"]))
    assert selection.path == root / "step_00000004"
    assert selection.skipped == [f"step_00000006: .metadata: {directory / '.metadata'}: refused to load global "
                                 f"{name}: DCP metadata holds only checkpoint descriptions, so this file is "
                                 "damaged or planted"]
    with pytest.raises(ValueError, match=f"refused to load global {name}"):
        SafeFileSystemReader(directory).read_metadata()
    assert not marker.exists()
    pickle.loads((directory / ".metadata").read_bytes())  # the payload is live: full pickle runs it
    assert marker.exists()
