"""bench/gpu_smoke.py's CPU quick mode, the path the GPU check takes, in a subprocess where the packages a
single-device run does not need cannot be imported (as on a GPU machine that has only torch, triton, numpy, rich,
matplotlib, safetensors and omegaconf)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.commands import ROOT

# Every import of these (or of a submodule) fails as if not installed; then the quick smoke runs.
SCRIPT = """
import importlib.abc, json, sys
from pathlib import Path
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "deepspeed", "megatron", "psutil", "tensorboard", "wandb", "tokenizers"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Missing())
from bench.gpu_smoke import smoke_table, train_smoke
rows = train_smoke("cpu", True, Path(sys.argv[1]))
smoke_table(rows)
print(json.dumps(rows))
"""


def test_quick_smoke_trains_every_setting_and_measures_what_was_planned(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r["setting"] for r in rows] == ["none", "selective+int8", "full"]
    for r in rows:
        assert r["device"] == "cpu" and r["steps"] == 3 and r["seq_len"] == 256
        assert r["losses_finite"] and all(math.isfinite(x) for x in r["losses"]), r["losses"]
        assert r["mfu"] is None and r["peak_flops"] is None and r["mfu_note"]
        assert r["step_time_s"] > 0 and r["tokens_per_s"] > 0
        assert r["peak_measured_bytes"] > 0 and r["peak_planned_bytes"] > 0
        # Measured by the planner's tracker over real tensors on CPU: 1.00 in every setting when written.
        assert 0.3 < r["peak_ratio"] < 3, r
        assert (tmp_path / r["run_dir"].rsplit("/", 1)[-1] / "smoke.json").exists()
    # The same seed and data: every setting starts from the same loss.
    assert len({r["losses"][0] for r in rows}) == 1
