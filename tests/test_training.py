"""Training with real processes on CPU (gloo): layout parity, a run whose loss falls, exact resume after SIGTERM.

Parity tolerance: every layout computes the same float32 function of the same global batch; they differ only in
the order of float32 sums (gradient reduction over dp, tp all-reduces, micro-batch accumulation), about 1e-7
relative per step. Adam amplifies that little over 20 steps; 2e-4 relative on the loss leaves room for it while a
wrong shard, a missing gradient reduction or a skipped micro-batch moves the loss by 1e-2 or more.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
COMMON = [
    f"train.steps={STEPS}", "train.global_batch=8", "parallel.micro_batch=2", "logging.every_steps=1",
    "checkpoint.every_steps=0", "train.eval_every=0", "data.num_workers=0", "logging.tensorboard=false",
]


def train_command(run_dir: Path, data: list[str], overrides: list[str], nproc: int) -> list[str]:
    return [sys.executable, "-m", "launch.cli", "train", str(ROOT / "configs" / "tiny.yaml"), *data, *COMMON,
            *overrides, "--nproc", str(nproc), "--run-dir", str(run_dir)]


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def train(run_dir: Path, data: list[str], overrides: list[str] = (), nproc: int = 1) -> dict[int, float]:
    result = subprocess.run(train_command(run_dir, data, list(overrides), nproc), cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return losses(run_dir)


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    return train(tmp_path_factory.mktemp("single"), tiny_data)


LAYOUTS = {
    "dp2-zero1": (["parallel.zero_stage=1"], 2),
    "dp2-zero2": (["parallel.zero_stage=2"], 2),
    "dp2-zero3": (["parallel.zero_stage=3"], 2),
    "tp2": (["parallel.tp=2"], 2),
    "pp2": (["parallel.pp=2"], 2),
    "tp2-pp2": (["parallel.tp=2", "parallel.pp=2"], 4),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_process(layout, reference, tiny_data, tmp_path):
    overrides, nproc = LAYOUTS[layout]
    got = train(tmp_path / layout, tiny_data, overrides, nproc)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert abs(got[step] - loss) <= 2e-4 * abs(loss), f"{layout} step {step}: {got[step]} vs {loss}"


def test_two_process_run_learns_and_writes_metrics_and_plot(reference, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    got = train(run_dir, tiny_data, ["parallel.zero_stage=1", "train.eval_every=10"], 2)
    assert got[STEPS] < got[1] - 1.0, got
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_record = next(r for r in records if r["kind"] == "train")
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_gpu", "step_time_s", "data_wait_s",
                "memory_gib"):
        assert key in train_record
    assert any(r["kind"] == "eval" for r in records)
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert (run_dir / "config.yaml").is_file()


@pytest.mark.parametrize("layout", ["dp2-zero1", "tp2"])
def test_sigterm_then_resume_is_bit_exact(layout, tiny_data, tmp_path):
    overrides, nproc = LAYOUTS[layout]
    uninterrupted = train(tmp_path / "whole", tiny_data, overrides, nproc)
    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen(train_command(run_dir, tiny_data, list(overrides), nproc), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 75
    stopped_at = max(losses(run_dir))
    assert stopped_at < STEPS
    resumed = train(run_dir, tiny_data, overrides, nproc)
    assert resumed == uninterrupted  # every step's loss, to the last bit
    assert os.path.isdir(run_dir / "checkpoints" / f"step_{stopped_at:08d}")
