"""Helpers for tests that run `pretrain train` as a user would: real processes on the tiny preset."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
# Short runs: metrics every step, no evaluation or TensorBoard, data read in the training process (tests of
# the data workers themselves override data.num_workers).
QUICK = ["train.global_batch=8", "logging.every_steps=1", "train.eval_every=0", "data.num_workers=0",
         "logging.tensorboard=false"]


def train_command(run_dir: Path, data: list[str], overrides: list[str], nproc: int = 1,
                  args: list[str] = (), config: Path = ROOT / "configs" / "tiny.yaml") -> list[str]:
    return [sys.executable, "-m", "launch.cli", "train", str(config), *data, *QUICK,
            *overrides, "--nproc", str(nproc), "--run-dir", str(run_dir), *args]


def run_train(run_dir: Path, data: list[str], overrides: list[str] = (), nproc: int = 1, args: list[str] = (),
              timeout: float = 900, config: Path = ROOT / "configs" / "tiny.yaml") -> subprocess.CompletedProcess:
    return subprocess.run(train_command(run_dir, data, list(overrides), nproc, list(args), config), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def train(run_dir: Path, data: list[str], overrides: list[str] = (), nproc: int = 1,
          args: list[str] = ()) -> dict[int, float]:
    """Train to the end (it must succeed) and return the loss of every step."""
    result = run_train(run_dir, data, overrides, nproc, args)
    assert result.returncode == 0, result.stderr[-4000:]
    return losses(run_dir)


def trained_once(layouts: dict[str, tuple[list[str], int]], common: list[str], data: list[str],
                 tmp_path_factory) -> Callable[[str], tuple[Path, dict[int, float]]]:
    """run(layout): the layout (its overrides and process count) trained once, when first asked for, with the
    `common` overrides; returns (run directory, loss per step)."""
    done = {}

    def run(layout: str) -> tuple[Path, dict[int, float]]:
        if layout not in done:
            overrides, nproc = layouts[layout]
            run_dir = tmp_path_factory.mktemp(layout)
            done[layout] = run_dir, train(run_dir, data, common + overrides, nproc)
        return done[layout]

    return run


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    """The loss of each step; a step repeated after a resume or rollback keeps its latest value."""
    return {r["step"]: r["loss"] for r in metrics(run_dir) if r["kind"] == "train"}


def resumed_step(stderr: str) -> int | None:
    """The step a run said it resumed from (None: it started fresh)."""
    for line in stderr.splitlines():
        if "resumed from" in line:
            return int(line.split(" at step ", 1)[1].split(",")[0])
    return None


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one-line error a failed run printed (the last line mentioning 'error:')."""
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert lines, result.stderr[-3000:]
    return lines[-1]


class Watched:
    """A command (`pretrain train`) and every process below it (ranks, their data workers), each recorded when seen,
    so that whatever outlives the command can be named. stderr goes to a file: a full pipe would stall the ranks."""

    def __init__(self, command: list[str], log: Path) -> None:
        self.log = log
        with open(log, "w") as stderr:
            self.proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        self.seen: dict[int, psutil.Process] = {}
        self.parent: dict[int, int] = {}  # pid -> its parent's pid when first seen
        self.cmdline: dict[int, list[str]] = {}

    def record(self) -> list[psutil.Process]:
        """The processes below the command now (remembered for `left_behind`)."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for child in children:
            if child.pid not in self.seen:
                try:
                    self.parent[child.pid], self.cmdline[child.pid] = child.ppid(), child.cmdline()
                except psutil.NoSuchProcess:
                    continue
                self.seen[child.pid] = child
        return children

    def children_of(self, pid: int) -> list[psutil.Process]:
        """The recorded processes that `pid` started (for the command's pid: the ranks)."""
        return [p for p in self.seen.values() if self.parent[p.pid] == pid]

    def wait_for(self, condition: Callable[[], bool], timeout: float) -> None:
        """Record processes until `condition()` holds; fail if the command exits or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            self.record()
            if condition():
                return
            assert self.proc.poll() is None, f"exited {self.proc.returncode} first: {self.stderr()[-3000:]}"
            assert time.monotonic() < deadline, f"not reached in {timeout} s: {self.stderr()[-3000:]}"
            time.sleep(0.05)

    def wait(self, timeout: float) -> int:
        """The command's exit code; fail (and kill everything recorded) if it runs longer than `timeout`."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            self.record()
            if time.monotonic() > deadline:
                self.proc.kill()
                for p in self.seen.values():
                    with contextlib.suppress(psutil.NoSuchProcess):
                        p.kill()
                raise AssertionError(f"still running after {timeout} s: {self.stderr()[-3000:]}")
            time.sleep(0.05)
        return self.proc.returncode

    def started_ranks(self, nproc: int) -> list[psutil.Process]:
        """The ranks, in rank order, once each handles SIGTERM (pretrain.training.stop installed) and the launcher
        forwards it."""
        def ready() -> bool:
            ranks = self.children_of(self.proc.pid)
            return len(ranks) == nproc and all(catches(p, signal.SIGTERM)
                                               for p in [psutil.Process(self.proc.pid), *ranks])

        self.wait_for(ready, timeout=120)
        return sorted(self.children_of(self.proc.pid), key=lambda p: int(p.environ()["RANK"]))

    def left_behind(self) -> list[str]:
        """Recorded processes still running a second after the command ended (zombies count as gone)."""
        deadline = time.monotonic() + 1
        while True:
            alive = [p for p in self.seen.values() if _running(p)]
            if not alive or time.monotonic() > deadline:
                return [f"{p.pid} {' '.join(self.cmdline[p.pid])[:100]}" for p in alive]
            time.sleep(0.1)

    def stderr(self) -> str:
        return self.log.read_text()


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def catches(process: psutil.Process, sig: int) -> bool:
    """Whether `process` has a handler for `sig` (the SigCgt mask of /proc/PID/status)."""
    try:
        status = Path(f"/proc/{process.pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (sig - 1) & 1)
