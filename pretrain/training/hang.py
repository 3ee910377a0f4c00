"""Hang reports: a rank that makes no progress for train.hang_timeout_s ends the run with one line naming where the
ranks are stuck, and exit status EXIT_HANG.

Progress is what the training loop marks (`HangWatchdog.progress`, from any thread): each micro-batch and
evaluation batch, each step's poll and save, the phases of the startup; each mark names what the rank does next.
A watchdog thread in every rank:

* writes a heartbeat every `beat_s` to RUN_DIR/heartbeats/rankNNNNN.json: host, pid, what the rank does, how long
  since its last mark, and a counter. A rank that stops responding (stopped, dead, stuck in the kernel) is one whose
  counter stops moving, which the others judge by their own clock alone (nodes' clocks differ).
* when no mark comes within the allowance, train.hang_timeout_s (train.startup_timeout_s until the first step ends,
  while torch.compile compiles and while a checkpoint is written or read whole: those have no marks inside), writes
  every thread's stack to RUN_DIR/hangs/START/rankNNNNN.txt (faulthandler's, which works while the main thread is
  blocked in C) and a report, rankNNNNN.json, of what its main thread waits in: a collective, data, checkpoint I/O,
  an op build, compilation or computation, by the innermost frame of its stack that one of them claims (`waits_in`).
  Then it kills its own children (data workers) and exits EXIT_HANG.

The first rank to report composes the one line (`compose`) from the reports and heartbeats of every rank, waiting
a few heartbeats for the others: named with their host are the ranks that do not respond, that wait in anything but
a collective, or that wait in a collective at another point than most ranks (a rank that skipped a collective). The
line goes to standard error (the terminal, or the Slurm job's log) and to RUN_DIR/hangs/START/summary.txt; the other
reporting ranks wait for it before they exit, so that a launcher that sees EXIT_HANG knows the line is out and ends
the ranks still running. START is the start's id (START_ID_ENV, set by the launchers).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil

from pretrain.launch_contract import EXIT_HANG, START_ID_ENV, hang_dir, hang_summary

# What a blocked main thread waits in: the first kind (from the innermost frame out) one of whose (path part,
# function) patterns a frame matches; None matches any function. Frames of the standard library match none.
WAIT_KINDS: list[tuple[str, tuple[tuple[str, str | None], ...]]] = [
    # all_reduce_numbers: on NCCL its wait is the read of the result, which is no frame of torch.distributed.
    ("collective", (("/torch/distributed/", None), ("/deepspeed/comm/", None),
                    ("/pretrain/parallel.py", "all_reduce_numbers"))),
    ("op build", (("/torch/utils/file_baton.py", None), ("/torch/utils/cpp_extension.py", None),
                  ("/deepspeed/ops/op_builder/", None))),
    ("data", (("/torch/utils/data/", None), ("/data_pipeline/", None), ("/pretrain/training/global_batch.py", "read"))),
    ("checkpoint", (("/pretrain/checkpoint/", None), ("/durable/", None))),
    ("compile", (("/torch/_dynamo/", None), ("/torch/_inductor/", None))),
]
# The line names at most this many groups of ranks (ranks doing the same thing form one).
MAX_NAMED_GROUPS = 8
# How the line says it, for one rank and for several.
_WAITING = {
    "collective": ("waits in a collective", "wait in a collective"),
    "op build": ("builds an op or waits for its build lock", "build an op or wait for its build lock"),
    "data": ("waits for data", "wait for data"),
    "checkpoint": ("waits in checkpoint I/O", "wait in checkpoint I/O"),
    "compile": ("is compiling", "are compiling"),
    "compute": ("is computing", "are computing"),
    "silent": ("does not respond", "do not respond"),
    "running": ("responds but made no progress either", "respond but made no progress either"),
}


def waits_in(stack: list[traceback.FrameSummary]) -> str:
    """The kind of wait of a thread whose stack (outermost frame first) this is; "compute" when no kind claims it."""
    for frame in reversed(stack):
        path = Path(frame.filename).as_posix()
        for kind, patterns in WAIT_KINDS:
            if any(part in path and function in (None, frame.name) for part, function in patterns):
                return kind
    return "compute"


def heartbeat_path(run_dir: Path, rank: int) -> Path:
    return run_dir / "heartbeats" / f"rank{rank:05d}.json"


class HangWatchdog:
    """This rank's watchdog (module docstring): `start` it once the config is known, then mark progress."""

    def __init__(self, run_dir: Path, hang_timeout_s: float, startup_timeout_s: float) -> None:
        self.run_dir = run_dir
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        # A rank started by hand rather than by a launcher shares its world's rendezvous port.
        self.start_id = os.environ.get(START_ID_ENV) or f"port{os.environ.get('MASTER_PORT', '0')}"
        self.host = socket.gethostname()
        self.hang_timeout_s = float(hang_timeout_s)
        self.startup_timeout_s = max(float(startup_timeout_s), self.hang_timeout_s)
        # Often enough that a rank that stops responding is seen within a few seconds, rarely enough for a shared
        # file system holding the heartbeats of thousands of ranks.
        self.beat_s = min(3.0, max(1.0, self.hang_timeout_s / 20))
        self._doing = "starting"
        self._last_progress = time.monotonic()
        self._first_step_done = False
        self._long_operations = 0
        self._long_operations_lock = threading.Lock()
        self._beats = 0

    def start(self) -> HangWatchdog:
        import torch._dynamo.callback

        # Compilation marks nothing for up to minutes: the longer allowance holds while dynamo compiles (also the
        # backward graphs it compiles at their first use).
        torch._dynamo.callback.on_compile_start(lambda *_: self._begin_long_operation())
        torch._dynamo.callback.on_compile_end(lambda *_: self._end_long_operation())
        threading.Thread(target=self._watch, name="hang-watchdog", daemon=True).start()
        return self

    # ------------------------------------------------------------------ fed by the training loop

    def progress(self, doing: str) -> None:
        """The rank made progress and now does `doing` (shown in a report if it stops there)."""
        self._doing = doing
        self._last_progress = time.monotonic()

    def first_step_done(self) -> None:
        """From now on the allowance is train.hang_timeout_s."""
        self._first_step_done = True
        self.progress(self._doing)

    @contextlib.contextmanager
    def long_operation(self, doing: str) -> Iterator[None]:
        """Work that marks no progress inside for longer than the hang timeout may last (a whole checkpoint written
        or read): the startup allowance holds meanwhile."""
        self.progress(doing)
        self._begin_long_operation()
        try:
            yield
        finally:
            self._end_long_operation()

    def _begin_long_operation(self) -> None:
        with self._long_operations_lock:
            self._long_operations += 1

    def _end_long_operation(self) -> None:
        with self._long_operations_lock:
            self._long_operations -= 1
        self.progress(self._doing)

    def run_hung(self) -> bool:
        """A rank of this start reported a hang and its line is out: the run is ending (another rank's error now,
        such as a collective whose peers exited, is a consequence, not news)."""
        return hang_summary(self.run_dir, self.start_id).is_file()

    # ------------------------------------------------------------------ the watchdog thread

    def _allowance_s(self) -> float:
        if not self._first_step_done or self._long_operations:
            return self.startup_timeout_s
        return self.hang_timeout_s

    def _watch(self) -> None:
        while True:
            time.sleep(self.beat_s)
            stalled = time.monotonic() - self._last_progress
            allowance = self._allowance_s()
            self._beat(stalled)
            if stalled > allowance:
                self._report(stalled, allowance)

    def _beat(self, stalled_s: float) -> None:
        self._beats += 1
        beat = {"start": self.start_id, "rank": self.rank, "host": self.host, "pid": os.getpid(), "beat": self._beats,
                "doing": self._doing, "stalled_s": round(stalled_s, 1)}
        with contextlib.suppress(OSError):  # best effort: a report says what is missing
            _write_json(heartbeat_path(self.run_dir, self.rank), beat)

    def _report(self, stalled_s: float, allowance_s: float) -> None:
        """Stacks and report to disk, the line if this rank is the first, then exit EXIT_HANG. Never returns."""
        main = sys._current_frames().get(threading.main_thread().ident)
        stack = traceback.extract_stack(main) if main is not None else []
        directory = hang_dir(self.run_dir, self.start_id)
        workers = psutil.Process().children(recursive=True)
        report = {"start": self.start_id, "rank": self.rank, "host": self.host, "pid": os.getpid(),
                  "waits_in": waits_in(stack), "doing": self._doing, "stalled_s": round(stalled_s, 1),
                  "allowance_s": allowance_s, "workers": [worker.pid for worker in workers],
                  "main_thread": [f"{frame.filename}:{frame.lineno} {frame.name}" for frame in stack[-8:]]}
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with open(directory / f"rank{self.rank:05d}.txt", "w") as stacks:
                faulthandler.dump_traceback(stacks, all_threads=True)
            _write_json(directory / f"rank{self.rank:05d}.json", report)
            if _claim(directory / "composer"):
                line = compose(self.world, self._wait_for_reports(directory), allowance_s, directory)
                _write_text(hang_summary(self.run_dir, self.start_id), line + "\n")
                print(line, file=sys.stderr, flush=True)
            else:
                self._wait_for_summary()
        except Exception as e:  # whatever fails here, the rank must still say what it saw and end
            print(f"[pretrain] rank {self.rank}: hang: no progress for {allowance_s:.0f} s, "
                  f"{_WAITING[report['waits_in']][0]} ({self._doing}); reporting it in {directory} failed "
                  f"({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        finally:
            for worker in workers:
                with contextlib.suppress(psutil.NoSuchProcess):
                    worker.kill()
            os._exit(EXIT_HANG)

    def _stale_s(self) -> float:
        """How long a heartbeat that does not move means a rank that does not respond: several beats."""
        return 4 * self.beat_s + 2

    def _wait_s(self) -> float:
        """How long the first report waits for the others: theirs come when their own allowance runs out, which
        began about when this one's did (they wait for the same thing, or for this rank)."""
        return self.hang_timeout_s / 2 + self._stale_s()

    def _wait_for_reports(self, directory: Path) -> dict[int, dict]:
        """Every rank's state once each has reported or stopped responding (its heartbeat did not move for
        `_stale_s`, or there is none from this start), or after `_wait_s`: its report, or its last heartbeat with
        `waits_in` "silent" or, for a rank that responds but has not reported, "running"."""
        deadline = time.monotonic() + self._wait_s()
        seen: dict[int, tuple[int | None, float]] = {}  # rank -> (its heartbeat counter, since when)
        while True:
            now = time.monotonic()
            reports = {rank: report for rank in range(self.world)
                       if (report := _read_json(directory / f"rank{rank:05d}.json")) is not None}
            beats = self._heartbeats()
            silent = set()
            for rank in set(range(self.world)) - set(reports):
                counter = beats[rank]["beat"] if rank in beats else None
                if rank not in seen or seen[rank][0] != counter:
                    seen[rank] = (counter, now)
                if now - seen[rank][1] >= self._stale_s():
                    silent.add(rank)
            if len(reports) + len(silent) == self.world or now > deadline:
                break
            time.sleep(0.5)
        for rank in set(range(self.world)) - set(reports):
            if rank not in beats:
                reports[rank] = {"rank": rank, "host": "unknown", "waits_in": "silent", "doing": "no heartbeat yet"}
            elif rank in silent:
                reports[rank] = {**beats[rank], "waits_in": "silent", "doing": f"last: {beats[rank]['doing']}"}
            else:
                beat = beats[rank]
                reports[rank] = {**beat, "waits_in": "running", "doing": f"{beat['stalled_s']:.0f} s, {beat['doing']}"}
        return reports

    def _heartbeats(self) -> dict[int, dict]:
        beats = {rank: _read_json(heartbeat_path(self.run_dir, rank)) for rank in range(self.world)}
        return {rank: beat for rank, beat in beats.items() if beat is not None and beat.get("start") == self.start_id}

    def _wait_for_summary(self) -> None:
        deadline = time.monotonic() + self._wait_s() + 10
        while not self.run_hung() and time.monotonic() < deadline:
            time.sleep(0.2)


def compose(world: int, states: dict[int, dict], allowance_s: float, directory: Path) -> str:
    """The one line of a hang from every rank's state (a report, or a heartbeat marked silent or running)."""
    named: dict[tuple[str, str], list[int]] = {}
    in_collective: dict[str, list[int]] = {}
    for rank in range(world):
        state = states[rank]
        if state["waits_in"] == "collective":
            in_collective.setdefault(state["doing"], []).append(rank)
        else:
            named.setdefault((state["waits_in"], state["doing"]), []).append(rank)
    counts = Counter({doing: len(ranks) for doing, ranks in in_collective.items()})
    ranked = counts.most_common()
    # Most ranks wait at one point: the others, which are elsewhere, are named (with two ranks, or a tie, all are).
    common = ranked[0][0] if ranked and (len(ranked) == 1 or ranked[0][1] > ranked[1][1]) else None
    parts = [f"{_who(ranks, states)} {_verb(kind, ranks)} ({doing})" for (kind, doing), ranks in named.items()]
    for doing, ranks in in_collective.items():
        if doing != common:
            parts.append(f"{_who(ranks, states)} {_verb('collective', ranks)} at another point than the others "
                         f"({doing})")
    if len(parts) > MAX_NAMED_GROUPS:  # thousands of ranks stuck in many places: the reports have them all
        parts = [*parts[:MAX_NAMED_GROUPS], f"{len(parts) - MAX_NAMED_GROUPS} more groups of ranks elsewhere"]
    if common is not None:
        ranks = in_collective[common]
        if len(ranks) == world:
            parts.append(f"every rank {_WAITING['collective'][0]} ({common})")
        else:
            parts.append(f"{_span(ranks)} {_verb('collective', ranks)} ({common})")
    return f"[pretrain] hang: no progress for {allowance_s:.0f} s: {'; '.join(parts)}; stacks in {directory}"


def _verb(kind: str, ranks: list[int]) -> str:
    return _WAITING[kind][len(ranks) > 1]


def _who(ranks: list[int], states: dict[int, dict]) -> str:
    hosts = sorted({states[rank].get("host", "?") for rank in ranks})
    shown = ", ".join(hosts[:3]) + (f" and {len(hosts) - 3} more" if len(hosts) > 3 else "")
    return f"{_span(ranks)} ({'host' if len(hosts) == 1 else 'hosts'} {shown})"


def _span(ranks: list[int]) -> str:
    """'rank 3', 'ranks 0, 2-5'."""
    runs: list[list[int]] = []
    for rank in sorted(ranks):
        if runs and rank == runs[-1][1] + 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"{'ranks' if len(ranks) > 1 else 'rank'} {text}"


def _claim(path: Path) -> bool:
    """Whether this process created `path` (exclusively: one claimant among all ranks, on any node)."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _write_json(path: Path, value: dict) -> None:
    _write_text(path, json.dumps(value))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
