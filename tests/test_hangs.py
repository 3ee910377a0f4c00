"""A hang is named in one line and ends the run with EXIT_HANG (pretrain.training.hang), with real processes (gloo on
CPU, the tiny preset) and a hang timeout of 15 s: a rank stopped with SIGSTOP, a rank whose evaluation data never
comes, a rank that skips a collective. Each line names the right rank, its host and what it waits in; the run ends
within the timeout + 30 s, every thread's stack of each reporting rank is on disk, and no process is left. Evaluation
forks no process (a fork per evaluation was how the pipelined run with a data worker hung) and reads the same batches
each time. A start does not stall on the lock file that a killed build of a DeepSpeed op leaves behind
(pretrain.training.op_builds).
"""

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from pretrain.launch_contract import EXIT_HANG
from pretrain.training.op_builds import extensions_dir
from tests.runs import ROOT, Watched, losses, metrics, train_command

TIMEOUT_S = 15
# Ended within this of the hang: its timeout, the others' reports, SIGKILL for the rest.
ENDED_WITHIN_S = TIMEOUT_S + 30
# Without restarts (launch.restarts): each test ends at the hang it reports.
HANG = [f"train.hang_timeout_s={TIMEOUT_S}", "train.steps=1000", "checkpoint.every_steps=0", "launch.max_restarts=0"]
HOST = socket.gethostname()


def start(tmp_path: Path, tiny_data: list[str], overrides: list[str], nproc: int = 2) -> Watched:
    return Watched(train_command(tmp_path / "run", tiny_data, HANG + overrides, nproc=nproc), tmp_path / "stderr.log")


def wait_for_step(run: Watched, run_dir: Path, step: int) -> float:
    """When the run logged training step `step`."""
    run.wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and step in losses(run_dir), timeout=600)
    return time.monotonic()


def the_hang_line(run: Watched) -> str:
    """The run's one line about the hang, which must be all it said after training began."""
    stderr = run.stderr()
    assert "Traceback" not in stderr and "error:" not in stderr, stderr[-3000:]
    [line] = [line for line in stderr.splitlines() if "hang:" in line]
    assert line.startswith(f"[pretrain] hang: no progress for {TIMEOUT_S} s: ")
    return line


def reports(run_dir: Path) -> dict[int, dict]:
    """Each reporting rank's report, with every thread's stack that it wrote beside it as "stacks"."""
    [hang_dir] = (run_dir / "hangs").iterdir()
    assert (hang_dir / "summary.txt").read_text().startswith("[pretrain] hang: ")
    found = {}
    for path in sorted(hang_dir.glob("rank*.json")):
        report = json.loads(path.read_text())
        found[report["rank"]] = {**report, "stacks": path.with_suffix(".txt").read_text()}
    return found


def test_a_stopped_rank_is_named_as_not_responding(tiny_data, tmp_path):
    """Rank 1 is stopped with SIGSTOP after step 2 (its heartbeat stops); rank 0 waits for it in a collective. With a
    data worker each: the launcher ends the stopped rank and its worker with SIGKILL."""
    run = start(tmp_path, tiny_data, ["data.num_workers=1"])
    run_dir = tmp_path / "run"
    wait_for_step(run, run_dir, 2)
    _, rank1 = run.started_ranks(2)
    rank1.suspend()
    stopped = time.monotonic()
    assert run.wait(timeout=ENDED_WITHIN_S + 30) == EXIT_HANG, run.stderr()[-3000:]
    assert time.monotonic() - stopped < ENDED_WITHIN_S
    line = the_hang_line(run)
    assert f"rank 1 (host {HOST}) does not respond (last: " in line, line  # its last heartbeat's news
    assert "; rank 0 waits in a collective (step " in line, line
    [report] = reports(run_dir).values()
    assert report["rank"] == 0 and "torch/distributed/distributed_c10d.py" in report["stacks"]
    assert not run.left_behind()


