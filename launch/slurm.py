"""Slurm: the ranks of a job, requeue after preemption or failure, `pretrain submit`, `status JOB_ID`, `cancel`.

Inside an allocation (a batch script or an salloc shell) `pretrain train` runs `run_in_allocation`: one `srun`
step with one task per GPU (per process on CPU nodes), each task a trainer rank that takes its rank from
SLURM_PROCID and the rendezvous from the first host of the node list (launch.rank). The batch step waits
for the step and decides what follows:

* exit 0: the run is finished.
* SIGTERM reached the batch step: Slurm is cancelling, preempting or timing out the job (the ranks got SIGTERM
  too and saved at their next step boundary); Slurm decides whether the job runs again, never us. `scontrol
  requeue` after `scancel` would bring a cancelled job back.
* a rank failed or the ranks reported a hang: a new step starts every rank again in this allocation, from the newest
  complete checkpoint (launch.restarts, at most launch.max_restarts times), unless the failure came where the one
  before it was: then the job ends, as a requeue would fail there again.
* otherwise (the ranks saved on the warning signal and exited 75, bad input, or the restarts are used up):
  requeue the job, which resumes from the newest checkpoint of the run directory, unless the last
  `slurm.max_requeues` requeues of this job all happened at the same checkpoint step (a crash or hang that comes back
  at the same step, not progress). After a hang the batch step exits EXIT_HANG, whatever srun's status (once the
  line naming it is out, in the job's log from the rank that composed it, the batch step kills the step's tasks
  still running, a stopped one among them).

The warning signal is USR1, sent `slurm.signal_seconds` before the time limit to the ranks (`--signal=USR1@N`);
sent to the batch step instead (`--signal=B:USR1@N`, `scancel --batch`) it is forwarded to them.
`pretrain submit` writes the same job through submitit: its batch step runs `TrainJob`, i.e. `run_in_allocation`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch.errors import UserError
from launch.rank import rank_command, rank_environment
from launch.restarts import Ending, run_with_restarts
from pretrain.config import SLURM_TIME, Config
from pretrain.launch_contract import (
    EXIT_HANG,
    EXIT_SAVED_ON_SIGNAL,
    START_ID_ENV,
    STOP_SIGNALS,
    hang_summary,
)

WARNING_SIGNAL = signal.SIGUSR1  # the trainer saves on it at the next step boundary
# How often the batch step looks for a hang's line while its step runs.
HANG_POLL_S = 0.2

# Control characters could end an #SBATCH line or a shell word and start another: refused outright.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def check_script_value(key: str, value: object) -> None:
    if value is not None and _UNSAFE.search(str(value)):
        raise UserError(f"{key}={str(value)!r} contains a control character (newline, tab, NUL): remove it")


def _minutes(limit: str) -> int:
    """Slurm's [days-]hours:minutes:seconds (or minutes), which the config has validated, as whole minutes for
    submitit."""
    match = SLURM_TIME.fullmatch(limit.strip())
    days, first, second, third = (int(g) if g else 0 for g in match.groups())
    if match.group(3) is None:  # plain minutes
        return days * 1440 + first
    hours, minutes, seconds = (first, second, third) if match.group(4) is not None else (0, first, second)
    return days * 1440 + hours * 60 + minutes + (1 if seconds else 0)


def tasks_per_node(cfg: Config) -> int:
    return cfg.slurm.gpus_per_node or cfg.slurm.tasks_per_node


# ---------------------------------------------------------------- inside the allocation


def allocation_tasks() -> int | None:
    """The task count of the Slurm allocation this process runs in (batch script or salloc), else None."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return None
    if "SLURM_STEP_ID" in env:
        raise UserError(
            "`pretrain train` runs inside a Slurm job step (srun): call it without srun, in the batch script or "
            "salloc shell (it starts one rank per task with srun itself), or pass --nproc for local processes"
        )
    if "SLURM_NTASKS" not in env:
        raise UserError("the Slurm allocation does not say how many tasks it has: submit with --ntasks-per-node "
                        "(one per GPU) and --nodes")
    return int(env["SLURM_NTASKS"])


