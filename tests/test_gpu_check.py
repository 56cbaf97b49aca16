"""bench/gpu_check.py in its CPU mode, so the one-shot GPU check cannot rot between GPU runs: every section runs
on tiny shapes and the parity checks fail when a kernel is wrong."""

from __future__ import annotations

import json
from unittest import mock

from bench import gpu_check
from kernels.torch_attention import TORCH_KERNELS


def _run(tmp_path, sections: str) -> tuple[int, dict]:
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--cpu", "--quick", "--sections", sections, "--out", str(out)])
    return code, json.loads(out.read_text())


def test_cpu_quick_passes_every_section(tmp_path):
    code, results = _run(tmp_path, ",".join(gpu_check.SECTIONS))
    assert code == 0 and results["failed"] == []
    cases = {(r["backend"], r["dtype"], r["seq"], r["head_dim"], r["causal"]) for r in results["parity"]}
    assert len(cases) == 16 and all(r["ok"] for r in results["parity"])  # aten: 2 dtypes x 2 S x 2 D x causal
    assert {r["dtype"] for r in results["ring"]} == {"bfloat16", "float32"} and all(r["ok"] for r in results["ring"])
    assert {r["kernel"] for r in results["speed"]} == {"lsys aten", "sdpa cpu"}
    assert all(r["forward_backward_tflops"] > 0 for r in results["speed"])
    assert results["quant"]["torch_quantize_gb_s"] > 0 and results["quant"]["bit_equal"] is None
    assert results["environment"]["device"] == "cpu"
    assert [r["setting"] for r in results["train"]] == ["none", "selective+int8", "full"]
    assert all(r["losses_finite"] and r["peak_planned_bytes"] > 0 for r in results["train"])


def test_a_wrong_kernel_fails_the_check(tmp_path):
    aten = TORCH_KERNELS["aten"]

    def off_by_a_bit(q, k, v, causal, scale):
        out, lse = aten.forward(q, k, v, causal, scale)
        return out * 1.03, lse  # 3% off: above the bf16 tolerance too

    broken = mock.patch.dict(TORCH_KERNELS, {"aten": aten.__class__(**{**aten.__dict__, "forward": off_by_a_bit})})
    with broken:
        code, results = _run(tmp_path, "parity,ring")
    assert code == 1
    assert not any(r["ok"] for r in results["parity"] + results["ring"])
    assert results["failed"][0].startswith("parity aten")


def test_unknown_section_is_refused(tmp_path, capsys):
    assert gpu_check.main(["--cpu", "--sections", "parity,speedy", "--out", str(tmp_path / "x.json")]) == 2
    assert "lsys: invalid input: --sections speedy" in capsys.readouterr().err


