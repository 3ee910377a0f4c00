import importlib.util
from pathlib import Path

import torch

# benchmarks/ is a folder of scripts, not a package: load the script by path.
_spec = importlib.util.spec_from_file_location(
    "attention_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "attention.py"
)
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)


def test_attended_pairs_counts_the_mask():
    for seq_len, window in [(10, None), (10, 4), (10, 10), (7, 1)]:
        query = torch.arange(seq_len)[:, None]
        key = torch.arange(seq_len)[None, :]
        allowed = (key <= query) & (key > query - (window or seq_len))
        assert benchmark.attended_pairs(seq_len, window) == allowed.sum().item()


def test_smoke_run_prints_a_row_per_backend_and_size(capsys):
    benchmark.main(["--smoke"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    timed = [row for row in rows if row and row[0] in ("sdpa", "flex")]
    assert len(timed) == 2 * 2 * 2  # backends x sequence lengths x (full, window)
    assert all(float(row[3]) > 0 for row in timed)
