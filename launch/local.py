"""Run N training processes on this machine, torchrun-style (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

Our own small launcher rather than torchrun because preemption handling needs SIGTERM and SIGUSR1 forwarded to
every rank so that all of them save at the same step boundary; torchrun's agent turns SIGTERM into killing its
workers. If one rank fails, the others are stopped and the launcher exits with the failing rank's code.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
# Every trainer rank's environment, unless set already. On CPU, MKL otherwise schedules its threads dynamically (and
# may use fewer than asked on a busy machine), which changes the order of float sums and so the last bits of the
# losses: a resumed run would not repeat an uninterrupted one exactly (seen under load in the kill test). Its strict
# reproducible mode fixes both, at no measurable cost on the tiny model.
REPRODUCIBLE_MATH_ENV = {"MKL_DYNAMIC": "FALSE", "MKL_CBWR": "AUTO,STRICT"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list[str], nproc: int, env: dict[str, str] | None = None, grace_s: float = 30.0) -> int:
    """Start `command` nproc times with rank variables set; return the first non-zero exit code, else 0."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        rank_env = {**REPRODUCIBLE_MATH_ENV, **(os.environ if env is None else env)}
        rank_env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(command, env=rank_env))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        return _wait(procs, grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(procs: list[subprocess.Popen], grace_s: float) -> int:
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
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
