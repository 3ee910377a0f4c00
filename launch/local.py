"""Run N training processes on this machine, torchrun-style (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR/PORT, and OMP_NUM_THREADS: the machine's cores shared between the ranks).

Our own small launcher rather than torchrun because preemption handling needs SIGTERM and SIGUSR1 forwarded to
every rank so that all of them save at the same step boundary; torchrun's agent turns SIGTERM into killing its
workers. If one rank fails, the others are stopped and the launcher exits with the failing rank's code. A rank
that reported a hang (EXIT_HANG: its line is out, pretrain.training.hang) ends the others at once, with SIGKILL: a
stopped rank would ignore anything else, and one blocked in a collective would wait forever.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from launch.errors import UserError
from launch.rank import rank_environment
from pretrain.launch_contract import EXIT_HANG, START_ID_ENV, STOP_SIGNALS, free_port, new_start_id

FORWARDED_SIGNALS = (*STOP_SIGNALS, signal.SIGINT)


def visible_gpus() -> int:
    """The GPUs this process sees. Importing torch takes seconds, and nothing else in the launcher needs it: it is
    asked only where a GPU driver is loaded (NVIDIA's, or ROCm's kernel driver)."""
    if not (Path("/proc/driver/nvidia").exists() or Path("/dev/kfd").exists()):
        return 0
    import torch

    return torch.cuda.device_count()


def check_one_gpu_per_rank(nproc: int) -> None:
    """Every rank on a GPU machine takes a GPU of its own: more ranks than GPUs is refused before any starts."""
    gpus = visible_gpus()
    if 0 < gpus < nproc:
        raise UserError(f"--nproc {nproc} starts one rank per GPU, but this machine shows {gpus} GPU(s): pass --nproc "
                        f"{gpus} or fewer (or hide the GPUs with CUDA_VISIBLE_DEVICES= to train on CPU)")


def launch(command: list[str], nproc: int, grace_s: float = 30.0) -> int:
    """Start `command` nproc times with rank variables set; return the first non-zero exit code, else 0."""
    port = free_port()
    # The ranks share this machine's cores.
    env = {**rank_environment(threads=(os.cpu_count() or 1) // nproc), START_ID_ENV: new_start_id()}
    procs: list[subprocess.Popen] = []

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    # Forwarding starts before the first rank does: a signal while they start reaches those already started.
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        for rank in range(nproc):
            rank_env = dict(env, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                            LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            procs.append(subprocess.Popen(command, env=rank_env))
        return _wait(procs, grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(procs: list[subprocess.Popen], grace_s: float) -> int:
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if EXIT_HANG in failed:
            for p in procs:
                if p.poll() is None:
                    _kill_with_children(p)
            return EXIT_HANG
        if failed:
            # A rank exited non-zero. After a preemption save the others follow by themselves; after a crash they
            # would hang in their next collective, so after a grace period they are stopped.
            deadline = time.monotonic() + grace_s
            for p in procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            return failed[0]
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)


def _kill_with_children(rank: subprocess.Popen) -> None:
    """SIGKILL a rank and its processes (data workers, which a stopped rank would leave waiting for it)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for process in [psutil.Process(rank.pid), *psutil.Process(rank.pid).children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    rank.wait()
