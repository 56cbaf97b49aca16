"""`lsys profile` and `lsys plan` as a user runs them: files written, tables printed, bad inputs refused."""

from __future__ import annotations

import json

import pytest

from tests.commands import TINY, lsys

CATEGORIES = ("params", "gathered_params", "grads", "optimizer", "activations", "temporaries")


@pytest.mark.slow
def test_profile_writes_every_ranks_breakdown_and_a_picture(tmp_path):
    out = tmp_path / "profile"
    not_a_run_dir = tmp_path / "file"  # profile trains no run: its run directory is neither checked nor used
    not_a_run_dir.write_text("x")
    result = lsys("profile", "configs/demo.yaml", *TINY, "parallel.dp=1", "--nproc", "2", "--steps", "2",
                  "--out", str(out), f"train.run_dir={not_a_run_dir}")
    assert result.returncode == 0, result.stderr
    document = json.loads((out / "memory.json").read_text())
    assert [r["rank"] for r in document["ranks"]] == [0, 1]
    assert document["config"]["parallel"]["cp_ring"] == 2
    for rank in document["ranks"]:
        assert sum(rank[c] for c in CATEGORIES) == rank["peak_bytes"] > 0
        assert rank["activations_by_layer"] and rank["device"] == "cpu"
        assert len(rank["timeline"]["clock"]) == len(rank["timeline"]["activations"]) > 10
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gathered params" in result.stdout and "activations by layer" in result.stdout


@pytest.mark.slow
@pytest.mark.exhaustive  # the planner at this scale: tests/memory/test_analytic_and_search.py traces and searches
def test_plan_of_an_8b_model_at_1m_tokens_on_64_ranks(tmp_path):
    result = lsys("plan", "configs/gpu_8b_1m.yaml", "--out", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["world_size"] == 64
    traced, analytic = plan["traced"], plan["analytic"]
    assert sum(traced[c] for c in CATEGORIES) == traced["peak_bytes"]
    # Sharded over 64 ranks: fp32 parameters of 8.0B weights are 0.5 GB per rank, both estimates agree on it.
    assert traced["params"] == pytest.approx(analytic["params"], rel=0.01)
    assert 0.4e9 < traced["params"] < 0.6e9
    assert traced["peak_bytes"] > analytic["total"]  # the formula leaves out the temporaries
    assert "traced / analytic" in result.stdout and (tmp_path / "plan.png").exists()


def test_plan_search_prints_the_candidates(tmp_path):
    result = lsys("plan", "configs/demo.yaml", *TINY, "--world-size", "4", "--budget-gib", "0.01", "--top", "1",
                  "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "longest sequence within 0.01 GiB per rank" in result.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    best, chosen = plan["candidates"][0], plan["chosen"]
    assert best["confirmed"] and best["traced_peak_bytes"] <= 0.01 * 1024**3
    assert chosen["seq_len"] == best["traced_seq_len"] > 0 and chosen["cp_ring"] == best["cp_ring"]
    assert chosen["device_bytes_per_rank"] == best["traced_peak_bytes"] and chosen["confirmed"]
    # Off a terminal the progress is one line a trace on stderr: two for the one candidate, one to confirm.
    assert "lsys plan: trace 1/3: candidate 1/1" in result.stderr and "trace 3/3: confirming" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["plan", "configs/demo.yaml", "--world-size", "3"], "world size is 3"),
    (["plan", "configs/demo.yaml", *TINY, "--world-size", "4", "--budget-gib", "0.00001"], "no layout of 4 ranks"),
    (["plan", "configs/demo.yaml", "--budget-gib", "-1"], "--budget-gib=-1"),
    (["plan", "configs/demo.yaml", "data.task=text", "data.text.path=corpus"], "model.vocab_size=0"),
    (["plan", "configs/demo.yaml", "--world-size", "0"], "world size 0"),
    (["profile", "configs/demo.yaml", "--out", "OUT", "--steps", "0"], "--steps=0"),
    (["profile", "configs/demo.yaml", "--out", "OUT", "optim.offload=cpu"], "optim.offload=cpu"),
    (["profile", "configs/demo.yaml", "--out", "OUT", "--nproc", "2"], "world size is 2"),
    (["plan", "configs/demo.yaml", "--budget-gib", "1", "--host-budget-gib", "0"], "--host-budget-gib=0.0"),
    (["plan", "configs/demo.yaml", "--host-budget-gib", "64"], "together with --budget-gib"),
    (["plan", "configs/demo.yaml", "--budget-gib", "1", "--jobs", "0"], "--jobs=0"),
], ids=["world-vs-degrees", "impossible-budget", "negative-budget", "text-without-vocab", "no-ranks", "no-steps",
        "offload", "nproc-vs-degrees", "zero-host-budget", "host-budget-alone", "no-jobs"])
def test_bad_inputs_are_refused_before_anything_runs(args, message, tmp_path):
    out = tmp_path / "out"
    result = lsys(*[str(out) if arg == "OUT" else arg for arg in args], timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert not out.exists()
