"""Training on local ranks without Ray, DeepSpeed or megatron-core installed, and the refusal of a run that
needs one: a subprocess in which importing them fails, as on a machine where they are not installed."""

from __future__ import annotations

import json
import subprocess
import sys

from lsys.packages import REQUIREMENTS
from tests.commands import ROOT, TINY

# Run first in the subprocess: every import of the three packages (or of a submodule) fails as if not installed.
BLOCK = """
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "deepspeed", "megatron"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Missing())
"""

SCRIPT = BLOCK + """
import contextlib, io, json, sys
import kernels, parallel, lsys.memory, lsys.trainer
from launch.cli import main
from lsys.config import config_from_dict
from tests.lsys.harness import tiny_config

run_dir, tiny = sys.argv[1], sys.argv[2:]
losses = lsys.trainer.train(config_from_dict(tiny_config(run_dir + "/direct", "train.steps=1")))["losses"]
codes, errors = {}, {}
commands = {
    "train": ["train", "configs/demo.yaml", *tiny, f"train.run_dir={run_dir}/cli"],
    "text": ["train", "configs/demo.yaml", *tiny, "data.task=text", f"data.text.path={run_dir}/none",
             f"train.run_dir={run_dir}/text"],
    "submit": ["submit", "configs/demo.yaml", *tiny],
    "prepare": ["prepare-data", f"{run_dir}/in.txt", f"{run_dir}/out"],
}
for name, argv in commands.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        codes[name] = main(argv)
    errors[name] = err.getvalue()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "deepspeed", "megatron"))
print(json.dumps({"losses": losses, "codes": codes, "errors": errors, "loaded": loaded}))
"""


def test_local_training_needs_none_of_them_and_a_run_that_does_is_refused(tmp_path):
    (tmp_path / "in.txt").write_text("a document\n")
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), *TINY, "train.steps=1",
                             "parallel.dp=1", "parallel.cp_ring=1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["loaded"] == []
    assert len(found["losses"]) == 1
    assert found["codes"]["train"] == 0, found["errors"]["train"]
    assert (tmp_path / "cli" / "metrics.jsonl").exists()
    refusals = {
        "text": "data.task=text: reading a tokenized text dataset needs megatron-core, which is not installed; "
                "pip install 'megatron-core==0.16.1'",
        "submit": "lsys submit: submitting a job needs ray, which is not installed; "
                  "pip install 'ray[default,train]==2.60.0'",
        "prepare": "lsys prepare-data: writing an indexed dataset needs megatron-core",
    }
    for name, message in refusals.items():
        assert found["codes"][name] == 2, found["errors"][name]
        lines = found["errors"][name].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lsys: invalid input: ") and message in lines[0], lines
    assert not (tmp_path / "text").exists() and not (tmp_path / "out.bin").exists()


def test_offload_names_both_of_its_packages(monkeypatch):
    from lsys.config import load_config
    from lsys.packages import require_for_run

    cfg = load_config("configs/demo.yaml", ["optim.offload=cpu"])
    monkeypatch.setattr("lsys.packages.installed", lambda module: module != "deepspeed")
    try:
        require_for_run(cfg)
    except ValueError as exc:
        assert str(exc) == ("optim.offload=cpu: the offloaded optimizer's CPU Adam needs deepspeed, which is not "
                            "installed; pip install 'deepspeed==0.19.8'")
    else:
        raise AssertionError("optim.offload=cpu without deepspeed was not refused")


def test_requirements_are_pyprojects_pins():
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+; lsys supports 3.10)
    for requirement in REQUIREMENTS.values():
        assert f'"{requirement}",' in pyproject, requirement
