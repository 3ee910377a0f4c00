"""Faults a long run meets, each with real processes: SIGKILL at random moments (also during saves), a rank killed
or failing while its launcher restarts the ranks in place, non-finite steps and rollback, a full disk during a save,
an unwritable or corrupt checkpoint, an incompatible config, and collectives that outwait the hang watchdog (hangs
themselves: tests/test_hangs.py)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.restarts import read_restarts, restart_line
from pretrain.checkpoint.store import newest_valid, step_dir_name, verify
from pretrain.launch_contract import free_port
from tests.runs import ROOT, Watched, error_line, losses, metrics, resumed_step, run_train, train, train_command

STEPS = 12
# One optimizer step per batch and a checkpoint every step: saves are a large part of each run's life.
FAST = [f"train.steps={STEPS}", "parallel.micro_batch=8", "checkpoint.every_steps=1", "checkpoint.keep_last=2"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    return train(tmp_path_factory.mktemp("whole"), tiny_data, FAST)


def newest_valid_step(run_dir: Path) -> int | None:
    found, _ = newest_valid(run_dir / "checkpoints")
    return found.step if found else None


KILLS = 16


def test_sigkill_at_random_moments_resumes_from_the_newest_complete_checkpoint(uninterrupted, tiny_data, tmp_path):
    """Runs are killed with SIGKILL (half of the kills the moment a save is seen in progress) until KILLS kills
    have happened; every restart must resume from the newest checkpoint that verifies, and every run must end with
    the uninterrupted run's losses, to the last bit."""
    rng = random.Random(20261123)
    kills = kills_during_save = restarts = runs = 0
    started = time.monotonic()
    while kills < KILLS:
        runs += 1
        run_dir = tmp_path / f"run{runs}"
        while True:
            expected = newest_valid_step(run_dir) if run_dir.exists() else None
            log_path = tmp_path / f"run{runs}-{restarts}.log"
            with open(log_path, "w") as log:
                proc = subprocess.Popen(train_command(run_dir, tiny_data, FAST), cwd=ROOT, stdout=log, stderr=log,
                                        start_new_session=True)
                during_save = _kill_at_random_moment(proc, run_dir, rng) if kills < KILLS else False
                code = proc.wait(timeout=600)
            text = log_path.read_text()
            assert resumed_step(text) == expected, f"resumed {resumed_step(text)}, newest valid was {expected}"
            restarts += 1
            if code == 0:
                break
            assert code == -signal.SIGKILL, text[-3000:]
            kills += 1
            kills_during_save += during_save
        assert losses(run_dir) == uninterrupted
    with_print = (f"\n[kill test] {kills} SIGKILLs ({kills_during_save} during a save) over {runs} runs, "
                  f"{restarts} starts, {time.monotonic() - started:.0f} s: every restart resumed from the newest "
                  "complete checkpoint and every run ended with the uninterrupted losses")
    print(with_print)
    assert kills_during_save >= KILLS // 4


def _kill_at_random_moment(proc: subprocess.Popen, run_dir: Path, rng: random.Random) -> bool:
    """SIGKILL the whole process group once training is under way: either the moment a save is seen in progress or
    after a random delay. Returns whether a save was in progress. Does nothing if the run finishes first."""
    checkpoints = run_dir / "checkpoints"
    metrics_file = run_dir / "metrics.jsonl"
    lines_before = len(metrics_file.read_text().splitlines()) if metrics_file.exists() else 0
    while proc.poll() is None and (not metrics_file.exists()
                                   or len(metrics_file.read_text().splitlines()) <= lines_before):
        time.sleep(0.01)
    target_save = rng.random() < 0.5
    deadline = time.monotonic() + rng.uniform(0.0, 3.0)
    while proc.poll() is None:
        saving = checkpoints.is_dir() and any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())
        if (target_save and saving) or (not target_save and time.monotonic() >= deadline):
            os.killpg(proc.pid, signal.SIGKILL)
            return saving
        time.sleep(0.002)
    return False


# Two ranks, a checkpoint every 4 steps written in the background.
TWO_RANKS = ["train.steps=8", "parallel.micro_batch=4", "checkpoint.every_steps=4", "checkpoint.async_save=true"]


@pytest.fixture(scope="module")
def uninterrupted_two_ranks(tiny_data, tmp_path_factory):
    return train(tmp_path_factory.mktemp("whole2"), tiny_data, TWO_RANKS, nproc=2)


