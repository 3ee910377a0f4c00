"""What a trainer rank and the launcher that starts it agree on, without torch: launch/ imports it.

A rank exits 0 when the run is finished, EXIT_SAVED_ON_SIGNAL after a stop signal made it save (the same command
resumes), EXIT_USER_ERROR after one line naming bad input (config, data, checkpoint, rendezvous); any other status
is a failure. The ranks of a world on one machine meet at 127.0.0.1 on a free port.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

EXIT_SAVED_ON_SIGNAL = os.EX_TEMPFAIL  # 75: preempted or out of time, checkpoint saved, run again to resume
EXIT_USER_ERROR = 2
EXIT_FAILURE = 1  # an error in the rank (its line on the terminal, its traceback in `rank_log`)
EXIT_STOPPED_BEFORE_FIRST_STEP = 1  # a stop signal came before the first step: nothing new to save
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
