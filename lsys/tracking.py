"""A run in TensorBoard (and Weights & Biases when asked), written by rank 0 beside metrics.jsonl.

Every logged step's scalars go to `train.run_dir/tensorboard` under "train/" (loss, lr, grad norm, sequence
length, step time, tokens/s), the busiest rank's and each rank's peak memory under "memory/", held-out metrics
under "eval/", and pictures (e.g. a needle heatmap) as images. TensorBoard's writer queues events and writes them
from its own thread, so a step never waits on the disk; W&B's offline mode writes a local `wandb/` directory from
its own service process. A resumed run purges the events after its resume step, as metrics.jsonl drops those
records: every step appears once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lsys.config import LoggingConfig

TRAIN_KEYS = ("loss", "lr", "grad_norm", "seq_len", "step_time_s", "tokens_per_s")


class RunTracking:
    """Rank 0's TensorBoard writer and W&B run for one training run (each only if configured)."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, resumed_from: int, config: dict[str, Any]):
        self.tensorboard = self.wandb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Steps after the resume step are trained again: their old events go (TensorBoard drops >= purge_step).
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"),
                                             purge_step=resumed_from + 1 if resumed_from else None)
        if cfg.wandb:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, mode=cfg.wandb_mode, dir=str(run_dir),
                                    name=run_dir.name, config=config, resume="allow")

    def step(self, record: dict[str, Any]) -> None:
        """One logged training step (a metrics.jsonl record: "step", the TRAIN_KEYS, "peak_memory_bytes")."""
        step = record["step"]
        scalars = {f"train/{key}": record[key] for key in TRAIN_KEYS if _number(record.get(key))}
        peaks = record.get("peak_memory_bytes") or []
        if peaks:
            scalars["memory/peak_bytes_max"] = max(peaks)
            scalars |= {f"memory/peak_bytes_rank{rank}": peak for rank, peak in enumerate(peaks)}
        self._scalars(scalars, step)

    def evaluation(self, result: dict[str, Any]) -> None:
        """A held-out evaluation ({"step", "split", metric: value, ...})."""
        self._scalars({f"eval/{key}": value for key, value in result.items()
                       if key not in ("step", "split") and _number(value)}, result["step"])

    def image(self, tag: str, png: Path, step: int) -> None:
        """A picture the run made (e.g. the needle heatmap), shown with the step it belongs to."""
        if self.tensorboard is not None:
            import matplotlib.image

            pixels = matplotlib.image.imread(str(png))  # [H, W, C] floats in [0, 1]
            self.tensorboard.add_image(tag, pixels[..., :3], step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(str(png))}, step=step)

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None and scalars:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
