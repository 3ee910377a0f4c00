"""`pretrain train`: resolve and validate the config, prepare the run directory, start the ranks.

Outside Slurm it starts --nproc local processes. Inside a Slurm step (srun, one task per GPU or CPU process) the
same command runs one rank in this process; rank 0 writes the run directory's config.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from launch.errors import UserError
from pretrain.checkpoint.store import CheckpointStore
from pretrain.config import Config, check_paths, load_config, resolve_world, save_resolved


def in_slurm_step() -> bool:
    return "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ


def prepare_run_dir(cfg: Config, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.yaml.tmp"
    save_resolved(cfg, tmp)
    tmp.replace(run_dir / "config.yaml")


def run_slurm_task(cfg: Config, run_dir: Path, resume_from: Path | None = None) -> int:
    """One rank per Slurm task; after a save on signal, rank 0 requeues the job (launch.slurm)."""
    import signal

    from launch.slurm import requeue_if_progressing
    from pretrain.trainer import EXIT_SAVED_ON_SIGNAL, run

    if os.environ["SLURM_PROCID"] == "0":
        prepare_run_dir(cfg, run_dir)
    code = run(cfg, run_dir, resume_from, stop_signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2))
    if code == EXIT_SAVED_ON_SIGNAL and os.environ["SLURM_PROCID"] == "0":
        requeue_if_progressing(run_dir, cfg.slurm.max_requeues)
    return code


def cmd_train(args: argparse.Namespace) -> int:
    from launch.local import launch

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"train.run_dir={args.run_dir}")
    cfg = load_config(args.config, overrides)
    world = int(os.environ["SLURM_NTASKS"]) if in_slurm_step() else args.nproc
    cfg = resolve_world(cfg, world)
    check_paths(cfg)
    run_dir = Path(cfg.train.run_dir)
    store = CheckpointStore(run_dir / "checkpoints", 1, 0)
    store.check_writable()
    existing = store.complete_steps()
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
    if in_slurm_step():
        return run_slurm_task(cfg, run_dir, resume_from)
    prepare_run_dir(cfg, run_dir)
    print(f"pretrain train: {world} process(es), run directory {run_dir}"
          + (f", resuming from step {existing[-1]}" if existing and resume_from is None else ""),
          file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "pretrain.trainer", str(run_dir)]
    if resume_from is not None:
        command += ["--resume-from", str(resume_from)]
    return launch(command, world)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a config (local processes, or one rank per Slurm task)")
    p.add_argument("config", help="YAML preset, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=3e-4 parallel.tp=2")
    p.add_argument("--nproc", type=int, default=1, help="local processes to start (ignored inside Slurm)")
    p.add_argument("--run-dir", help="run directory (default: train.run_dir of the config)")
    p.add_argument("--resume-from", help="resume from this checkpoint directory instead of the newest complete one")
    p.add_argument("--no-resume", action="store_true", help="refuse to start if the run directory has checkpoints")
    p.set_defaults(func=cmd_train)
