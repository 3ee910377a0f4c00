"""Slurm: `pretrain submit` (through submitit), requeue after preemption, `pretrain status JOB_ID`, `cancel`.

One Slurm task per GPU (per process on CPU nodes). Each task runs `TrainJob`, which exports the torch.distributed
rendezvous from the allocation (submitit's TorchDistributedEnvironment: master address from the first host of
the node list) and runs the trainer on the run directory. On the warning signal before the time limit (USR2,
`--signal` set by submitit) or on SIGTERM from preemption, every rank saves at the next step boundary; rank 0 then
requeues the job, which resumes from the run directory with no user action. A job that keeps stopping at the same
step stops requeuing after `slurm.max_requeues` attempts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from launch.errors import UserError
from pretrain.config import Config

# Characters that could end an #SBATCH line or a shell word and start another: refused outright.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def check_script_value(key: str, value: object) -> None:
    if value is not None and _UNSAFE.search(str(value)):
        raise UserError(f"{key}={str(value)!r} contains a control character (newline, tab, NUL): remove it")


def _minutes(limit: str) -> int:
    """Slurm's [days-]hours:minutes:seconds (or minutes) as whole minutes for submitit."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", limit.strip())
    if not match:
        raise UserError(f"slurm.time={limit!r} is not a Slurm time: write HH:MM:SS, D-HH:MM:SS or minutes")
    days, first, second, third = (int(g) if g else 0 for g in match.groups())
    if match.group(3) is None:  # plain minutes
        return days * 1440 + first
    hours, minutes, seconds = (first, second, third) if match.group(4) is not None else (0, first, second)
    return days * 1440 + hours * 60 + minutes + (1 if seconds else 0)


def tasks_per_node(cfg: Config) -> int:
    return cfg.slurm.gpus_per_node or cfg.slurm.tasks_per_node


def executor_for(cfg: Config, run_dir: Path):
    import submitit

    s = cfg.slurm
    for key in ("partition", "account", "qos", "constraint", "job_name", "time"):
        check_script_value(f"slurm.{key}", getattr(s, key))
    check_script_value("train.run_dir", run_dir)
    executor = submitit.SlurmExecutor(folder=run_dir / "slurm", max_num_timeout=s.max_requeues)
    extra = {"requeue": True}
    if s.account:
        extra["account"] = s.account
    executor.update_parameters(
        job_name=s.job_name,
        nodes=s.nodes,
        ntasks_per_node=tasks_per_node(cfg),
        cpus_per_task=s.cpus_per_task,
        gpus_per_node=s.gpus_per_node or None,
        partition=s.partition,
        qos=s.qos,
        constraint=s.constraint,
        time=_minutes(s.time),
        signal_delay_s=s.signal_seconds,
        additional_parameters=extra,
    )
    return executor


def sbatch_script(executor) -> str:
    # submitit builds the script from these two (private) pieces when it submits; --dry-run prints the same text.
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def submit(cfg: Config, run_dir: Path) -> str:
    executor = executor_for(cfg, run_dir)
    job = executor.submit(TrainJob(str(run_dir.resolve())))
    return job.job_id


