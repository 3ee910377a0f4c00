"""`pretrain train`: resolve and validate the config, prepare the run directory, start the ranks.

Outside Slurm it starts --nproc local processes. Inside a Slurm allocation (a batch script or salloc shell,
without --nproc) it starts one rank per Slurm task with srun and requeues the job after a preemption save or a
failure that is not stuck at one step (launch.slurm.run_in_allocation).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from launch.errors import UserError
from pretrain.checkpoint.store import check_writable, complete_steps
from pretrain.config import Config, check_paths, load_config, resolve_world, save_resolved


def prepare_run_dir(cfg: Config, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.yaml.tmp"
    save_resolved(cfg, tmp)
    tmp.replace(run_dir / "config.yaml")


def cmd_train(args: argparse.Namespace) -> int:
    from launch.local import check_one_gpu_per_rank, launch
    from launch.slurm import allocation_tasks, run_in_allocation

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"train.run_dir={args.run_dir}")
    if args.init_from:
        overrides.append(f"train.init_from={args.init_from}")
    cfg = load_config(args.config, overrides)
    slurm_tasks = allocation_tasks() if args.nproc is None else None
    world = slurm_tasks or args.nproc or 1
    cfg = resolve_world(cfg, world)
    if not slurm_tasks:
        check_one_gpu_per_rank(world)
    check_paths(cfg)
    run_dir = Path(cfg.train.run_dir)
    check_writable(run_dir / "checkpoints")
    existing = complete_steps(run_dir / "checkpoints")
    if slurm_tasks and int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0 and (args.resume_from or args.no_resume):
        # A requeued job runs the same command again: it continues from its own newest checkpoint.
        print("pretrain train: requeued job: --resume-from/--no-resume applied to its first run only",
              file=sys.stderr, flush=True)
        args.resume_from, args.no_resume = None, False
    if args.no_resume and existing:
        raise UserError(
            f"{run_dir} already holds checkpoints (newest step {existing[-1]}) and --no-resume refuses to overwrite "
            "them: pass another --run-dir, or drop --no-resume to continue that run"
        )
    resume_from = Path(args.resume_from) if args.resume_from else None
    if resume_from is not None and not resume_from.is_dir():
        raise UserError(
            f"--resume-from {resume_from} is not a checkpoint directory: pick one under {run_dir}/checkpoints"
        )
    prepare_run_dir(cfg, run_dir)
    print(f"pretrain train: {world} {'Slurm task(s)' if slurm_tasks else 'process(es)'}, run directory {run_dir}"
          + (f", resuming from step {existing[-1]}" if existing and resume_from is None else ""),
          file=sys.stderr, flush=True)
    if slurm_tasks:
        return run_in_allocation(cfg, run_dir, resume_from)
    return launch(cfg, run_dir, resume_from, world)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a config (local processes, or one rank per Slurm task)")
    p.add_argument("config", help="YAML preset, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=3e-4 parallel.tp=2")
    p.add_argument("--nproc", type=int,
                   help="local processes to start (default: one rank per task inside a Slurm allocation, else 1)")
    p.add_argument("--run-dir", help="run directory (default: train.run_dir of the config)")
    p.add_argument("--resume-from", help="resume from this checkpoint directory instead of the newest complete one")
    p.add_argument("--no-resume", action="store_true", help="refuse to start if the run directory has checkpoints")
    p.add_argument("--init-from", metavar="RUN_OR_CHECKPOINT",
                   help="fine-tune: start from these weights with a fresh optimizer, schedule and data order "
                        "(train.init_from; once the run directory has checkpoints, it resumes from those)")
    p.set_defaults(func=cmd_train)
