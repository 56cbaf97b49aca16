"""README's "did the context help?" pictures (`python bench/context_demo.py`), on 2 CPU cores, nothing downloaded:

1. `demo`: the CPU demo's model (runs/demo; trained first with `lsys train configs/demo.yaml --nproc 4` when
   missing): a needle grid of 128 to 1,024 tokens (twice the trained length) x 5 depths over a 2-rank ring;
2. `extend`: the context-extension demo's models (runs/extend_demo; `bench/extend_demo.py` first when missing):
   the base model (trained at 128 tokens, its own RoPE) beside the one trained at 1,024 with YaRN x8;
3. `text`: a byte-level text model trained on this repository's own documentation at 128 tokens, then extended to
   512 with YaRN x4 for a few steps on a 2-rank ring (exported and loaded as a HuggingFace directory, as in the
   extension demo): loss by position at 512 tokens for both, overlaid, and their needle grids.

Each part runs `lsys eval ... --out runs/context_demo/PART`, copies its pictures to docs/images/ and records the
eval command's wall time in bench/results/context_demo.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.commands import ROOT, lsys  # noqa: E402
from bench.report import write_results  # noqa: E402

OUT = Path("runs/context_demo/eval")
IMAGES = ROOT / "docs/images"
LENGTHS = "128,256,512,1024"
RING = ["--nproc", "2", "parallel.dp=1", "parallel.cp_ring=2"]
TEXT = Path("runs/context_demo/text")
# A small byte-level model of the kind the demos train; its data and shape are set here, not in a config file.
TEXT_MODEL = ["model.hidden_size=128", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
              "data.task=text", f"data.text.path={TEXT / 'docs'}", "data.text.split=90,10,0",
              "train.weight_decay=0.0", "train.log_every=50", "train.eval_samples=32", "train.eval_every=0"]


def _timed(home: Path, *args: str) -> tuple[dict, float]:
    start = time.perf_counter()
    result = lsys(home, *args)
    return json.loads(result.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def _evaluate(home: Path, part: str, *args: str) -> dict:
    """`lsys eval ARGS --out runs/context_demo/PART`, its pictures copied as docs/images/PART_*.png."""
    shutil.rmtree(ROOT / OUT / part, ignore_errors=True)
    summary, seconds = _timed(home, "eval", *args, "--out", str(OUT / part))
    for name in summary["files"]:
        if name.endswith(".png"):
            shutil.copyfile(ROOT / name, IMAGES / f"{part}_{Path(name).name}")
    return {"command": "lsys eval " + " ".join([*args, "--out", str(OUT / part)]), "command_wall_s": seconds,
            "runs": summary["runs"], "files": summary["files"]}


def demo(home: Path) -> dict:
    if not (ROOT / "runs/demo/checkpoints").is_dir():
        lsys(home, "train", "configs/demo.yaml", "--nproc", "4")
    return _evaluate(home, "demo", "runs/demo", *RING, "--lengths", LENGTHS)


def extend(home: Path) -> dict:
    if not (ROOT / "runs/extend_demo/extended/checkpoints").is_dir():
        subprocess.run([sys.executable, "bench/extend_demo.py", "--output", str(ROOT / OUT / "extend_demo.json")],
                       cwd=ROOT, check=True)
    return _evaluate(home, "extend", "runs/extend_demo/base", "runs/extend_demo/extended", *RING,
                     "--lengths", LENGTHS)


def _write_corpus(path: Path, chunk: int = 4096) -> None:
    """This repository's Markdown, one document per `chunk` characters, as JSON lines."""
    texts = [p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
                                      ROOT / "bench/README.md"]]
    lines = [json.dumps({"text": t[i:i + chunk]}) for t in texts for i in range(0, len(t), chunk)]
    path.write_text("\n".join(lines) + "\n")


def text(home: Path) -> dict:
    shutil.rmtree(ROOT / TEXT, ignore_errors=True)
    (ROOT / TEXT).mkdir(parents=True)
    _write_corpus(ROOT / TEXT / "docs.jsonl")
    lsys(home, "prepare-data", str(TEXT / "docs.jsonl"), str(TEXT / "docs"))
    start = time.perf_counter()
    lsys(home, "train", "configs/demo.yaml", *TEXT_MODEL, "parallel.dp=1", "parallel.cp_ring=1", "data.seq_len=128",
         "data.curriculum.start_len=0", "train.steps=300", "train.global_batch_size=16", "train.warmup_steps=30",
         f"train.run_dir={TEXT / 'base'}")
    base_s = time.perf_counter() - start
    lsys(home, "export", str(TEXT / "base"), str(TEXT / "base-hf"))
    start = time.perf_counter()
    lsys(home, "train", "configs/demo.yaml", *TEXT_MODEL, *RING, f"model.pretrained={TEXT / 'base-hf'}",
         "model.rope_scaling.rope_type=yarn", "model.rope_scaling.factor=4.0",
         "model.rope_scaling.original_max_position_embeddings=128", "data.seq_len=512",
         "data.curriculum.start_len=0", "train.steps=40", "train.global_batch_size=8", "train.lr=1.0e-3",
         "train.min_lr=1.0e-4", "train.warmup_steps=5", f"train.run_dir={TEXT / 'extended'}")
    extended_s = time.perf_counter() - start
    evaluated = _evaluate(home, "text", str(TEXT / "base"), str(TEXT / "extended"), *RING, "data.seq_len=512",
                          "--lengths", "128,256,512", "--depths", "0,0.5,1", "--buckets", "16")
    return {**evaluated, "train_wall_s": {"base at 128": base_s, "extended to 512": extended_s}}


PARTS = {"demo": demo, "extend": extend, "text": text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", default=list(PARTS), choices=list(PARTS), help="which pictures")
    parser.add_argument("--output", type=Path, default=ROOT / "bench/results/context_demo.json")
    args = parser.parse_args()
    results = json.loads(args.output.read_text()) if args.output.exists() else {}
    with tempfile.TemporaryDirectory() as home:  # no Ray cluster is started; LSYS_HOME stays out of the repo
        for part in args.parts:
            results[part] = PARTS[part](Path(home))
            print(json.dumps({part: results[part]}, indent=1))
    write_results(results, args.output)


if __name__ == "__main__":
    main()
