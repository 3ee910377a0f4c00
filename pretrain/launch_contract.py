"""What a trainer rank and the launcher that starts it agree on, without torch: launch/ imports it.

A rank exits 0 when the run is finished, EXIT_SAVED_ON_SIGNAL after a stop signal made it save (the same command
resumes), EXIT_USER_ERROR after one line naming bad input (config, data, checkpoint, rendezvous), EXIT_HANG after a
hang was reported (pretrain.training.hang); any other status is a failure. The ranks of a world on one machine meet at
127.0.0.1 on a free port. A launcher gives the ranks of each start the same START_ID_ENV.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

EXIT_SAVED_ON_SIGNAL = os.EX_TEMPFAIL  # 75: preempted or out of time, checkpoint saved, run again to resume
EXIT_USER_ERROR = 2
EXIT_FAILURE = 1  # an error in the rank (its line on the terminal, its traceback in `rank_log`)
EXIT_STOPPED_BEFORE_FIRST_STEP = 1  # a stop signal came before the first step: nothing new to save
# A rank made no progress for train.hang_timeout_s: one line named where the ranks wait (hang_summary), and every
# rank ends. As timeout(1) exits when its command runs out of time.
EXIT_HANG = 124
# The id of one start of a run's ranks, which its launcher sets: a hang of that start is reported in hang_dir.
START_ID_ENV = "PRETRAIN_START_ID"
# SIGTERM on preemption, SIGUSR1 (or submitit's SIGUSR2) before the time limit: save at the next step boundary.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now, for the rendezvous of a world whose ranks all run here."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_log(run_dir: Path, rank: int) -> Path:
    """Where a rank's library output and tracebacks go (launch.rank sends its standard output there)."""
    return run_dir / "logs" / f"rank{rank:05d}.log"


def new_start_id(restart: int) -> str:
    """An id for the ranks a launcher starts now (START_ID_ENV): the time, the launcher's process id and, after its
    first start (restart 0), the number of the restart (two starts may fall in one second)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}" + (f"-restart{restart}" if restart else "")


def hang_dir(run_dir: Path, start_id: str) -> Path:
    """Where a hang of the start `start_id` leaves every thread's stack and a report of each rank that saw it."""
    return run_dir / "hangs" / start_id


def hang_summary(run_dir: Path, start_id: str) -> Path:
    """The line that named the hang of the start `start_id`, once it is out: the launchers end the run on it."""
    return hang_dir(run_dir, start_id) / "summary.txt"
