"""Helpers for tests that run `pretrain train` as a user would: real processes on the tiny preset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Short runs: metrics every step, no evaluation or TensorBoard, data read in the training process.
QUICK = ["train.global_batch=8", "logging.every_steps=1", "train.eval_every=0", "data.num_workers=0",
         "logging.tensorboard=false"]


def train_command(run_dir: Path, data: list[str], overrides: list[str], nproc: int = 1,
                  args: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "launch.cli", "train", str(ROOT / "configs" / "tiny.yaml"), *data, *QUICK,
            *overrides, "--nproc", str(nproc), "--run-dir", str(run_dir), *args]


def run_train(run_dir: Path, data: list[str], overrides: list[str] = (), nproc: int = 1, args: list[str] = (),
              timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(run_dir, data, list(overrides), nproc, list(args)), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def train(run_dir: Path, data: list[str], overrides: list[str] = (), nproc: int = 1,
          args: list[str] = ()) -> dict[int, float]:
    """Train to the end (it must succeed) and return the loss of every step."""
    result = run_train(run_dir, data, overrides, nproc, args)
    assert result.returncode == 0, result.stderr[-4000:]
    return losses(run_dir)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    """The loss of each step; a step repeated after a resume or rollback keeps its latest value."""
    return {r["step"]: r["loss"] for r in metrics(run_dir) if r["kind"] == "train"}


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one-line error a failed run printed (the last line mentioning 'error:')."""
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert lines, result.stderr[-3000:]
    return lines[-1]
