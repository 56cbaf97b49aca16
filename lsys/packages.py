"""The packages only some runs need, and the refusal when one is missing.

Training on local ranks (`lsys train`, `lsys eval`, `lsys profile`, the trainer, kernels, parallel, lsys.memory)
needs none of them: each is imported only where it is used. Ray runs jobs (`lsys submit`, `lsys cluster`) and
holds the offloaded optimizer state (optim.offload=cpu), whose Adam is DeepSpeed's CPU Adam; megatron-core reads
and writes tokenized text datasets (data.task=text, `lsys prepare-data`). The CLI asks here before anything
starts, so a missing one is one invalid-input line naming the setting and the install that fixes it, not an
ImportError in a rank after the others have started.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lsys.config import LsysConfig

# import name -> the requirement to install: pyproject.toml's pins (tests/test_optional_packages.py keeps them equal).
REQUIREMENTS = {
    "ray": "ray[default,train]==2.60.0",
    "deepspeed": "deepspeed==0.19.8",
    "megatron.core": "megatron-core==0.16.1",
}


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (Ray and megatron-core take seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or one whose import fails
        return False


def require(module: str, setting: str, needs: str) -> None:
    """ValueError `SETTING: NEEDS needs PACKAGE, which is not installed; pip install 'REQUIREMENT'` unless
    `module` is importable."""
    if not installed(module):
        requirement = REQUIREMENTS[module]
        package = requirement.split("==")[0].split("[")[0]
        raise ValueError(f"{setting}: {needs} needs {package}, which is not installed; pip install '{requirement}'")


def require_for_run(cfg: LsysConfig) -> None:
    """The optional packages a run of `cfg` needs on this machine (its ranks run here)."""
    if cfg.data.task == "text":
        require("megatron.core", "data.task=text", "reading a tokenized text dataset")
    if cfg.optim.offload != "none":
        setting = f"optim.offload={cfg.optim.offload}"
        require("ray", setting, "holding the optimizer state in Ray actors")
        require("deepspeed", setting, "the offloaded optimizer's CPU Adam")