def test_a_killed_rank_is_restarted_in_place_and_the_run_ends_as_if_uninterrupted(uninterrupted_two_ranks, tiny_data,
                                                                                     tmp_path):
    """Rank 1 is killed (SIGKILL) after step 5: the launcher ends rank 0, starts both again from the checkpoint of
    step 4 and the run ends with exit 0 and the uninterrupted run's losses, to the last bit. The terminal says so in
    one line; RUN_DIR/restarts.jsonl and `pretrain status` (of the finished run) keep when, why and how long."""
    run_dir = tmp_path / "run"
    run = Watched(train_command(run_dir, tiny_data, TWO_RANKS, nproc=2), tmp_path / "stderr.log")
    run.wait_for(lambda: 5 in (losses(run_dir) if (run_dir / "metrics.jsonl").is_file() else {}), timeout=600)
    _, rank1 = run.started_ranks(2)
    rank1.kill()
    assert run.wait(timeout=600) == 0, run.stderr()[-3000:]
    assert losses(run_dir) == uninterrupted_two_ranks
    stderr = run.stderr()
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if "restarting" in line or line.startswith("[pretrain] restart")]
    assert line.startswith("[pretrain] restart 1 of 3: rank 1 was killed by SIGKILL after step ")
    assert line.endswith(f"; starting every rank again from checkpoint {step_dir_name(4)}"), line
    assert resumed_step(stderr) == 4
    [record] = read_restarts(run_dir)
    assert (record["rank"], record["exit_code"], record["checkpoint_step"]) == (1, -signal.SIGKILL, 4)
    parts = [record[key] for key in ("teardown_s", "start_s", "load_s", "first_step_s")]
    assert all(part >= 0 for part in parts) and record["next_step_s"] == pytest.approx(sum(parts), abs=0.01)
    shown = subprocess.run([sys.executable, "-m", "launch.cli", "status", str(run_dir), "--quick"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120).stdout
    assert "(finished)" in shown and f"  {restart_line(record)}" in shown.splitlines(), shown
    assert "rank 1 was killed by SIGKILL after step" in restart_line(record)
    assert not run.left_behind()


def test_an_error_at_the_same_step_after_a_restart_stops_the_run(tiny_data, tmp_path):
    """Rank 1 raises in step 5 (an exception, as a bug would), while the asynchronous save of step 4 is still pending:
    before the processes exit the save completes and is the newest checkpoint, the terminal shows the error in one
    line and the traceback is in the rank's log. The restart resumes from that checkpoint and fails at the same step:
    the launcher stops with one line naming it, rather than restart again."""
    run_dir = tmp_path / "run"
    result = run_train(run_dir, tiny_data, TWO_RANKS + ["train.inject_error_at_step=5"], nproc=2)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    rank_log = run_dir / "logs" / "rank00001.log"
    errors = [line for line in result.stderr.splitlines() if "rank 1: error:" in line]
    assert len(errors) == 2 and errors[0] == errors[1]
    assert errors[0].endswith(f"error: RuntimeError: train.inject_error_at_step=5: an error injected into this step "
                              f"(traceback in {rank_log})")
    assert "Traceback" in rank_log.read_text()
    assert "completed checkpoint step 4, which was being written when the error came" in result.stderr
    restarts = [line for line in result.stderr.splitlines()
                if "restarting" in line or line.startswith("[pretrain] restart")]
    assert restarts == [
        "[pretrain] restart 1 of 3: rank 1 failed (exit code 1) after step 4 (newest checkpoint step 4); starting "
        f"every rank again from checkpoint {step_dir_name(4)}",
        "[pretrain] rank 1 failed (exit code 1) after step 4 (newest checkpoint step 4), where the start before "
        "failed too: not restarting, it would fail there again; fix the cause, then run the same command to resume"]
    assert newest_valid_step(run_dir) == 4
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert resumed_step(result.stderr) == 4
    [record] = read_restarts(run_dir)
    assert record["next_step_s"] is None  # the restarted ranks failed before completing a step


def test_nonfinite_steps_are_skipped_then_rolled_back_past_the_bad_data(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    overrides = FAST + ["checkpoint.every_steps=5", "train.max_skipped_in_row=3",
                        "train.inject_nonfinite_batches=[7,8,9]"]
    result = subprocess.run(train_command(run_dir, tiny_data, overrides), cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 7: loss nan or its gradients are not finite: update skipped (1 in a row" in result.stderr
    assert f"resumed from {run_dir / 'checkpoints' / step_dir_name(5)} at step 5," in result.stderr
    records = [r for r in metrics(run_dir) if r["kind"] == "train"]
    assert [r["step"] for r in records] == [*range(1, 10), *range(6, STEPS + 1)]
    final = records[-1]
    assert (final["skipped_steps"], final["rollbacks"]) == (3, 1)
    assert all(r["loss"] == r["loss"] for r in records[9:])  # finite after the rollback


def test_loss_spikes_are_skipped_then_rolled_back_past_the_bad_data_and_a_replay_is_bitwise_equal(tiny_data,
                                                                                                    tmp_path):
    """The spike guard judges from step 5 (a window of 8); batch 5's loss, made 100 times larger, is skipped without
    an update; batches 7 and 8 in a row roll the run back to its step-6 checkpoint, and it goes on with batch 9. The
    same command run twice (at once, one process each) ends with the same bits; `pretrain status` shows the spikes."""
    steps = 9
    overrides = FAST + [f"train.steps={steps}", "checkpoint.every_steps=3", "train.max_skipped_in_row=2",
                        "train.spike_guard.window=8", "train.spike_guard.min_steps=4",
                        "train.inject_spike_batches=[5,7,8]"]
    runs = [tmp_path / "run", tmp_path / "replay"]
    procs = [subprocess.Popen(train_command(run_dir, tiny_data, overrides), cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for run_dir in runs]
    stderrs = [proc.communicate(timeout=600)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], stderrs[0][-3000:] + stderrs[1][-3000:]
    run_dir, stderr = runs[0], stderrs[0]
    assert "train.inject_spike_batches: the loss of global batches [5, 7, 8] is multiplied by 100" in stderr
    assert "step 5: loss " in stderr and "update skipped (1 in a row, 1 in all), global batch 5" in stderr
    assert f"resumed from {run_dir / 'checkpoints' / step_dir_name(6)} at step 6," in stderr
    records = metrics(run_dir)
    train_steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_steps] == [*range(1, 9), *range(7, steps + 1)]
    # Only the poisoned batches are spikes: the steps between them, judged against as few as 4, are not.
    spikes = [r for r in records if r["kind"] == "spike"]
    assert [(r["step"], r["global_batch"], r["samples"], r["exceeded"]) for r in spikes] == [
        (step, step, [(step - 1) * 8, step * 8], "loss") for step in (5, 7, 8)]
    assert all(r["loss"] > r["threshold"] == r["mean"] + 6 * r["std"] and r["grad_norm"] > 0 for r in spikes)
    assert (train_steps[-1]["skipped_steps"], train_steps[-1]["spike_steps"], train_steps[-1]["rollbacks"]) == (3, 3, 1)
    # The curve goes on where it was (after the rollback, batches 9 to 11 are ordinary ones).
    assert all(r["loss"] < 2 * train_steps[3]["loss"] for r in train_steps[8:])
    # No update for a skipped step: at step 6, after one spike, Adam and the schedule have taken 5 steps.
    at_6 = json.loads((run_dir / "checkpoints" / step_dir_name(6) / "trainer.json").read_text())
    assert (at_6["adam_step"], at_6["scheduler"]["last_epoch"], len(at_6["spikes"])) == (5, 5, 1)
    final = json.loads((run_dir / "checkpoints" / step_dir_name(steps) / "trainer.json").read_text())
    assert [spike["step"] for spike in final["spikes"]] == [5, 7, 8]
    assert final["counters"] == {"skipped_steps": 3, "spike_steps": 3, "rollbacks": 1}
    assert final["spike_window"] == json.loads((runs[1] / "checkpoints" / step_dir_name(steps) /
                                                "trainer.json").read_text())["spike_window"]
    assert losses(runs[1]) == losses(run_dir)
    shard = Path("checkpoints") / step_dir_name(steps) / "model" / "tp00-pp00-dp0000.safetensors"
    assert (runs[1] / shard).read_bytes() == (run_dir / shard).read_bytes()
    shown = subprocess.run([sys.executable, "-m", "launch.cli", "status", str(run_dir), "--quick"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120).stdout
    assert "(finished)" in shown
    assert "skipped steps: 3 (3 loss spikes, the others not finite), rollbacks: 1" in shown
    assert "loss spike skipped at step 5: loss " in shown and "global batch 5, samples 32-39" in shown


def test_divergence_that_persists_stops_with_a_clear_error(tiny_data, tmp_path):
    overrides = FAST + ["checkpoint.every_steps=2", "train.max_skipped_in_row=2", "train.max_rollbacks=1",
                        f"train.inject_nonfinite_batches=[{','.join(str(n) for n in range(4, 40))}]"]
    result = subprocess.run(train_command(tmp_path / "run", tiny_data, overrides), cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 2
    assert "after 1 rollbacks: lower optim.lr" in error_line(result)


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(uninterrupted, mount_tmpfs, tiny_data, tmp_path):
    # 90 MB: one tiny-model checkpoint (about 58 MB) fits, a second one does not.
    run_dir = mount_tmpfs("90m") / "run"
    result = run_train(run_dir, tiny_data, FAST + ["checkpoint.every_steps=4"])
    assert result.returncode == 2, result.stderr[-3000:]
    message = error_line(result)
    assert "checkpoint step 8" in message and "No space left on device" in message
    assert "newest complete checkpoint is step 4, untouched" in message
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", step_dir_name(4)]
    assert verify(checkpoints / step_dir_name(4)).step == 4
    # On a disk with room, the same run resumes from that checkpoint and ends as if nothing had happened.
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    assert train(moved, tiny_data, FAST + ["checkpoint.every_steps=4"]) == uninterrupted


def test_unwritable_run_directory_is_refused_before_training(mount_tmpfs, tiny_data):
    result = run_train(mount_tmpfs("1m", read_only=True) / "run", tiny_data, FAST)
    assert result.returncode == 2
    assert "is not writable (Read-only file system)" in error_line(result)


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("finished")
    train(run_dir, tiny_data, ["train.steps=4", "parallel.micro_batch=8", "checkpoint.every_steps=2"])
    return run_dir


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupt_newest_checkpoint_is_skipped_and_refused_by_name(finished_run, tiny_data, tmp_path):
    """The parameter files are hashed while they load: a flipped byte in the newest checkpoint's is found after
    they were read, and the run falls back to the one before."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    shard = run_dir / "checkpoints" / step_dir_name(4) / "model" / "tp00-pp00-dp0000.safetensors"
    flip_a_byte(shard)
    overrides = ["train.steps=4", "parallel.micro_batch=8", "checkpoint.every_steps=2"]
    result = run_train(run_dir, tiny_data, overrides, args=["--resume-from", str(shard.parents[1])])
    assert result.returncode == 2
    assert "does not match its sha256 in the manifest" in error_line(result)
    result = run_train(run_dir, tiny_data, overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert resumed_step(result.stderr) == 2
    assert f"skipping a damaged checkpoint: {shard} does not match its sha256" in result.stderr


def test_when_every_checkpoint_is_damaged_the_run_refuses_to_start_over(finished_run, tiny_data, tmp_path):
    """Damage may be found only once some of a checkpoint is loaded: with nothing intact to load instead, the run
    stops and says so rather than training on a half-loaded model (or from scratch, which would let retention delete
    the checkpoints)."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    for step in (2, 4):
        flip_a_byte(run_dir / "checkpoints" / step_dir_name(step) / "model" / "tp00-pp00-dp0000.safetensors")
    result = run_train(run_dir, tiny_data, ["train.steps=6", "parallel.micro_batch=8", "checkpoint.every_steps=2"])
    assert result.returncode == 2
    assert result.stderr.count("skipping a damaged checkpoint") == 2
    assert f"no checkpoint under {run_dir / 'checkpoints'} loads intact (each was skipped" in error_line(result)
    assert newest_valid_step(run_dir) is None and sorted(os.listdir(run_dir / "checkpoints")) == [
        "latest", step_dir_name(2), step_dir_name(4)]


def test_damage_found_by_one_rank_makes_every_rank_fall_back(tiny_data, tmp_path):
    """Two ranks split the hashing of a checkpoint's blocks; the damaged one is rank 1's to hash (in its own file),
    and both ranks skip that checkpoint and resume from the one before."""
    run_dir = tmp_path / "run"
    overrides = ["train.steps=4", "parallel.micro_batch=4", "checkpoint.every_steps=2"]
    train(run_dir, tiny_data, overrides, nproc=2)
    shard = run_dir / "checkpoints" / step_dir_name(4) / "model" / "tp00-pp00-dp0001.safetensors"
    flip_a_byte(shard)
    result = run_train(run_dir, tiny_data, ["train.steps=6"] + overrides[1:], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipping a damaged checkpoint: {shard} does not match its sha256" in result.stderr
    assert resumed_step(result.stderr) == 2


def test_missing_random_state_of_a_same_layout_checkpoint_is_refused(finished_run, tiny_data, tmp_path):
    """A checkpoint whose manifest lacks a rank's generator states (written by another program) cannot resume
    exactly in its own layout: refused by name instead of silently starting the generators from the seed."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    ckpt = run_dir / "checkpoints" / step_dir_name(4)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"]["rng/rank00000.pt"]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    (ckpt / "rng" / "rank00000.pt").unlink()
    result = run_train(run_dir, tiny_data, ["train.steps=6", "parallel.micro_batch=8"])
    assert result.returncode == 2
    assert f"{ckpt / 'rng' / 'rank00000.pt'} is missing although {ckpt} was saved in this layout" in error_line(result)


def test_a_checkpoint_before_any_applied_update_has_no_moments_and_resumes(tiny_data, tmp_path):
    """Step 1's update is skipped (its loss is made NaN), so the optimizer has no Adam moments yet: the checkpoint
    holds weights only, and resuming from it starts the moments at zero."""
    from safetensors import safe_open

    run_dir = tmp_path / "run"
    overrides = ["train.steps=1", "parallel.micro_batch=8", "train.inject_nonfinite_batches=[1]"]
    result = run_train(run_dir, tiny_data, overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the loss of global batches [1] is made NaN" in result.stderr
    shard = run_dir / "checkpoints" / step_dir_name(1) / "model" / "tp00-pp00-dp0000.safetensors"
    keys = set(safe_open(str(shard), framework="pt").keys())
    assert keys and all(key.startswith("param/") for key in keys)
    result = run_train(run_dir, tiny_data, ["train.steps=3", "parallel.micro_batch=8"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert resumed_step(result.stderr) == 1
    assert all(loss == loss for step, loss in losses(run_dir).items() if step > 1)


def test_checkpoint_of_another_model_is_refused(finished_run, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    result = run_train(run_dir, tiny_data, ["train.steps=6", "parallel.micro_batch=8", "model.hidden_dim=512"])
    assert result.returncode == 2
    assert "was saved with model.hidden_dim=688, this config has 512" in error_line(result)
    assert "[pretrain] restart" not in result.stderr  # bad input fails the same way again: not restarted


def test_collectives_wait_longer_than_the_hang_watchdog(tiny_data, tmp_path):
    """A collective that outlives the process group's timeout is aborted by NCCL's own watchdog, with no Python stack:
    the timeout lies past the hang watchdog's longest allowance (a collective of step 1 waits for ranks that still
    compile), so that a hang is reported by ours first. train.watchdog_s, the hang timeout's earlier name, still
    reads."""
    run_dir = tmp_path / "run"
    result = run_train(run_dir, tiny_data, ["train.steps=1", "train.watchdog_s=90", "train.startup_timeout_s=900",
                                            "checkpoint.save_final=false"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("collective timeout 960 s (train.hang_timeout_s=90, train.startup_timeout_s=900)"
            in (run_dir / "logs" / "rank00000.log").read_text())


@pytest.mark.parametrize(("overrides", "nproc", "expected"), [
    (["parallel.tp=2"], 3, "world size 3 is not divisible by parallel.tp * parallel.pp * parallel.cp = 2 * 1 * 1 = 2"),
    (["parallel.tp=3"], 3, "model.n_heads=8 is not divisible by parallel.tp=3"),
], ids=["layout-does-not-fit-world", "tp-does-not-divide-heads"])
def test_layout_errors_are_one_line_before_any_process_starts(overrides, nproc, expected, tiny_data, tmp_path):
    result = run_train(tmp_path / "run", tiny_data, FAST + overrides, nproc=nproc, timeout=120)
    assert result.returncode == 2
    assert expected in error_line(result)
    assert not (tmp_path / "run").exists()


def test_unreachable_master_is_a_named_error_not_a_hang(tiny_data, tmp_path):
    """Rank 1 of 2 whose rank 0 never starts: after train.rendezvous_timeout_s it names the address and exits 2."""
    run_dir = tmp_path / "run"
    assert run_train(run_dir, tiny_data, FAST + ["train.steps=1"]).returncode == 0  # writes config.yaml
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("rendezvous_timeout_s: 300", "rendezvous_timeout_s: 5"))
    port = str(free_port())
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "launch.rank", str(run_dir)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"rank 1 could not reach the master 127.0.0.1:{port} within 5 s" in error_line(result)
    assert time.monotonic() - started < 60
