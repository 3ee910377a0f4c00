"""benchmarks/fp8_loss_parity.py makes its data with the user's commands, trains each recipe and reports against
bf16 (on CPU: the bf16 run alone, float32; FP8 is refused there)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fp8_loss_parity.py"


def test_parity_smoke_trains_evaluates_and_plots(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--recipes", "off"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    curves = json.loads((tmp_path / "losses.json").read_text())
    assert sorted(map(int, curves["off"]["train"])) == list(range(1, 7))
    assert sorted(map(int, curves["off"]["eval"])) == [3, 6]
    assert (tmp_path / "fp8_loss.png").stat().st_size > 10_000
    [row] = [line.split() for line in done.stdout.splitlines() if line.split()[:1] == ["off"]]
    assert row[1:3] == ["0", "6"] and row[5] == "+0.00%"
