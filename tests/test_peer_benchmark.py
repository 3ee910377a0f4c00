"""benchmarks/peer_transformers.py, the transformers loop the trainer is compared with, runs and reports."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peer_transformers.py"


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_peer_benchmark_smoke_trains_and_reports_tokens_per_second(recompute):
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--recompute", recompute], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["recompute"] == recompute and report["float8"] == "off"
    assert report["tokens_per_s"] > 0 and report["step_time_s"] > 0
    # A tiny model from random init on random tokens over 256 symbols: the loss starts near ln(256) = 5.5.
    assert 4.0 < report["loss"] < 7.0


def test_float8_peer_is_refused_where_there_are_no_float8_matmuls():
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this GPU has float8 matmuls")
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--float8", "rowwise"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "--float8 needs a GPU with float8 matmuls" in done.stderr, done.stderr[-2000:]
