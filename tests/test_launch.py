"""The launchers without a Slurm cluster: a clean terminal with the library noise in each rank's log, the srun
task's torchrun variables and its rendezvous error, the run directory's one source, `pretrain submit` on a machine
without Slurm."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from launch.rank import torchrun_from_slurm
from pretrain.config import load_config, save_resolved
from tests.runs import ROOT, error_line, run_train

# Only the Python of the environment: no Slurm commands (the Slurm tests install them in /usr/bin).
WITHOUT_SLURM = {**os.environ, "PATH": str(Path(sys.executable).parent)}


def test_terminal_shows_the_run_and_each_rank_log_keeps_the_library_noise(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(run_dir, tiny_data, ["train.steps=2", "parallel.micro_batch=4"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    first_step = next(i for i, line in enumerate(lines) if line.startswith("[train] step 1/2"))
    assert [line for line in lines[:first_step] if "warning" in line.lower()] == []
    assert lines[0].startswith("pretrain train: 2 process(es)")
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank{rank:05d}.log").read_text()
        assert log.count("UserWarning: Transformer Engine and Apex are not installed") == 4, log
        assert "[WARNING]" in log and "Setting accelerator to CPU" in log  # DeepSpeed's logger, at its import
        assert log.startswith(f"[pretrain] rank {rank} of 2 on host {socket.gethostname()}, rendezvous at 127.0.0.1:")


def test_srun_task_gets_torchrun_variables_from_slurm():
    env = {"SLURM_PROCID": "7", "SLURM_NTASKS": "7", "SLURM_LOCALID": "0", "SLURM_NODEID": "3",
           "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_JOB_ID": "123456", "MASTER_ADDR": "gpu01"}
    assert torchrun_from_slurm(env) == {"RANK": "7", "WORLD_SIZE": "7", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                                        "MASTER_ADDR": "gpu01", "MASTER_PORT": str(20000 + 123456 % 40000)}


def test_srun_task_without_scontrol_is_a_one_line_rendezvous_error(tmp_path):
    env = {key: value for key, value in WITHOUT_SLURM.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_JOB_ID="42", SLURM_JOB_NODELIST="node[01-02]")
    result = subprocess.run([sys.executable, "-m", "launch.rank", str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("[pretrain] rank 1: error: cannot run scontrol to expand "
                                    "SLURM_JOB_NODELIST='node[01-02]'")
    assert len(result.stderr.splitlines()) == 1 and "set MASTER_ADDR yourself" in result.stderr


def test_rank_refuses_a_config_that_names_another_run_directory(tiny_data, tmp_path):
    run_dir = tmp_path / "copy"
    run_dir.mkdir()
    save_resolved(load_config(ROOT / "configs" / "tiny.yaml", [*tiny_data, f"train.run_dir={tmp_path / 'original'}"]),
                  run_dir / "config.yaml")
    result = subprocess.run([sys.executable, "-m", "launch.rank", str(run_dir)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert (f"{run_dir / 'config.yaml'} has train.run_dir={tmp_path / 'original'}, not the directory it lies in"
            in error_line(result))
    assert not (tmp_path / "original").exists()


def test_submit_without_slurm_dry_run_prints_the_script_and_a_real_submit_says_what_is_missing(tmp_path):
    def submit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "launch.cli", "submit", *args], cwd=ROOT, env=WITHOUT_SLURM,
                              capture_output=True, text=True, timeout=120)

    dry = submit("configs/mistral-7b-8x8.yaml", "--run-dir", str(tmp_path / "7b"), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("#!/bin/bash") and "#SBATCH --nodes=8" in dry.stdout
    assert "#SBATCH --gpus-per-node=8" in dry.stdout and "submitit.core._submit" in dry.stdout
    real = submit("configs/tiny.yaml", "--run-dir", str(tmp_path / "tiny"))
    assert real.returncode == 2
    assert real.stderr.splitlines() == ["pretrain submit: error: sbatch and srun not found on PATH: submit from a "
                                        "machine of the Slurm cluster (or put Slurm's commands on PATH); --dry-run "
                                        "prints the batch script without Slurm"]
    assert not (tmp_path / "7b").exists() and not (tmp_path / "tiny").exists()
