"""The metrics log survives what an interrupted run leaves in it: a resume drops a partial last line (and says
so), keeps a byte-exact copy of a file with an unreadable line before the last, and still drops the steps it
will train again."""

from __future__ import annotations

import json

import pytest
import torch

from lsys.metrics import MetricsWriter, PeakMemory, read_metrics


def _lines(*steps: int) -> str:
    return "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)


def _resume(path, resumed_from: int, *new_steps: int) -> None:
    writer = MetricsWriter(path, resumed_from=resumed_from)
    for step in new_steps:
        writer.write({"step": step, "loss": 0.5})
    writer.close()


def _steps(path) -> list[int]:
    return [r["step"] for r in read_metrics(path)]


def test_resume_keeps_steps_up_to_the_checkpoint_and_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_lines(10, 20, 30) + json.dumps({"step": 20, "split": "valid"}) + "\n")
    _resume(path, 20, 30, 40)
    assert _steps(path) == [10, 20, 20, 30, 40]
    assert list(tmp_path.iterdir()) == [path]  # nothing set aside, no temporary left


@pytest.mark.parametrize("tail", [b'{"step": 30, "lo', b"\x00" * 37, b'{"step": 30}garbage\n'])
def test_partial_last_line_is_dropped_and_said(tmp_path, capsys, tail):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(_lines(10, 20).encode() + tail)
    assert _steps(path) == [10, 20]  # a reader skips it too
    _resume(path, 20, 30)
    assert capsys.readouterr().err == (f"lsys: metrics.jsonl: dropped a partial last line ({len(tail.strip())} bytes) "
                                       "left by an interrupted run\n")
    assert path.read_text().startswith(_lines(10, 20))  # the kept lines as they were written
    assert _steps(path) == [10, 20, 30]
    assert list(tmp_path.iterdir()) == [path]


def test_last_line_without_newline_is_kept(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_lines(10, 20).rstrip("\n"))
    assert _steps(path) == [10, 20]
    _resume(path, 20, 30)
    assert capsys.readouterr().err == ""
    assert _steps(path) == [10, 20, 30]


def test_unreadable_middle_line_is_kept_aside_and_the_run_goes_on(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    original = (_lines(10) + "not json\n" + _lines(20) + "[1, 2]\n" + _lines(30)).encode()
    path.write_bytes(original)
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON record; repair or delete that line"):
        read_metrics(path)
    _resume(path, 20, 30)
    aside = [p for p in tmp_path.iterdir() if p != path]
    assert len(aside) == 1 and aside[0].name.startswith("metrics.jsonl.bad-")
    assert aside[0].read_bytes() == original
    err = capsys.readouterr().err
    assert err == (f"lsys: {path}: line 2 (and 1 more) is not a JSON record; the file as it was is kept in "
                   f"{aside[0]}, and the run goes on with its 3 readable records\n")
    assert _steps(path) == [10, 20, 30]


def test_empty_or_missing_file(tmp_path, capsys):
    empty = tmp_path / "metrics.jsonl"
    empty.write_text("")
    assert read_metrics(empty) == []
    _resume(empty, 0, 1)
    assert _steps(empty) == [1]
    fresh = tmp_path / "new" / "metrics.jsonl"
    _resume(fresh, 0, 1)
    assert _steps(fresh) == [1]
    assert capsys.readouterr().err == ""


def test_cuda_peak_is_the_steps_own_and_the_runs_is_the_largest(monkeypatch):
    """The CUDA allocator's peak, faked: it only grows until reset_peak_memory_stats."""
    allocator = {"peak": 0, "resets": 0}

    def allocate(peak):
        allocator["peak"] = max(allocator["peak"], peak)

    def reset(device):
        assert device == torch.device("cuda", 1)
        allocator.update(peak=0, resets=allocator["resets"] + 1)

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: allocator["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    peaks = PeakMemory(torch.device("cuda", 1))
    allocate(500)  # building the model, before the first step
    steps = []
    for step_peak in (300, 700, 200):
        peaks.start_step()
        allocate(step_peak)
        steps.append(peaks.in_step())
    assert steps == [300, 700, 200] and allocator["resets"] == 3
    assert peaks.over_run() == 700


def test_cpu_peak_cannot_be_reset(monkeypatch):
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: pytest.fail("reset on CPU"))
    peaks = PeakMemory(torch.device("cpu"))
    peaks.start_step()
    assert 0 < peaks.in_step() == peaks.over_run()