def run_in_allocation(cfg: Config, run_dir: Path, resume_from: Path | None = None) -> int:
    """One trainer rank per Slurm task (srun), started again in this allocation after a failure that is restarted
    (launch.restarts); then requeue the job if it should go on. Returns the last step's status."""
    # Ranks that saved on a signal exit 75 one after the other: a bad exit must not kill the rest at once
    # (--kill-on-bad-exit=0); after a crash the others would wait in their next collective, so the last ones
    # still running a minute after the first exit are stopped (--wait).
    command = ["srun", "--kill-on-bad-exit=0", "--wait=60"]
    if "SLURM_CPUS_PER_TASK" in os.environ:
        # srun 22.05 to 23.02 does not inherit the batch's --cpus-per-task: data workers would share one core.
        command.append(f"--cpus-per-task={os.environ['SLURM_CPUS_PER_TASK']}")
    # Each task's threads: the CPUs Slurm gave it (one without --cpus-per-task, Slurm's default).
    env = rank_environment(threads=int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
    # Every task takes its rank and rendezvous from Slurm (launch.rank): a RANK inherited from the submitting shell
    # would give them all the same, and an inherited MASTER_ADDR (127.0.0.1, say) would send the ranks of other
    # nodes to their own machine, where nobody listens.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    step: subprocess.Popen | None = None
    signalled = ending = False

    def on_signal(signum, _frame):
        nonlocal signalled, ending
        signalled = True  # Slurm or the user decides what follows: no restart
        if signum == signal.SIGTERM:
            ending = True  # Slurm signals every process of the job itself: nothing to forward
        elif step is not None and step.poll() is None:
            step.send_signal(WARNING_SIGNAL)  # srun passes it on to every task

    def start(start_id: str, resume: Path | None) -> Ending:
        nonlocal step
        step = subprocess.Popen(command + rank_command(run_dir, resume), env={**env, START_ID_ENV: start_id})
        hung = False
        while step.poll() is None:
            if not hung and hang_summary(run_dir, start_id).is_file():
                # The hang's line is out: the ranks still running (a stopped one among them) are ended now, not
                # srun's --wait after the first exit, so that a restart need not wait for them.
                hung = True
                kill_running_steps(os.environ["SLURM_JOB_ID"])
            time.sleep(HANG_POLL_S)
        return Ending(EXIT_HANG if hang_summary(run_dir, start_id).is_file() else step.returncode,
                      ended_at=time.time())

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        last, repeated = run_with_restarts(cfg, run_dir, resume_from, start, stopping=lambda: signalled)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if last.code != 0 and not ending and not repeated:
        requeue_if_progressing(cfg, run_dir, last.code)
    return last.code


def kill_running_steps(job_id: str) -> None:
    """SIGKILL to every task of the job's running steps: the batch step runs one at a time."""
    listed = subprocess.run(["squeue", "-h", "--steps", "-j", job_id, "-o", "%i"], capture_output=True, text=True,
                            timeout=60)
    for step_id in listed.stdout.split():
        if re.fullmatch(rf"{job_id}\.\d+", step_id):  # not the batch step itself (JOB.batch), nor JOB.extern
            subprocess.run(["scancel", "--signal=KILL", step_id], capture_output=True, timeout=60)


def requeue_if_progressing(cfg: Config, run_dir: Path, code: int) -> bool:
    """Requeue this job unless the run is finished or its last `max_requeues` requeues stopped at this step."""
    from pretrain.checkpoint.store import complete_steps

    job_id = os.environ["SLURM_JOB_ID"]
    saved = complete_steps(run_dir / "checkpoints")
    step = saved[-1] if saved else 0
    why = {EXIT_SAVED_ON_SIGNAL: "saved on the warning signal", EXIT_HANG: f"hung (exit code {EXIT_HANG})"}.get(
        code, f"failed with exit code {code}")
    if step >= cfg.train.steps:
        return False
    history_path = run_dir / "slurm" / "requeues.json"
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    same_step = 0
    for entry in reversed(history):
        if entry["job"] != job_id or entry["step"] != step:
            break
        same_step += 1
    if same_step >= cfg.slurm.max_requeues:
        print(f"[pretrain] job {job_id} {why} at checkpoint step {step} after {same_step} requeue(s) at that step "
              f"(slurm.max_requeues={cfg.slurm.max_requeues}): not requeuing; fix the cause and submit again",
              file=sys.stderr, flush=True)
        return False
    history.append({"job": job_id, "step": step, "exit_code": code, "time": time.time()})
    history_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = history_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(history, indent=1))
    tmp.replace(history_path)
    print(f"[pretrain] job {job_id} {why}: requeuing, it resumes from checkpoint step {step}",
          file=sys.stderr, flush=True)
    for attempt in range(5):  # a busy slurmctld may drop a request; the job must not end for that
        if subprocess.run(["scontrol", "requeue", job_id], timeout=60).returncode == 0:
            return True
        time.sleep(2 ** attempt)
    raise RuntimeError(f"scontrol requeue {job_id} failed 5 times: requeue it by hand, or submit the run again")


# ---------------------------------------------------------------- pretrain submit (submitit)