def test_an_evaluation_loader_that_never_returns_is_named(tiny_data, tmp_path):
    run = start(tmp_path, tiny_data, ["train.eval_every=2", "train.inject_hang=eval_data",
                                      "train.inject_hang_at_step=2"])
    run_dir = tmp_path / "run"
    evaluating = wait_for_step(run, run_dir, 2)
    assert run.wait(timeout=ENDED_WITHIN_S + 30) == EXIT_HANG, run.stderr()[-3000:]
    assert time.monotonic() - evaluating < ENDED_WITHIN_S
    assert ("train.inject_hang=eval_data: rank 1 never gets its evaluation data after step 2 (a test of hang "
            "reports)") in run.stderr()
    line = the_hang_line(run)
    assert (f"rank 1 (host {HOST}) waits for data (step 2, evaluation batch 1, reading micro-batch 1); "
            "rank 0 waits in a collective (step 2, evaluation loss all-reduce); stacks in "
            f"{run_dir / 'hangs'}") in line, line
    found = reports(run_dir)
    assert (found[0]["waits_in"], found[1]["waits_in"]) == ("collective", "data")
    assert "in _never_returning" in found[1]["stacks"] and "in all_reduce" in found[0]["stacks"]
    assert not run.left_behind()


def test_a_rank_that_skips_a_collective_is_named(tiny_data, tmp_path):
    """Of four data-parallel ranks, rank 3 skips step 2's stop-signal poll: the other three wait for it there, while
    it goes on into step 3 and waits in its first collective."""
    run = start(tmp_path, tiny_data, ["parallel.micro_batch=2", "train.inject_hang=collective",
                                      "train.inject_hang_at_step=2"], nproc=4)
    run_dir = tmp_path / "run"
    skipped = wait_for_step(run, run_dir, 2)
    assert run.wait(timeout=ENDED_WITHIN_S + 30) == EXIT_HANG, run.stderr()[-3000:]
    assert time.monotonic() - skipped < ENDED_WITHIN_S
    line = the_hang_line(run)
    assert (f"rank 3 (host {HOST}) waits in a collective at another point than the others (step 3, micro-batch 1); "
            "ranks 0-2 wait in a collective (step 2, stop-signal poll)") in line, line
    assert {rank: report["waits_in"] for rank, report in reports(run_dir).items()} == dict.fromkeys(range(4),
                                                                                                    "collective")
    assert not run.left_behind()


def test_evaluation_forks_no_process_and_reads_the_same_batches(tiny_data, tmp_path):
    """Evaluation reads its batches in the rank. It used to fork a fresh data worker at every evaluation: a copy of a
    rank that runs other threads, which waits forever for any lock one of them held at that moment (the pipelined
    run with a data worker that hung at its first evaluation). Pipelined, a training worker per rank, evaluating every
    step: each rank forks that one worker and no other process; with weights that do not move (a learning rate of
    1e-30), every evaluation gives the same loss, to the last bit."""
    run_dir = tmp_path / "run"
    run = Watched(train_command(run_dir, tiny_data, ["parallel.pp=2", "data.num_workers=1", "train.steps=4",
                                                     "train.eval_every=1", "optim.lr=1e-30", "optim.min_lr=0",
                                                     "optim.weight_decay=0"], nproc=2), tmp_path / "stderr.log")
    assert run.wait(timeout=600) == 0, run.stderr()[-3000:]
    evaluations = {r["step"]: r["loss"] for r in metrics(run_dir) if r["kind"] == "eval"}
    assert sorted(evaluations) == [1, 2, 3, 4] and len(set(evaluations.values())) == 1, evaluations
    ranks = run.children_of(run.proc.pid)
    forks = [[p for p in run.children_of(rank.pid) if run.cmdline[p.pid] == run.cmdline[rank.pid]] for rank in ranks]
    assert len(ranks) == 2 and [len(of_rank) for of_rank in forks] == [1, 1], run.cmdline


def test_a_lock_left_by_a_killed_op_build_does_not_stall_a_start(tiny_data, tmp_path):
    """DeepSpeed builds its shared-memory op at every start (on CPU) under a lock file that a build killed midway
    leaves behind: the next start removes it, saying so, and trains."""
    ops = tmp_path / "torch_extensions"
    if extensions_dir().is_dir():  # this environment's builds, up to date: the start does not compile again
        shutil.copytree(extensions_dir(), ops, ignore=shutil.ignore_patterns(".builders", "lock"))
    lock = ops / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()  # as torch's FileBaton leaves it: an empty file, no holder recorded
    command = train_command(tmp_path / "run", tiny_data, ["train.steps=1", "checkpoint.save_final=false",
                                                          "train.startup_timeout_s=300"])
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TORCH_EXTENSIONS_DIR": str(ops)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"[pretrain] removed {lock}, which a killed build of that op left (no process was building)"
            in result.stderr)
    assert not lock.exists() and (lock.parent / "deepspeed_shm_comm.so").is_file()
