"""Run N training processes on this machine, torchrun-style (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR/PORT, and OMP_NUM_THREADS: the machine's cores shared between the ranks).

Our own small launcher rather than torchrun because preemption handling needs SIGTERM and SIGUSR1 forwarded to
every rank so that all of them save at the same step boundary; torchrun's agent turns SIGTERM into killing its
workers. If one rank fails, the others are ended (FAILURE_GRACE_S), and all of them start again from the newest
complete checkpoint (launch.restarts, which decides whether to, and says why not) or the launcher exits with the
failing rank's code. A rank that reported a hang (EXIT_HANG: its line is out, pretrain.training.hang) ends the others
at once, with SIGKILL: a stopped rank would ignore anything else, and one blocked in a collective would wait
forever.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from launch.errors import UserError
from launch.rank import rank_command, rank_environment
from launch.restarts import Ending, run_with_restarts
from pretrain.config import Config
from pretrain.launch_contract import (
    EXIT_FAILURE,
    EXIT_HANG,
    EXIT_SAVED_ON_SIGNAL,
    START_ID_ENV,
    STOP_SIGNALS,
    free_port,
)

FORWARDED_SIGNALS = (*STOP_SIGNALS, signal.SIGINT)
# How often the launcher looks at its ranks: a failure is seen within this.
POLL_S = 0.05
# After a failure (other than a hang, whose ranks are killed at once) the other ranks get this long to end by
# themselves: over gloo they fail in their next collective and exit within about 2 s (the CPU benchmark,
# benchmarks/RESULTS.md), finishing a save whose every part is written; on NCCL, or waiting for the failed rank's part
# of a save, they would wait far longer, and the restart for them. A save cut short is removed at the next start.
FAILURE_GRACE_S = 5.0


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


def launch(cfg: Config, run_dir: Path, resume_from: Path | None, nproc: int, save_grace_s: float = 30.0) -> int:
    """Start nproc trainer ranks, and again after a failure that is restarted; return 0 or the code of the failure
    that ended the run. After a rank saved on a stop signal the others have `save_grace_s` to save and exit."""
    # The ranks share this machine's cores.
    env = rank_environment(threads=(os.cpu_count() or 1) // nproc)
    procs: list[subprocess.Popen] = []
    signalled = False

    def forward(signum, _frame):
        nonlocal signalled
        signalled = True  # the user or the scheduler decides what follows: no restart
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    def start(start_id: str, resume: Path | None) -> Ending:
        procs.clear()
        port = free_port()  # a new one for each start: the last one's may still be closing
        for rank in range(nproc):
            rank_env = dict(env, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank),
                            LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                            **{START_ID_ENV: start_id})
            procs.append(subprocess.Popen(rank_command(run_dir, resume), env=rank_env))
        return _wait(procs, save_grace_s, lambda: signalled)

    # Forwarding starts before the first rank does: a signal while they start reaches those already started.
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        ending, _ = run_with_restarts(cfg, run_dir, resume_from, start, stopping=lambda: signalled)
        return ending.code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(procs: list[subprocess.Popen], save_grace_s: float, signalled: Callable[[], bool]) -> Ending:
    while True:
        codes = [p.poll() for p in procs]
        failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            failed_at = time.time()
            hung = [(rank, code) for rank, code in failed if code == EXIT_HANG]
            # An error exit is the likelier consequence of another rank's failure (its peer gone from a collective).
            rank, code = hung[0] if hung else min(failed, key=lambda failure: failure[1] == EXIT_FAILURE)
            if hung:
                _end_the_others(procs, 0.0)
            elif signalled() or any(status == EXIT_SAVED_ON_SIGNAL for _, status in failed):
                _stop_after_a_save(procs, save_grace_s)
            else:
                _end_the_others(procs, FAILURE_GRACE_S)
            return Ending(code, rank, failed_at, time.time())
        if all(c == 0 for c in codes):
            return Ending(0)
        time.sleep(POLL_S)


def _stop_after_a_save(procs: list[subprocess.Popen], grace_s: float) -> None:
    """After a stop signal, or a save on one, the other ranks follow by themselves (once their part of the save is
    written); those still running after `grace_s` are stopped."""
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


def _end_the_others(procs: list[subprocess.Popen], grace_s: float) -> None:
    """After a failure: the ranks still running after `grace_s` are killed with their children."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_with_children(p)


def _kill_with_children(rank: subprocess.Popen) -> None:
    """SIGKILL a rank and its processes (data workers, which a stopped rank would leave waiting for it)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for process in [psutil.Process(rank.pid), *psutil.Process(rank.pid).children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    rank.wait()
