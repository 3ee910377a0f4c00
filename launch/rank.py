"""One trainer rank, as both launchers start it: `python -m launch.rank RUN_DIR [--resume-from DIR]`.

Torch-free until it imports the trainer; first, in this order:

1. An srun task has Slurm's variables only: it gets torchrun's, which are all that pretrain/ reads. RANK,
   WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE come from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the step's
   tasks on this node; the ranks meet at the first host of SLURM_JOB_NODELIST (as `scontrol show hostnames`
   expands it), port 20000 + job id % 40000, unless MASTER_ADDR / MASTER_PORT are set (the batch step of
   `pretrain train` clears any it inherited from the submitting shell). A local launcher's ranks have torchrun's
   variables already.
2. Library noise goes to RUN_DIR/logs/rankNNNNN.log instead of the terminal: Python warnings, logging records
   (megatron-core's, torch's; errors also reach standard error) and standard output, where DeepSpeed logs and
   prints. DeepSpeed warns while it is imported, so this comes before any library is. The project's own messages
   (`[pretrain] ...`, progress, errors) and tracebacks go to standard error as before. The log's first line for
   each start names the rank, its host and the rendezvous address.
3. torch.compile's caches go to RUN_DIR/compile-cache/, so a resumed or requeued run reuses what its first start
   compiled; where that file system refuses file locks, which the caches take, to this node's temporary directory
   (compile_cache_environment).

Then it runs pretrain.training.trainer.main. The launchers give every rank REPRODUCIBLE_MATH_ENV and its share of
the CPU cores as OMP_NUM_THREADS (rank_environment).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from pretrain.launch_contract import EXIT_USER_ERROR, rank_log
from pretrain.training.stop import StopSignals

# On CPU, MKL otherwise schedules its threads dynamically (and may use fewer than asked on a busy machine), which
# changes the order of float sums and so the last bits of the losses: a resumed run would not repeat an
# uninterrupted one exactly (seen under load in the kill test). Its strict reproducible mode fixes both, at no
# measurable cost on the tiny model.
REPRODUCIBLE_MATH_ENV = {"MKL_DYNAMIC": "FALSE", "MKL_CBWR": "AUTO,STRICT"}


class RendezvousError(RuntimeError):
    """The Slurm allocation does not say where the ranks meet; the message says what to set."""


def rank_command(run_dir: Path, resume_from: Path | None = None) -> list[str]:
    """The command line of one trainer rank."""
    command = [sys.executable, "-m", "launch.rank", str(run_dir)]
    return command + ["--resume-from", str(resume_from)] if resume_from is not None else command


def rank_environment(threads: int) -> dict[str, str]:
    """The environment every rank starts with: this one, plus reproducible MKL and `threads` CPU threads (torch
    and MKL read OMP_NUM_THREADS; ranks on one machine share its cores, and more threads only thrash), unless
    the user set those."""
    return {**REPRODUCIBLE_MATH_ENV, "OMP_NUM_THREADS": str(max(1, threads)), **os.environ}


def torchrun_from_slurm(env: dict[str, str]) -> dict[str, str]:
    """torchrun's variables for the srun task whose environment is `env`."""
    if "MASTER_ADDR" in env:
        master = env["MASTER_ADDR"]
    else:
        nodelist = env["SLURM_JOB_NODELIST"]
        try:
            hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                   timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RendezvousError(f"cannot run scontrol to expand SLURM_JOB_NODELIST={nodelist!r} ({e}): "
                                  "set MASTER_ADDR yourself") from None
        if hosts.returncode != 0 or not hosts.stdout.split():
            raise RendezvousError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with scontrol: set MASTER_ADDR "
                                  "yourself")
        master = hosts.stdout.split()[0]
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(_tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", "1"),
                                               int(env.get("SLURM_NODEID", "0")))),
        "MASTER_ADDR": master,
        "MASTER_PORT": env.get("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 40000)),
    }


def _tasks_on_node(tasks_per_node: str, node: int) -> int:
    """Slurm's compressed tasks per node ("2(x3),1": 2 on each of the first three nodes, 1 on the fourth)."""
    counts = []
    for group in tasks_per_node.split(","):
        count, _, repeat = group.partition("(x")
        counts += [int(count)] * int(repeat.rstrip(")") or 1)
    return counts[node]


