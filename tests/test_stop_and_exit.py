"""Every run ends, and ends everything it started (real processes, data workers included; nothing may be left):

- a finished run exits at once, pipelined too: DeepSpeed's pipeline engine keeps the last data iterator it was
  given, whose workers (which ignore stop signals) used to keep the ranks waiting at exit forever;
- a stop signal before the first step ends every rank within seconds with exit 1: during the imports, and while a
  rank is blocked in C (rank 0 in the rendezvous, waiting for a rank that is stopped), where no Python signal
  handler runs;
- a stop signal after a step makes every rank save that step and exit 75.
"""

import signal
import time

import psutil
import pytest

from tests.runs import Watched, losses, train_command

# The tiny preset's own setting (tests.runs.QUICK reads the data in the rank).
WORKERS = ["data.num_workers=1"]
LAYOUTS = {"pp2": ["parallel.pp=2"], "dp2": []}
# Stop signals before the first step end every rank within this (the launcher polls its ranks every 0.2 s).
STOP_WITHIN_S = 10
BEFORE_FIRST_STEP = "before the first step: exiting without saving"


def start(tmp_path, tiny_data, overrides: list[str]) -> Watched:
    command = train_command(tmp_path / "run", tiny_data, WORKERS + overrides, nproc=2)
    return Watched(command, tmp_path / "stderr.log")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_finished_run_exits_at_once_and_leaves_no_process(layout, tiny_data, tmp_path):
    run = start(tmp_path, tiny_data, LAYOUTS[layout] + ["train.steps=3", "train.eval_every=2"])
    run.wait_for((tmp_path / "run" / "loss.png").is_file, timeout=600)  # the last thing training does
    assert run.wait(timeout=60) == 0, run.stderr()[-3000:]
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]
    for rank in run.children_of(run.proc.pid):  # each rank read its data in a worker process (a fork of it)
        assert [p for p in run.children_of(rank.pid) if run.cmdline[p.pid] == run.cmdline[rank.pid]], run.cmdline
    assert not run.left_behind()


def test_stop_signal_during_imports_ends_every_rank_with_exit_1(tiny_data, tmp_path):
    run = start(tmp_path, tiny_data, ["parallel.pp=2"])
    run.started_ranks(2)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    signalled = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 1, run.stderr()[-3000:]
    assert time.monotonic() - signalled < STOP_WITHIN_S
    for rank in (0, 1):
        assert f"[pretrain] rank {rank}: signal SIGTERM {BEFORE_FIRST_STEP}" in run.stderr()
    assert not run.left_behind()


def test_stop_signal_while_a_rank_is_blocked_in_the_rendezvous_ends_it_with_exit_1(tiny_data, tmp_path):
    run = start(tmp_path, tiny_data, ["parallel.pp=2"])
    rank0, rank1 = run.started_ranks(2)
    rank1.suspend()  # SIGSTOP: rank 0 will wait for it in the rendezvous, in C
    port = int(rank0.environ()["MASTER_PORT"])
    try:
        run.wait_for(lambda: any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                                 for c in rank0.net_connections("tcp")), timeout=300)
        time.sleep(1)  # well inside the store's wait for rank 1
        signalled = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)  # the launcher forwards it; rank 1 gets it when it continues
        assert rank0.wait(timeout=STOP_WITHIN_S) is None  # not the launcher's child: psutil knows no exit code
        assert time.monotonic() - signalled < STOP_WITHIN_S
    finally:
        rank1.resume()
    assert run.wait(timeout=60) == 1, run.stderr()[-3000:]
    for rank in (0, 1):
        assert f"[pretrain] rank {rank}: signal SIGTERM {BEFORE_FIRST_STEP}" in run.stderr()
    assert not run.left_behind()


def test_stop_signal_after_a_step_saves_it_and_exits_75(tiny_data, tmp_path):
    run = start(tmp_path, tiny_data, ["parallel.pp=2", "train.steps=1000", "checkpoint.every_steps=0"])
    metrics_file = tmp_path / "run" / "metrics.jsonl"
    run.wait_for(lambda: metrics_file.is_file() and len(metrics_file.read_text().splitlines()) >= 2, timeout=600)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 75, run.stderr()[-3000:]
    stopped_at = max(losses(tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoints" / f"step_{stopped_at:08d}").is_dir()
    assert BEFORE_FIRST_STEP not in run.stderr()
    assert not run.left_behind()
