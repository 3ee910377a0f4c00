"""`pretrain status RUN_DIR`: where a run stands (steps, tokens, checkpoints and their verification, last metrics,
steps skipped (loss spikes among them) and rollbacks, the restarts of its ranks)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from launch.errors import UserError
from launch.restarts import read_restarts, restart_line
from pretrain.checkpoint.store import CheckpointError, complete_steps, step_dir_name, verify
from pretrain.config import load_config
from pretrain.training.metrics import read_metrics


def run_status(run_dir: Path, hash_files: bool = True) -> dict:
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml): pass the directory `pretrain train` made")
    cfg = load_config(run_dir / "config.yaml")
    root = run_dir / "checkpoints"
    checkpoints = []
    for step in reversed(complete_steps(root)):
        path = root / step_dir_name(step)
        try:
            verified = verify(path, hash_files)
            checkpoints.append({"step": step, "path": str(path), "ok": True, "meta": verified.meta})
        except CheckpointError as e:
            checkpoints.append({"step": step, "path": str(path), "ok": False, "error": str(e)})
    incomplete = sorted(p.name for p in root.glob(".tmp-step_*")) if root.is_dir() else []
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    return {
        "run_dir": str(run_dir),
        "target_steps": cfg.train.steps,
        # A run stopped by a signal saves the step it was in, whose metrics may not be logged yet.
        "step": max([train[-1]["step"] if train else 0] + [c["step"] for c in checkpoints if c["ok"]]),
        "tokens": train[-1].get("tokens", 0) if train else 0,
        "checkpoints": checkpoints,
        "incomplete_saves": incomplete,
        "last_train": train[-1] if train else None,
        "last_eval": evals[-1] if evals else None,
        "spikes": [r for r in records if r.get("kind") == "spike"],
        "restarts": read_restarts(run_dir),
        "finished": bool(checkpoints) and checkpoints[0]["ok"] and checkpoints[0]["step"] >= cfg.train.steps,
    }


def print_status(status: dict) -> None:
    print(f"run {status['run_dir']}: step {status['step']}/{status['target_steps']}, {status['tokens']:,} tokens"
          + (" (finished)" if status["finished"] else ""))
    if not status["checkpoints"]:
        print("  checkpoints: none yet")
    for ckpt in status["checkpoints"]:
        verdict = "verified" if ckpt["ok"] else f"BROKEN: {ckpt['error']}"
        print(f"  checkpoint step {ckpt['step']}: {verdict}  {ckpt['path']}")
    for name in status["incomplete_saves"]:
        print(f"  incomplete save (ignored): {name}")
    for kind in ("last_train", "last_eval"):
        record = status[kind]
        if record:
            shown = {k: v for k, v in record.items() if k not in ("kind", "time")}
            print(f"  {kind.replace('_', ' ')}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in shown.items()))
    last = status["last_train"] or {}
    if last.get("skipped_steps") or last.get("rollbacks"):
        print(f"  skipped steps: {last['skipped_steps']} ({last.get('spike_steps', 0)} loss spikes, the others not "
              f"finite), rollbacks: {last['rollbacks']}")
    for spike in status["spikes"]:
        exceeded = spike["exceeded"]
        print(f"  loss spike skipped at step {spike['step']}: {exceeded} {spike[exceeded]:.4g} over "
              f"{spike['threshold']:.4g} (mean {spike['mean']:.4g} + {spike['sigmas']:g} x std {spike['std']:.4g}), "
              f"global batch {spike['global_batch']}, samples {spike['samples'][0]}-{spike['samples'][1] - 1}")
    for record in status["restarts"]:
        print(f"  {restart_line(record)}")


def cmd_status(args: argparse.Namespace) -> int:
    from launch import slurm

    job = None
    run_dir = Path(args.target)
    if args.target.isdigit() and not run_dir.exists():
        job = slurm.job_state(args.target)
        run_dir = slurm.run_dir_of(job)
    status = run_status(run_dir, hash_files=not args.quick) if run_dir is not None else None
    if args.json:
        print(json.dumps({"job": job, "run": status}, indent=1))
        return 0
    if job:
        print(f"job {job['JobId']} ({job['JobName']}): {job['JobState']} ({job['Reason']}), ran {job['RunTime']} "
              f"of {job['TimeLimit']}, {job['Restarts']} restart(s), {job['NumTasks']} task(s), "
              f"exit code {job['ExitCode']}")
    if status:
        print_status(status)
    elif job:
        print(f"  log {job['StdOut']}; not a `pretrain submit` job: pass its run directory to `pretrain status`")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="a run's or Slurm job's progress, checkpoints (verified), last metrics and "
                                      "restarts")
    p.add_argument("target", help="run directory, or the Slurm job id `pretrain submit` printed")
    p.add_argument("--quick", action="store_true", help="check checkpoint sizes only, not their sha256")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