def send_library_noise_to(log_path: Path) -> None:
    """Standard output, Python warnings and logging records (but errors) go to `log_path` only, appended."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    # Through file descriptor 1: output of C++ code and of subprocesses (DeepSpeed's op builds) goes there too.
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, sys.stdout.fileno())
    os.close(log_fd)
    sys.stdout.reconfigure(line_buffering=True)
    to_log = logging.StreamHandler(sys.stdout)
    to_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_terminal = logging.StreamHandler(sys.stderr)
    to_terminal.setLevel(logging.ERROR)
    logging.basicConfig(level=logging.WARNING, handlers=[to_log, to_terminal], force=True)
    logging.captureWarnings(True)


def compile_cache_environment(run_dir: Path) -> dict[str, str]:
    """torch.compile's caches in the run directory: a resumed or requeued run, on whichever node sees the run
    directory, loads what its first start compiled instead of compiling it again (a minute for the 7B's layer on a
    GPU). The keys of both caches include the device and the code, so a cache never serves another machine
    wrongly.

    Both caches lock files, which some Lustre and NFS mounts refuse or hang on: where the run directory's file
    system does not grant a lock at once, the caches go to this node's temporary directory instead (one for each
    run: a start of the same run on this node finds them), and standard output (the rank's log) says so."""
    shared = run_dir / "compile-cache"
    refusal = file_lock_refusal(shared)
    if refusal is None:
        cache = shared
    else:
        key = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        cache = Path(tempfile.gettempdir()) / f"pretrain-compile-cache-{run_dir.resolve().name}-{key}"
        print(f"[pretrain] torch.compile's caches are in {cache} on this node: the file system of {shared} refuses "
              f"file locks ({refusal}), so a start on another node compiles again", flush=True)
    return {"TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}


LOCK_PROBE_TIMEOUT_S = 10

# Run in a child process, so that a lock request that is never answered holds up the child and not the rank. flock is
# what the caches' locks take (the filelock package); fcntl's are POSIX locks, which NFS emulates flock with.
_LOCK_PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(fd, fcntl.LOCK_UN)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.lockf(fd, fcntl.LOCK_UN)
finally:
    os.close(fd)
    os.unlink(sys.argv[1])
"""


def file_lock_refusal(directory: Path, timeout_s: float = LOCK_PROBE_TIMEOUT_S) -> str | None:
    """Why a file in `directory` (made if missing) cannot be locked at once with flock and with fcntl, or None when
    it can. Within `timeout_s` whatever the file system does."""
    probe = directory / f".lock-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        child = subprocess.Popen([sys.executable, "-I", "-c", _LOCK_PROBE, str(probe)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    except OSError as e:
        return str(e)
    try:
        _, errors = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # Not waited for: a process in a lock request that gets no answer may not end before it gets one.
        child.kill()
        child.stderr.close()
        return f"a lock request got no answer within {timeout_s} s"
    if child.returncode != 0:
        return (errors.strip().splitlines() or [f"the lock probe exited with status {child.returncode}"])[-1]
    return None


def main(argv: list[str] | None = None) -> int:
    # First, before the imports below take seconds (torch, DeepSpeed): a stop signal must end them too.
    StopSignals.install()
    parser = argparse.ArgumentParser(prog="python -m launch.rank",
                                     description="one training rank (`pretrain train` starts them)")
    parser.add_argument("run_dir", type=Path, help="run directory holding config.yaml")
    parser.add_argument("--resume-from", type=Path, help="checkpoint directory to resume from")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        try:
            os.environ.update(torchrun_from_slurm(dict(os.environ)))
        except RendezvousError as e:
            print(f"[pretrain] rank {os.environ['SLURM_PROCID']}: error: {e}", file=sys.stderr, flush=True)
            return EXIT_USER_ERROR
    if args.run_dir.is_dir():  # a wrong RUN_DIR gets the trainer's one-line error, not a new directory
        send_library_noise_to(rank_log(args.run_dir, int(os.environ.get("RANK", "0"))))
        # Where this rank runs, in its log: on several nodes, the record of which rank ran where.
        print(f"[pretrain] rank {os.environ.get('RANK', '0')} of {os.environ.get('WORLD_SIZE', '1')} on host "
              f"{socket.gethostname()}, rendezvous at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}",
              flush=True)
        if not {"TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"} <= os.environ.keys():
            os.environ.update({**compile_cache_environment(args.run_dir), **os.environ})
    from pretrain.training.trainer import main as train

    return train(args.run_dir, args.resume_from)


if __name__ == "__main__":
    sys.exit(main())
