"""The `lsys` command line. The only place (with launch/local.py) that reads argv or the environment."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console

from launch import eval_cli, exits, memory_cli, preflight, ray_cli

if TYPE_CHECKING:
    from lsys.config import LsysConfig

CONFIG_HELP = (
    "CONFIG is a YAML file (see configs/); each OVERRIDE is key=value with a dotted key, e.g. "
    "train.steps=200 data.seq_len=1024 parallel.cp_ring=2. Unknown keys and bad values are rejected "
    "before any rank starts."
)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train in the foreground on local ranks (gloo on CPU, NCCL on GPU)",
        description="Train a model on N local ranks. " + CONFIG_HELP,
    )
    _add_rank_arguments(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(handler=_train)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a run, a HuggingFace model or a config's run on local ranks without training",
        description="Evaluate on N local ranks without training. TARGET is a run directory (its config.yaml and "
                    "newest usable checkpoint), a HuggingFace model directory (config.json and safetensors; give "
                    "the data.* keys of the task to evaluate it on), or a config file (the newest usable checkpoint "
                    "of its train.run_dir, else the weights of model.pretrained). Any length and layout: e.g. a "
                    "model trained at 4K evaluated at 32K over ring ranks. Without --out: print the task's held-out "
                    "metric as one JSON line and write nothing. With --out DIR: a needle-in-a-haystack grid, loss "
                    "by position and recall by pairs, as JSON, pictures and a table; several TARGETs (before and "
                    "after context extension) share the pictures. " + CONFIG_HELP,
    )
    _add_rank_arguments(p, target="TARGET", target_help="a run directory, a HuggingFace model directory or a YAML "
                        "config file; with --out, more TARGETs may follow")
    eval_cli.add_grid_arguments(p)
    p.set_defaults(handler=_eval)


def _add_rank_arguments(p: argparse.ArgumentParser, target: str = "CONFIG",
                        target_help: str = "YAML config file, e.g. configs/demo.yaml") -> None:
    p.add_argument("config", metavar=target, help=target_help)
    p.add_argument("overrides", metavar="OVERRIDE", nargs="*", help="key=value config overrides")
    p.add_argument("--nproc", type=int, default=1,
                   help="number of local ranks to start (default 1). Under torchrun or another launcher that "
                        "sets WORLD_SIZE, leave it at 1: this process is then one rank of that job")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="kill all ranks if the run takes longer than this (default: no limit)")


def _add_prepare_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare-data",
        help="tokenize text into a Megatron indexed dataset (.bin/.idx) for data.task=text",
        description="Tokenize plain text (.txt: documents separated by blank lines) or JSON lines (.jsonl: one "
                    "document per line in its 'text' field) into OUT.bin / OUT.idx with megatron-core's builder, "
                    "plus OUT.json with the tokenizer and byte counts. Train on it with "
                    "data.task=text data.text.path=OUT.",
    )
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="one or more .txt or .jsonl files")
    p.add_argument("output", metavar="OUT", help="output prefix (writes OUT.bin, OUT.idx, OUT.json)")
    p.add_argument("--tokenizer", metavar="TOKENIZER_JSON", default=None,
                   help="a local HuggingFace tokenizer.json (default: byte-level, 256 bytes + end-of-document)")
    p.add_argument("--pretrained", metavar="MODEL_DIR", default=None,
                   help="a local HuggingFace model directory (model.pretrained): without --tokenizer, its "
                        "tokenizer.json, documents ending with its config.json's eos_token_id")
    p.add_argument("--no-eod", action="store_true", help="do not append an end-of-document token to each document")
    p.set_defaults(handler=_prepare_data)


def _add_export(sub: argparse._SubParsersAction) -> None:
    from lsys.hf.config import DEFAULT_MAX_SHARD_SIZE, EXPORT_DTYPES

    p = sub.add_parser(
        "export",
        help="write a run's checkpoint as a HuggingFace model directory (transformers' from_pretrained)",
        description="Write a run's checkpoint (the newest that verifies, or --step N) as a HuggingFace model "
                    "directory: config.json, model-*.safetensors with their index, generation_config.json and the "
                    "tokenizer files of model.pretrained (or of a text run's dataset). Any layout's checkpoint; "
                    "one output file's tensors in memory at a time.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the train.run_dir of a run with checkpoints")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the directory to create (must not exist, or be empty)")
    p.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the newest verified)")
    p.add_argument("--dtype", default=None, metavar="|".join(EXPORT_DTYPES),
                   help="the weights' dtype (default: the pretrained config's, else train.param_dtype)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, metavar="SIZE",
                   help=f"largest safetensors file, e.g. 500MB or 2GiB (default {DEFAULT_MAX_SHARD_SIZE})")
    p.set_defaults(handler=_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lsys",
        description="lsys: distributed long-sequence training for transformers (context parallelism, "
                    "memory savers, Ray jobs, memory profiling and planning).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of the commands below; `lsys COMMAND --help` lists its options")
    _add_train(sub)
    _add_eval(sub)
    ray_cli.add_commands(sub, CONFIG_HELP)
    memory_cli.add_commands(sub, CONFIG_HELP)
    _add_prepare_data(sub)
    _add_export(sub)
    return parser


def _config_for_ranks(args: argparse.Namespace) -> tuple[LsysConfig, int, bool]:
    """`lsys train` / `lsys eval`'s config, world size, and whether another launcher started this process;
    ValueError for any bad input."""
    from lsys.config import load_config
    from lsys.validation import validate_for_world

    launched_elsewhere = "WORLD_SIZE" in os.environ
    cfg = load_config(args.config, args.overrides)
    if args.nproc < 1:
        raise ValueError(f"--nproc={args.nproc}: start at least one rank")
    if launched_elsewhere and args.nproc != 1:
        raise ValueError(f"--nproc={args.nproc} but WORLD_SIZE is already set by a launcher; drop --nproc")
    world = int(os.environ["WORLD_SIZE"]) if launched_elsewhere else args.nproc
    validate_for_world(cfg, world)
    if cfg.optim.offload != "none":
        raise ValueError(f"optim.offload={cfg.optim.offload}: the optimizer state lives in Ray actors; run it "
                         "with `lsys submit` (or set optim.offload=none)")
    if args.timeout is not None and not 0 < args.timeout < float("inf"):
        raise ValueError(f"--timeout={args.timeout}: give a positive number of seconds")
    return cfg, world, launched_elsewhere


def _run_ranks(args: argparse.Namespace, console: Console, cfg: LsysConfig, launched_elsewhere: bool,
               entry: Callable[[LsysConfig], Any], entry_from_dict: Callable[[dict], Any]) -> tuple[int, Any]:
    """Run `entry` in this process (one rank, or one rank of another launcher's job) or on --nproc local ranks;
    -> (exit code, rank 0's result)."""
    from launch.local import RankFailedError, cuda_allocator_environment, spawn
    from lsys.config import to_dict

    if launched_elsewhere or args.nproc == 1:
        # Before this process's first CUDA allocation, which is when the allocator reads it.
        os.environ.update(cuda_allocator_environment(os.environ))
        return 0, entry(cfg)
    try:
        return 0, spawn(entry_from_dict, args.nproc, (to_dict(cfg),), timeout_s=args.timeout)[0]
    except RankFailedError as exc:
        console.print(f"[bold red]lsys: rank {exc.rank} failed; all ranks stopped.[/]")
        print(exc.detail, file=sys.stderr, end="")
        return 1, None
    except TimeoutError:
        console.print(f"[bold red]lsys: --timeout {args.timeout:g} s expired; all ranks stopped.[/] The next run "
                      f"in {cfg.train.run_dir} resumes from its newest checkpoint", highlight=False)
        return exits.TIMEOUT, None


def _train(args: argparse.Namespace, console: Console) -> int:
    from lsys.config import save_config, to_yaml
    from lsys.trainer import train, train_from_dict

    try:
        cfg, world, launched_elsewhere = _config_for_ranks(args)
    except ValueError as exc:
        return exits.invalid_input(console, exc)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    try:
        preflight.check_run(cfg, world, local_ranks=1 if launched_elsewhere else args.nproc)
    except ValueError as exc:
        return exits.invalid_input(console, exc)
    save_config(cfg, cfg.train.run_dir)
    code, summary = _run_ranks(args, console, cfg, launched_elsewhere, train, train_from_dict)
    if code:
        return code
    if summary is not None and summary.get("stopped"):
        return exits.NONFINITE  # rank 0 has said why
    if summary is not None and int(os.environ.get("RANK", "0")) == 0:
        for record in summary["evals"][-1:]:
            console.print("final eval: " + json.dumps(record))
    return 0


def _eval(args: argparse.Namespace, console: Console) -> int:
    from lsys.trainer import evaluate, evaluate_from_dict

    targets = [args.config, *(item for item in args.overrides if "=" not in item)]
    overrides = [item for item in args.overrides if "=" in item]
    try:
        if len(targets) > 1 and not args.out:
            raise ValueError(f"{targets[1]}: several TARGETs are compared in the pictures of --out; add --out DIR, "
                             "or give one TARGET")
        runs = []
        for target in targets:
            config, implied = eval_cli.resolve_target(target)
            cfg, world, launched_elsewhere = _config_for_ranks(
                argparse.Namespace(**{**vars(args), "config": config, "overrides": [*implied, *overrides]}))
            preflight.check_evaluation(cfg, world, local_ranks=1 if launched_elsewhere else args.nproc)
            runs.append((target, cfg, launched_elsewhere, eval_cli.grid_from_args(args, cfg) if args.out else None))
        if args.out:
            preflight.check_output_dir(args.out, "--out")
    except ValueError as exc:
        return exits.invalid_input(console, exc)
    if not args.out:
        _, cfg, launched_elsewhere, _ = runs[0]
        code, result = _run_ranks(args, console, cfg, launched_elsewhere, evaluate, evaluate_from_dict)
        if not code and result is not None and int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return code
    return _eval_grid(args, console, runs)


def _eval_grid(args: argparse.Namespace, console: Console, runs: list[tuple[str, LsysConfig, bool, dict]]) -> int:
    """`lsys eval --out`: each TARGET's grid on the ranks in turn, then the reports of all of them."""
    from functools import partial
    from pathlib import Path

    from lsys.context_eval import run_grid, run_grid_from_dict
    from lsys.context_report import summary_table, write_reports

    results = []
    for target, cfg, launched_elsewhere, grid in runs:
        console.print(f"lsys: evaluating {target}", highlight=False)
        code, result = _run_ranks(args, console, cfg, launched_elsewhere, partial(run_grid, grid=grid),
                                  partial(run_grid_from_dict, grid=grid))
        if code:
            return code
        results.append({"name": target, **result})
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    written = write_reports(results, Path(args.out))
    _pictures_to_tensorboard(written, Path(args.out), max(r["step"] for r in results))
    console.print(summary_table(results))
    print(json.dumps({"out": args.out, "files": [str(p) for p in written],
                      "runs": [{"name": r["name"], "step": r["step"], "eval_wall_s": round(r["eval_wall_s"], 2)}
                               for r in results]}))
    return 0


def _pictures_to_tensorboard(written: list, out: Any, step: int) -> None:
    """The grid's pictures in OUT/tensorboard too, as images at the evaluated step (`tensorboard --logdir`)."""
    from lsys.config import LoggingConfig
    from lsys.tracking import RunTracking

    tracking = RunTracking(LoggingConfig(), out, 0, {})
    for path in written:
        if path.suffix == ".png":
            tracking.image(f"eval/{path.stem}", path, step)
    tracking.close()


def _prepare_data(args: argparse.Namespace, console: Console) -> int:
    from lsys.data import prepare_text_dataset
    from lsys.packages import require

    try:
        require("megatron.core", "lsys prepare-data", "writing an indexed dataset")
        stats = prepare_text_dataset(args.inputs, args.output, tokenizer=args.tokenizer, append_eod=not args.no_eod,
                                     pretrained=args.pretrained)
    except (ValueError, FileNotFoundError) as exc:
        return exits.invalid_input(console, exc)
    console.print(json.dumps(stats, indent=2))
    return 0


def _export(args: argparse.Namespace, console: Console) -> int:
    from lsys.hf.export import plan_export, write_export

    try:
        plan = plan_export(args.run_dir, args.out_dir, step=args.step, dtype=args.dtype,
                           max_shard_size=args.max_shard_size)
    except ValueError as exc:
        return exits.invalid_input(console, exc)
    console.print(json.dumps(write_export(plan), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options (`lsys train cfg.yaml --nproc 2 train.steps=5`); argparse alone would
    # only take them before the first option.
    args, extra = parser.parse_known_args(argv)
    late_overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in late_overrides]
    if unknown or (late_overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or late_overrides)}")
    if late_overrides:
        args.overrides = [*args.overrides, *late_overrides]
    console = Console(stderr=True, soft_wrap=True)  # errors stay one greppable line
    return args.handler(args, console)


if __name__ == "__main__":
    sys.exit(main())
