import importlib.util
import re
from pathlib import Path

# benchmarks/ is a folder of scripts, not a package: load the script by path.
_spec = importlib.util.spec_from_file_location(
    "data_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "data.py"
)
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)


def test_smoke_run_prints_every_row(capsys):
    assert benchmark.main(["--smoke"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith(("tokenize:", "load:"))]
    assert len(rows) == 3 + 5
    rates = [re.search(r"([\d.]+) (MB/s|M tok/s)", row) for row in rows]
    assert all(rate and float(rate.group(1)) > 0 for rate in rates), rows
    assert lines[-1].startswith("requirement: TokenLoader >= 5 M tokens/s per process")