class TrainJob:
    """What the batch step of a `pretrain submit` job runs (pickled by submitit into RUN_DIR/slurm; a requeued
    job loads the same pickle and resumes from the run directory)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def __call__(self) -> int:
        from pretrain.config import load_config

        run_dir = Path(self.run_dir)
        code = run_in_allocation(load_config(run_dir / "config.yaml"), run_dir)
        if code:
            sys.exit(code)
        return code


def executor_for(cfg: Config, run_dir: Path):
    import submitit

    s = cfg.slurm
    for key in ("partition", "account", "qos", "constraint", "job_name", "time"):
        check_script_value(f"slurm.{key}", getattr(s, key))
    check_script_value("train.run_dir", run_dir)
    if re.search(r"[%\\]", str(run_dir)):
        # Slurm expands %j, %x... in log file names, and a backslash turns that off for submitit's %j too.
        raise UserError(f"train.run_dir={str(run_dir)!r} contains '%' or '\\', which Slurm reads as a log file "
                        "name pattern: choose a run directory without them")

    class Executor(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            # submitit's own check for `srun` would end a dry run, which needs no Slurm; cmd_submit checks for
            # Slurm's commands before a real submission, with one line naming what is missing.
            return 1

    # `exec`: the batch shell becomes TrainJob's Python, so signals for the batch step (scancel --batch,
    # --signal=B:...) reach it instead of killing a bash that waits for it.
    executor = Executor(folder=run_dir / "slurm", python=f"exec {shlex.quote(sys.executable)}")
    executor.update_parameters(
        job_name=s.job_name,
        nodes=s.nodes,
        ntasks_per_node=tasks_per_node(cfg),
        cpus_per_task=s.cpus_per_task,
        gpus_per_node=s.gpus_per_node or None,
        partition=s.partition,
        account=s.account,
        qos=s.qos,
        constraint=s.constraint,
        time=_minutes(s.time),
        # The batch step runs TrainJob, which starts the ranks with srun and decides about requeueing.
        use_srun=False,
        additional_parameters={"requeue": True, "signal": f"{WARNING_SIGNAL.name[3:]}@{s.signal_seconds}"},
    )
    return executor


def sbatch_script(executor) -> str:
    # submitit builds the script from these two (private) pieces when it submits; --dry-run prints the same text.
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


# ---------------------------------------------------------------- status and cancel


_REST_OF_LINE = re.compile(r"(?:^|\s)(JobName|Command|WorkDir|StdErr|StdIn|StdOut|Comment)=(.*)$")


def job_state(job_id: str) -> dict:
    """State, run time, restarts and log file of one job, from `scontrol show job`."""
    if not re.fullmatch(r"\d+(_\d+)?", job_id):
        raise UserError(f"{job_id!r} is not a Slurm job id (digits, e.g. 1234): pass a job id or a run directory")
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or [f"scontrol exit status {out.returncode}"])[-1]
        raise UserError(f"Slurm does not know job {job_id} ({reason}): it may have ended long ago, or set SLURM_CONF")
    fields = {}
    for line in out.stdout.splitlines():
        # JobName, StdOut, WorkDir... take the rest of their line (spaces, `=` and all); the other values are words.
        rest = _REST_OF_LINE.search(line)
        fields.update(re.findall(r"(\w+)=(\S*)", line[:rest.start()] if rest else line))
        if rest:
            fields[rest.group(1)] = rest.group(2)
    return {key: fields.get(key, "") for key in ("JobId", "JobName", "JobState", "Reason", "RunTime", "TimeLimit",
                                                  "Restarts", "NumTasks", "ExitCode", "StdOut", "WorkDir")}


def run_dir_of(state: dict) -> Path | None:
    """The run directory of a job submitted by `pretrain submit`: its logs live in RUN_DIR/slurm/."""
    stdout = Path(state.get("StdOut", ""))
    if stdout.parent.name == "slurm" and (stdout.parent.parent / "config.yaml").is_file():
        return stdout.parent.parent
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
    cfg.train.run_dir = str(run_dir)  # the job's ranks find their run directory wherever the job starts
    executor = executor_for(cfg, run_dir)
    if args.dry_run:
        print(sbatch_script(executor))
        return 0
    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
    if missing:
        raise UserError(f"{' and '.join(missing)} not found on PATH: submit from a machine of the Slurm cluster (or "
                        "put Slurm's commands on PATH); --dry-run prints the batch script without Slurm")
    check_paths(cfg)
    prepare_run_dir(cfg, run_dir)
    job_id = executor.submit(TrainJob(str(run_dir))).job_id
    print(job_id)
    print(f"pretrain submit: job {job_id}, {cfg.slurm.nodes} node(s) x {tasks_per_node(cfg)} task(s), "
          f"logs in {shlex.quote(str(run_dir / 'slurm'))}; watch with `pretrain status {job_id}`", file=sys.stderr)
    return 0


def cmd_cancel(args) -> int:
    cancel(args.job_id)
    print(f"pretrain cancel: job {args.job_id} cancelled (its ranks save at their next step boundary; "
          "it is not requeued)", file=sys.stderr)
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

    p = sub.add_parser("cancel", help="cancel a Slurm job (its ranks save first; it is not requeued)")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_cancel)
