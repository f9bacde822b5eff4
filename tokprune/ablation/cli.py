"""``tokprune run [CONFIG.yaml] [key=value ...] [--quiet]``: run or resume an ablation study."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

import torch

from ..errors import TokpruneError

USAGE_EXAMPLES = """\
examples:
  tokprune run                                      the default comparison on the embedded model
  tokprune run configs/sweep_fastv.yaml             a sweep from a file
  tokprune run --config configs/video.yaml          the same with the file named (here: the video study)
  tokprune run "strategies=[topk, fastv]" limit=40  dotlist overrides (specs may contain commas)
  tokprune run strategies="fastv(layer=[2,3], keep_ratio=[0.25,0.5])" output_dir=runs/fastv
  torchrun --standalone --nproc_per_node 2 -m tokprune run limit=100   data-parallel

Rerunning the same command skips the runs already in OUTPUT_DIR/results.jsonl. Config keys: see
docs/ablation.md or configs/default.yaml.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokprune run",
        description="Evaluate pruning pipelines on a benchmark; write results.jsonl, summary.md/.csv, tests.csv and curves.png.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("args", nargs="*", metavar="CONFIG|KEY=VALUE",
                        help="an optional YAML config file (first), then omegaconf dotlist overrides")
    parser.add_argument("--config", metavar="CONFIG", default=None, help="the YAML config file (or give it first)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or per-run lines (CI)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def _split_args(args: list[str]) -> tuple[str | None, list[str]]:
    config = None
    if args and "=" not in args[0]:
        config = args[0]
        args = args[1:]
    stray = [a for a in args if "=" not in a]
    if stray:
        from .config import ConfigError

        raise ConfigError(f"expected key=value overrides after the config file, got {stray}")
    return config, args


class OutOfMemory(TokpruneError, MemoryError):
    """The model or a batch did not fit in memory."""


#: Set by :func:`_terminate`: a library may turn the KeyboardInterrupt raised inside it into its own error
#: (omegaconf does), and an interrupted run must still exit 130 with the resume hint, not as a crash.
_TERMINATED: list[int] = []


def _terminate(signum: int, frame: Any) -> None:
    # SIGTERM unwinds like Ctrl-C: finished runs are already on disk; the run in progress is dropped.
    _TERMINATED.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def _passive_openmp(argv: list[str]) -> None:
    """Make sure OpenMP threads sleep instead of spinning while they wait.

    libgomp reads ``OMP_WAIT_POLICY`` once, when torch loads, and torch is loaded before this command
    parses its arguments. With spinning threads on a small shared CPU, small matmuls stall: the default
    job ran about 10x slower here. So, when started from the shell without the variable, re-exec once
    with ``OMP_WAIT_POLICY=PASSIVE`` (torchrun workers and explicit settings are left alone).
    """
    if "OMP_WAIT_POLICY" in os.environ or "WORLD_SIZE" in os.environ:
        return
    if "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return
    shell = [a for a in sys.argv[1:] if a != "--debug"]  # `tokprune --debug run ...` is from the shell too
    from_shell = shell[:1] == ["run"] and shell[1:] == argv
    if from_shell and getattr(sys, "orig_argv", None):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _passive_openmp(argv)
    args = build_parser().parse_intermixed_args(argv)
    from .config import load_config, to_yaml

    config_path, overrides = _split_args(args.args)
    if args.config is not None:
        if config_path is not None:
            from .config import ConfigError

            raise ConfigError(f"two config files: --config {args.config} and {config_path}; give one")
        config_path = args.config
    cfg = load_config(config_path, overrides)
    if args.print_config:
        from .plan import plan_runs

        plan_runs(cfg)  # every spec is checked: what is printed must be a config that runs
        print(to_yaml(cfg), end="")
        return 0
    from .report import markdown_table
    from .runner import run_ablation

    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # Per call, not per process: main() also runs in-process (tests, notebooks), where a SIGTERM seen by an
    # earlier call must not turn a later call's error into "interrupted", nor our handler outlive the call.
    _TERMINATED.clear()
    previous = signal.signal(signal.SIGTERM, _terminate)
    t0 = time.perf_counter()
    try:
        outcome = run_ablation(cfg, progress=not args.quiet, echo=None if args.quiet else print)
    except (MemoryError, torch.OutOfMemoryError) as exc:
        raise OutOfMemory(
            f"out of memory ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'}); "
            f"lower batch_size (now {cfg.batch_size}) or limit, or use dtype=bfloat16 on a GPU; finished runs are "
            f"in {cfg.output_dir}/results.jsonl"
        ) from None
    except Exception:
        if not _TERMINATED:
            raise
        outcome = None
    except KeyboardInterrupt:
        outcome = None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if outcome is None:
        print(f"interrupted; finished runs are in {cfg.output_dir}/results.jsonl, rerun the command to resume",
              file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(markdown_table(outcome.rows), end="")
    wall = time.perf_counter() - t0
    files = ", ".join(str(p) for p in outcome.files.values())
    reused = f", {outcome.reused} reusing an earlier target's run" if outcome.reused else ""
    print(f"{len(outcome.rows)} runs ({outcome.skipped} already recorded{reused}) in {wall:.1f} s; wrote {files}")
    return 0
