"""In-job restart, the one restart loop of both launchers (launch.local on this machine, launch.slurm's batch step in
an allocation): when a start of the ranks fails, the launcher ends the ranks still running and starts all of them
again, resuming from the newest complete checkpoint, in the same allocation: no requeue, no wait in the queue.

Restarted, at most `launch.max_restarts` times per launcher: a rank that crashed (an error: exit 1; any other
non-zero status; death by a signal such as SIGKILL) or reported a hang (EXIT_HANG). Not restarted: bad input
(EXIT_USER_ERROR: a config, data or checkpoint fails the same way again), a save on a stop signal
(EXIT_SAVED_ON_SIGNAL: a preemption keeps its meaning, and the scheduler decides what follows), anything after the
launcher itself got a stop signal, and a failure where the failure before it was: a fault that comes back at one step
(a bug, bad data there) would come back at every restart, so one line names the step and the cause and the launcher
exits with the failure's status. Where a failure was is how far the run had got: the last training step in
metrics.jsonl (logged every logging.every_steps) and the newest complete checkpoint.

Each restart is one line on the terminal and one record in RUN_DIR/restarts.jsonl, written once the restarted
ranks complete a step (or end before one), which `pretrain status` shows: when, what failed and how, the step, the
checkpoint resumed from, and the time from the failure to the next completed step in its parts (`_Record`).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from durable import append_line
from pretrain.checkpoint.store import complete_steps, step_dir_name
from pretrain.config import Config
from pretrain.launch_contract import EXIT_HANG, EXIT_SAVED_ON_SIGNAL, EXIT_USER_ERROR, hang_dir, new_start_id
from pretrain.training.metrics import read_metrics

RESTARTS_FILE = "restarts.jsonl"
# How often a restart's record looks for the restarted ranks' first step in metrics.jsonl.
_LOOK_S = 0.25


@dataclass
class Ending:
    """How one start of the ranks ended, as its launcher saw it."""

    code: int  # 0, or the status of the failure that ended it (negative: the signal that killed the rank)
    rank: int | None = None  # the rank that failed first, where the launcher sees each (srun reports its step only)
    failed_at: float | None = None  # time.time() the failure was seen; None where only the end is seen (srun)
    ended_at: float = 0.0  # time.time() every rank had ended


def restartable(code: int) -> bool:
    return code not in (0, EXIT_USER_ERROR, EXIT_SAVED_ON_SIGNAL)


def describe(ending: Ending) -> str:
    """What failed and how, e.g. 'rank 1 was killed by SIGKILL'."""
    who = f"rank {ending.rank}" if ending.rank is not None else "a rank"
    if ending.code == EXIT_HANG:
        return f"{who} reported a hang (exit code {EXIT_HANG})"
    if ending.rank is None:
        return f"the job step failed (srun exit code {ending.code})"
    if ending.code < 0:
        try:
            return f"{who} was killed by {signal.Signals(-ending.code).name}"
        except ValueError:
            return f"{who} was killed by signal {-ending.code}"
    return f"{who} failed (exit code {ending.code})"


def reached(run_dir: Path) -> tuple[int, int]:
    """How far the run has got: (its last training step in metrics.jsonl, its newest complete checkpoint step)."""
    logged = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    saved = complete_steps(run_dir / "checkpoints")
    return (logged[-1] if logged else 0), (saved[-1] if saved else 0)


def run_with_restarts(cfg: Config, run_dir: Path, resume_from: Path | None,
                      start: Callable[[str, Path | None], Ending], stopping: Callable[[], bool]) -> tuple[Ending, bool]:
    """Run the ranks (`start(start_id, resume_from)` runs one start of them to its end), and again after each failure
    that is restarted. Returns how the last start ended, and whether the launcher gave up because a failure came where
    the one before it was (not for a requeue to repeat either)."""
    steps_before = set(complete_steps(run_dir / "checkpoints"))
    resume, record, previous, restarts = resume_from, None, None, 0
    start_id = new_start_id(restarts)
    while True:
        try:
            ending = start(start_id, resume)
        finally:
            if record is not None:
                record.close()
        if not restartable(ending.code) or stopping():
            return ending, False
        cause, where = describe(ending), reached(run_dir)
        at = f"after step {where[0]} (newest checkpoint step {where[1]})"
        if where == previous:
            _say(f"{cause} {at}, where the start before failed too: not restarting, it would fail there again; fix "
                 "the cause, then run the same command to resume")
            return ending, True
        if restarts >= cfg.launch.max_restarts:
            _say(f"{cause} {at}: not restarting, {restarts} of launch.max_restarts={cfg.launch.max_restarts} "
                 "restarts used")
            return ending, False
        restarts, previous = restarts + 1, where
        resume = _resume_point(run_dir, resume_from, steps_before)
        resumed_from = resume or _newest(run_dir)
        _say(f"restart {restarts} of {cfg.launch.max_restarts}: {cause} {at}; starting every rank again from "
             + (f"checkpoint {resumed_from.name}" if resumed_from else "the beginning (no checkpoint yet)"))
        seen = ending.failed_at or ending.ended_at
        detection_s = _hang_detection_s(run_dir, start_id, seen) if ending.code == EXIT_HANG else None
        start_id = new_start_id(restarts)
        record = _Record(run_dir, ending, {
            "time": seen, "restart": restarts, "start": start_id, "cause": cause, "rank": ending.rank,
            "exit_code": ending.code, "hang": ending.code == EXIT_HANG, "after_step": where[0],
            "checkpoint_step": where[1], "resumed_from": str(resumed_from) if resumed_from else None,
            "detection_s": detection_s})


def _say(line: str) -> None:
    print(f"[pretrain] {line}", file=sys.stderr, flush=True)


def _newest(run_dir: Path) -> Path | None:
    saved = complete_steps(run_dir / "checkpoints")
    return run_dir / "checkpoints" / step_dir_name(saved[-1]) if saved else None


def _resume_point(run_dir: Path, resume_from: Path | None, steps_before: set[int]) -> Path | None:
    """Where a restart resumes: the newest complete checkpoint (None: the trainer finds it and skips a damaged one),
    unless the first start resumed from a checkpoint it was given (--resume-from): then from that one again while no
    start has saved since, else from the newest they saved (the run directory may hold later steps of an abandoned
    past)."""
    if resume_from is None:
        return None
    saved = set(complete_steps(run_dir / "checkpoints")) - steps_before
    return run_dir / "checkpoints" / step_dir_name(max(saved)) if saved else resume_from


def _hang_detection_s(run_dir: Path, start_id: str, seen: float) -> float | None:
    """From the hang's beginning (the first reporting rank's last progress) to its failure seen by the launcher."""
    began = []
    for report in hang_dir(run_dir, start_id).glob("rank*.json"):
        try:
            began.append(report.stat().st_mtime - json.loads(report.read_text())["stalled_s"])
        except (OSError, ValueError, KeyError):
            continue
    return seen - min(began) if began else None


class _Record:
    """One restart's record in RUN_DIR/restarts.jsonl, completed from the restarted ranks' `startup` record in
    metrics.jsonl (rank 0 writes it after their first step), by a thread that looks for it while they run. Where the
    time went, in seconds: `detection_s` (a hang: from its beginning to its failure seen; a death is seen at once,
    and the launcher cannot know when an error began), `teardown_s` (from the failure seen until every rank had
    ended; under Slurm srun ends the step's other tasks before the batch step sees anything), `start_s` (until the
    checkpoint load began: process start, imports, process group, model, engine, data loaders), `load_s` (the
    checkpoint), `first_step_s`, and `next_step_s`, their sum: from the failure seen to the next completed step."""

    def __init__(self, run_dir: Path, ending: Ending, fields: dict) -> None:
        self.run_dir, self.ending, self.fields = run_dir, ending, fields
        metrics = run_dir / "metrics.jsonl"
        self.offset = metrics.stat().st_size if metrics.is_file() else 0  # the restarted ranks append after this
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._complete, name="restart-record", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """The restarted ranks have ended: write what is known."""
        self.done.set()
        self.thread.join()

    def _complete(self) -> None:
        while (startup := self._startup()) is None and not self.done.is_set():
            self.done.wait(_LOOK_S)
        timing = dict.fromkeys(("teardown_s", "start_s", "load_s", "first_step_s", "next_step_s"))
        ending = self.ending
        if ending.failed_at is not None:
            timing["teardown_s"] = ending.ended_at - ending.failed_at
        if startup is not None:
            step_began = startup["time"] - startup["first_step_s"]
            timing.update(start_s=step_began - startup["checkpoint_s"] - ending.ended_at,
                          load_s=startup["checkpoint_s"], first_step_s=startup["first_step_s"],
                          next_step_s=startup["time"] - (ending.failed_at or ending.ended_at))
        rounded = {key: None if value is None else round(value, 3) for key, value in timing.items()}
        detection = self.fields["detection_s"]
        record = {**self.fields, "detection_s": None if detection is None else round(detection, 3), **rounded}
        append_line(self.run_dir / RESTARTS_FILE, json.dumps(record))

    def _startup(self) -> dict | None:
        records = read_metrics(self.run_dir / "metrics.jsonl", self.offset)
        return next((r for r in records if r.get("kind") == "startup"), None)


_PARTS = (("detection", "detection_s"), ("teardown", "teardown_s"), ("start", "start_s"), ("load", "load_s"),
          ("first step", "first_step_s"))


def read_restarts(run_dir: Path) -> list[dict]:
    """The records of a run's restarts, oldest first."""
    return read_metrics(run_dir / RESTARTS_FILE)


def restart_line(record: dict) -> str:
    """One restart, as `pretrain status` shows it."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["time"]))
    resumed = Path(record["resumed_from"]).name if record["resumed_from"] else "the beginning"
    parts = [f"{name} {record[key]:.1f} s" for name, key in _PARTS if record[key] is not None]
    if record["next_step_s"] is None:
        took = "the restarted ranks ended before completing a step"
    else:
        took = f"next step {record['next_step_s']:.1f} s after the failure was seen ({', '.join(parts)})"
    return (f"restart {record['restart']} at {when}: {record['cause']} after step {record['after_step']}, resumed "
            f"from {resumed}; {took}")

