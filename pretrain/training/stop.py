"""Stop signals of a training rank: a preemption (SIGTERM), a time-limit warning (SIGUSR1, submitit's SIGUSR2).

After the first step a stop signal is a flag that the trainer reads at each step boundary: every rank then saves
the same step and exits 75. Before the first step there is nothing new to save, and nothing would read the flag
for a long time (imports, process-group setup, DeepSpeed, the compilation of step 1: 90+ s on Mistral 7B), nor at
all while the main thread is blocked in C (a collective waiting for a rank that never comes): a Python signal
handler only runs when the main thread gets back to Python. So `install()` also asks CPython to write each
signal's number to a pipe from its C-level handler (`signal.set_wakeup_fd`), which works whatever the main thread
is doing; a daemon thread reads the pipe and, until `first_step_done()`, ends the process at once: it kills the
rank's own child processes (data workers, compile workers) and exits 1 with one line, without saving. After
`first_step_done()` it sets `requested`. That thread is the one place where a signal is judged, so a rank never
both exits and asks the others (through `requested`) to save.

`install()` is the first thing a rank does (launch.rank), before torch is imported.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import psutil

from pretrain.launch_contract import EXIT_STOPPED_BEFORE_FIRST_STEP, STOP_SIGNALS


class StopSignals:
    """The rank's stop signals: `requested` is the signal number received (0: none)."""

    _installed: StopSignals | None = None

    def __init__(self, signals: tuple[int, ...]) -> None:
        self.signals = frozenset(int(s) for s in signals)
        self.requested = 0
        self._first_step_done = False

    @classmethod
    def install(cls, signals: tuple[int, ...] = STOP_SIGNALS) -> StopSignals:
        """Start handling `signals` in this process (from the main thread); a second call returns the first's."""
        if cls._installed is None:
            stop = cls(signals)
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)  # set_wakeup_fd's requirement: a signal handler must never block
            signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            for sig in signals:
                # A Python handler, so that the C-level one replaces the default action (death) and writes to the
                # pipe; the watcher thread does the rest.
                signal.signal(sig, _ignore)
            threading.Thread(target=stop._watch, args=(read_fd,), name="stop-signals", daemon=True).start()
            cls._installed = stop
        return cls._installed

    def first_step_done(self) -> None:
        """From now on a stop signal only sets `requested`: the trainer saves at its next step boundary."""
        self._first_step_done = True

    def _watch(self, read_fd: int) -> None:
        # The pipe carries the number of every signal that has a Python handler (SIGCHLD and SIGINT among them).
        while True:
            signum = os.read(read_fd, 1)[0]
            if signum not in self.signals:
                continue
            if not self._first_step_done:
                self._exit_before_first_step(signum)
            self.requested = signum

    @staticmethod
    def _exit_before_first_step(signum: int) -> None:
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        print(f"[pretrain] rank {rank}: signal {signal.Signals(signum).name} before the first step: exiting "
              "without saving", file=sys.stderr, flush=True)
        # Data workers ignore stop signals (pretrain's loader): they leave only when told, or killed.
        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        os._exit(EXIT_STOPPED_BEFORE_FIRST_STEP)


def _ignore(_signum: int, _frame) -> None:
    pass