class TrainJob:
    """What every Slurm task runs (pickled by submitit; a requeued job runs it again and resumes)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def __call__(self) -> int:
        import signal

        import submitit

        from launch.train_commands import run_slurm_task
        from pretrain.config import load_config

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        run_dir = Path(self.run_dir)
        # submitit's own USR2 handler would exit at once; the trainer saves at the step boundary instead.
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        code = run_slurm_task(load_config(run_dir / "config.yaml"), run_dir)
        if code:
            sys.exit(code)
        return code


def requeue_if_progressing(run_dir: Path, max_requeues: int) -> bool:
    """Requeue this job unless its last `max_requeues` requeues all stopped at the same step."""
    from launch.status_commands import run_status

    job_id = os.environ["SLURM_JOB_ID"]
    step = run_status(run_dir, hash_files=False)["step"]
    history_path = run_dir / "slurm" / "requeues.json"
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    recent = [entry["step"] for entry in history[-max_requeues:]]
    if len(recent) >= max_requeues and all(s == step for s in recent):
        print(f"[pretrain] job {job_id} stopped at step {step} {max_requeues + 1} times: not requeuing",
              file=sys.stderr, flush=True)
        return False
    history.append({"job": job_id, "step": step, "time": time.time()})
    history_path.write_text(json.dumps(history, indent=1))
    # Already requeued by Slurm (preemption, `scontrol requeue`) makes this a harmless no-op.
    subprocess.run(["scontrol", "requeue", job_id], check=False, timeout=60)
    print(f"[pretrain] requeued job {job_id} at step {step}", file=sys.stderr, flush=True)
    return True


def job_state(job_id: str) -> dict:
    """State, run time and reason from Slurm for one job (squeue while it lives, then scontrol)."""
    if not re.fullmatch(r"\d+(_\d+)?", job_id):
        raise UserError(f"{job_id!r} is not a Slurm job id (digits, e.g. 1234): pass a job id or a run directory")
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or ["no answer"])[-1]
        raise UserError(f"Slurm does not know job {job_id} ({reason}): it may have ended long ago, or set SLURM_CONF")
    fields = dict(re.findall(r"(\w+)=(\S*)", out.stdout))
    # JobName ends its line and may hold spaces; the other values do not.
    fields["JobName"] = re.search(r"JobName=(.*)", out.stdout).group(1)
    return {key: fields.get(key, "") for key in ("JobId", "JobName", "JobState", "Reason", "RunTime", "TimeLimit",
                                                  "Restarts", "NumTasks", "StdOut", "WorkDir", "Command")}


def run_dir_of(state: dict) -> Path | None:
    """The run directory of a job submitted by `pretrain submit`: its logs live in RUN_DIR/slurm/."""
    stdout = state.get("StdOut", "")
    if "/slurm/" in stdout:
        return Path(stdout.rsplit("/slurm/", 1)[0])
    return None


def cancel(job_id: str) -> None:
    job_state(job_id)
    subprocess.run(["scancel", job_id], check=True, timeout=60)


def cmd_submit(args) -> int:
    from launch.train_commands import prepare_run_dir
    from pretrain.config import check_paths, load_config, resolve_world

    overrides = list(args.overrides)
    for flag in ("nodes", "gpus_per_node", "partition", "time", "account", "qos", "constraint", "job_name"):
        value = getattr(args, flag)
        if value is not None:
            check_script_value(f"--{flag.replace('_', '-')}", value)
            overrides.append(f"slurm.{flag}={json.dumps(value)}")
    if args.run_dir:
        overrides.append(f"train.run_dir={json.dumps(args.run_dir)}")
    cfg = load_config(args.config, overrides)
    cfg = resolve_world(cfg, cfg.slurm.nodes * tasks_per_node(cfg))
    run_dir = Path(cfg.train.run_dir).resolve()
    if args.dry_run:
        print(sbatch_script(executor_for(cfg, run_dir)))
        return 0
    check_paths(cfg)
    prepare_run_dir(cfg, run_dir)
    job_id = submit(cfg, run_dir)
    print(job_id)
    print(f"pretrain submit: job {job_id}, {cfg.slurm.nodes} node(s) x {tasks_per_node(cfg)} task(s), "
          f"logs in {run_dir / 'slurm'}; watch with `pretrain status {job_id}`", file=sys.stderr)
    return 0


def cmd_cancel(args) -> int:
    cancel(args.job_id)
    print(f"pretrain cancel: job {args.job_id} cancelled", file=sys.stderr)
    return 0


def register(sub) -> None:
    p = sub.add_parser("submit", help="submit a training job to Slurm (one task per GPU) through submitit")
    p.add_argument("config", help="YAML preset, e.g. configs/mistral-7b-8x8.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=3e-4")
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int, help="0 on CPU nodes (then slurm.tasks_per_node processes)")
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit, e.g. 48:00:00")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--job-name")
    p.add_argument("--run-dir", help="run directory (default: train.run_dir of the config)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script instead of submitting it")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("cancel", help="cancel a Slurm job")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_cancel)
