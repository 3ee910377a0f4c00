"""benchmarks/peer_transformers.py, the transformers loop the trainer is compared with, runs and reports."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peer_transformers.py"


def test_peer_benchmark_smoke_trains_and_reports_tokens_per_second():
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["tokens_per_s"] > 0 and report["step_time_s"] > 0
    # A tiny model from random init on random tokens over 256 symbols: the loss starts near ln(256) = 5.5.
    assert 4.0 < report["loss"] < 7.0
