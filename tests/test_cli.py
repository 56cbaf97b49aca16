"""The `lsys` command line: help texts, input errors before anything starts, and one real 2-rank run."""

from __future__ import annotations

import json

import pytest
import yaml

from launch.cli import build_parser, main
from tests.commands import TINY, lsys

COMMANDS = [[], ["train"], ["submit"], ["jobs"], ["jobs", "list"], ["jobs", "logs"], ["jobs", "stop"], ["cluster"],
            ["cluster", "start"], ["prepare-data"], ["profile"], ["plan"], ["eval"], ["export"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda words: "-".join(words) or "lsys")
def test_help_describes_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser()
    for word in command:
        parser = parser._subparsers._group_actions[0].choices[word]
    if parser._subparsers is not None:
        assert all(name in text for name in parser._subparsers._group_actions[0].choices)
    for action in parser._actions:
        if action.help == "==SUPPRESS==":
            continue
        assert action.help, f"{action.dest} has no help text"
        names = action.option_strings or [action.metavar or action.dest]
        assert any(name in text for name in names), f"{names} missing from --help"


def test_bad_override_is_rejected_before_any_rank_starts(tmp_path):
    run_dir = tmp_path / "run"
    result = lsys("train", "configs/demo.yaml", "--nproc", "2", "model.num_kv_heads=3", f"train.run_dir={run_dir}")
    assert result.returncode == 2
    assert "model.num_kv_heads=3" in result.stderr and "must divide model.num_heads=4" in result.stderr
    assert not run_dir.exists()


def test_unknown_key_and_world_size_mismatch_name_the_fix(tmp_path):
    unknown = lsys("train", "configs/demo.yaml", "train.stepz=3")
    assert unknown.returncode == 2 and "train.stepz" in unknown.stderr
    mismatch = lsys("train", "configs/demo.yaml", "--nproc", "3", f"train.run_dir={tmp_path}")
    assert mismatch.returncode == 2 and "= 4 ranks, but the world size is 3; set parallel.dp=-1" in mismatch.stderr
    undivided = lsys("train", "configs/demo.yaml", "--nproc", "3", "parallel.dp=-1", f"train.run_dir={tmp_path}")
    assert undivided.returncode == 2 and "not divisible by cp_ring*cp_ulysses*tp=2" in undivided.stderr


def test_offload_is_refused_outside_ray():
    result = lsys("train", "configs/demo.yaml", "--nproc", "4", "optim.offload=cpu")
    assert result.returncode == 2 and "optim.offload=cpu: the optimizer state lives in Ray actors" in result.stderr
    bad = lsys("submit", "configs/demo.yaml", "optim.offload=cpu", "optim.placement=label", "optim.label=node1")
    assert bad.returncode == 2 and "optim.label='node1': optim.placement=label needs a node label" in bad.stderr


def test_print_config_resolves_overrides_given_after_options():
    result = lsys("train", "configs/demo.yaml", "--print-config", "--nproc", "2", "train.steps=7", "parallel.dp=1")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["steps"] == 7 and resolved["parallel"]["dp"] == 1
    assert resolved["data"]["task"] == "passkey"


def test_two_rank_context_parallel_run_writes_metrics_config_and_checkpoints(tmp_path):
    result = lsys("train", "configs/demo.yaml", "--nproc", "2", *TINY, "parallel.dp=1",
                  f"train.run_dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "dp=1, cp=2" in result.stderr and "final eval" in result.stderr
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "split" not in r]
    evals = [r for r in records if r.get("split") == "valid"]
    assert [r["step"] for r in steps] == [2, 4] and [r["step"] for r in evals] == [2, 4]
    assert all(len(r["peak_memory_bytes"]) == 2 and r["tokens_per_s"] > 0 for r in steps)
    assert 0.0 <= evals[-1]["passkey_accuracy"] <= 1.0
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["parallel"]["cp_ring"] == 2 and saved["train"]["steps"] == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["end_step"] == 4 and len(summary["losses"]) == 4


def test_eval_reports_a_checkpoint_at_another_length_and_layout_and_writes_nothing(tmp_path):
    trained = lsys("train", "configs/demo.yaml", *TINY, "parallel.dp=1", "parallel.cp_ring=1",
                   f"train.run_dir={tmp_path}")
    assert trained.returncode == 0, trained.stderr
    final = json.loads(trained.stderr.split("final eval: ")[1].splitlines()[0])
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    same = lsys("eval", "configs/demo.yaml", *TINY, "parallel.dp=1", "parallel.cp_ring=1", f"train.run_dir={tmp_path}")
    assert same.returncode == 0, same.stderr
    result = json.loads(same.stdout.strip().splitlines()[-1])
    assert result["step"] == 4 and result["seq_len"] == final.get("seq_len", result["seq_len"])
    assert result["loss"] == pytest.approx(final["loss"], rel=1e-9)  # the same weights, samples and length
    longer = lsys("eval", "configs/demo.yaml", "--nproc", "2", *TINY, "parallel.dp=1", "data.seq_len=128",
                  f"train.run_dir={tmp_path}")
    assert longer.returncode == 0, longer.stderr
    result = json.loads(longer.stdout.strip().splitlines()[-1])
    assert "lsys: evaluating step_00000004 with changed settings: data.seq_len 32 -> 128" in longer.stderr
    assert result["step"] == 4 and result["seq_len"] == 128 and 0.0 <= result["passkey_accuracy"] <= 1.0
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_timeout_stops_every_rank_with_a_clear_line(tmp_path):
    result = lsys("train", "configs/demo.yaml", "--nproc", "2", *TINY, "parallel.dp=1", "train.steps=100000",
                  "checkpoint.every=0", f"train.run_dir={tmp_path}", "--timeout", "3")
    assert result.returncode == 124, result.stderr
    assert "--timeout 3 s expired; all ranks stopped" in result.stderr and "Traceback" not in result.stderr
