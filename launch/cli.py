"""`pretrain`: the command line. Each subcommand is a small function over the library; errors the user can fix
(config, data, checkpoint, command line) print one line naming the problem and the fix, and exit 2."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import warnings

from data_pipeline.errors import DataError
from durable import OutputError
from launch import chat_commands, data_commands, export_commands, main_job, slurm, status_commands, train_commands
from launch.errors import UserError
from pretrain.checkpoint.store import CheckpointError
from pretrain.config import ConfigError, default_world_size, load_config, resolve_world
from pretrain.launch_contract import EXIT_USER_ERROR


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML preset, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=3e-4 parallel.tp=2")


def cmd_plan(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from pretrain.plan import describe

    cfg = load_config(args.config, args.overrides)
    cfg = resolve_world(cfg, args.world_size or default_world_size(cfg))
    table = Table(title=f"plan for {args.config}", show_header=False, expand=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in describe(cfg, args.mfu, args.peak_tflops):
        table.add_row(key, value)
    Console(width=max(120, Console().width)).print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="Pretrain Mistral-style language models: plan a run, then train, watch, resume and export it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each command group registers its own subparsers; add a module's `register` here to add commands.
    for register in (_register_plan, train_commands.register, slurm.register, status_commands.register,
                     data_commands.register, export_commands.register, chat_commands.register, main_job.register):
        register(sub)
    return parser


def _register_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="parameters, FLOPs, memory per GPU and implied throughput of a config")
    _add_config_args(p)
    p.add_argument("--world-size", type=int, help="number of GPUs (default: the config's dp or Slurm allocation)")
    p.add_argument("--mfu", type=float, default=0.5, help="model FLOPs utilization to assume (default 0.5)")
    p.add_argument("--peak-tflops", type=float,
                   help="dense peak of one GPU in TFLOP/s, in train.dtype (default: logging.peak_tflops, else the "
                        "H100 SXM datasheet's)")
    p.set_defaults(func=cmd_plan)


def quiet_known_library_noise() -> None:
    """The start-up notices of the libraries, which say nothing the user can act on, stay off the terminal of the
    commands that run in this process (export, generate, eval...); the ranks of a run send theirs to the run's logs
    (launch.rank)."""
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    # DeepSpeed creates this logger, and says it found no GPU, while it is imported: the filter must come first.
    logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to" not in record.getMessage())
    # transformers imports torchao where it is installed (the [gpu] extra): torchao reports the optional kernels its
    # wheel could not load for this torch, and torch that torchao registers its enums the deprecated way.
    logging.getLogger("torchao").addFilter(lambda record: "Failed to load" not in record.getMessage())
    logging.getLogger("torch.utils._pytree").addFilter(lambda record: "register_constant" not in record.getMessage())


class Terminated(BaseException):
    """SIGTERM (Slurm's time limit, scancel, kill) raised where the command is, like Ctrl-C's KeyboardInterrupt, so
    that an output being written is removed on the way out (durable) instead of left beside the old one."""


def _raise_terminated(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    quiet_known_library_noise()
    args = build_parser().parse_args(argv)
    # Commands that pass stop signals on to their ranks (train) install their own handler while they run.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return args.func(args) or 0
    except (ConfigError, CheckpointError, UserError, DataError, OutputError) as e:
        print(f"pretrain {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # Ctrl-C: outputs being written were left as they were (durable)
        print(f"\npretrain {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Terminated:
        print(f"pretrain {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
