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
    assert benchmark.main(["--smoke", "--loader-requirement", "1000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith(("tokenize:", "load:"))]
    assert len(rows) == 3 + 5
    rates = [re.search(r"([\d.]+) (MB/s|M tok/s)", row) for row in rows]
    assert all(rate and float(rate.group(1)) > 0 for rate in rates), rows
    assert lines[-1].startswith("requirement: TokenLoader >= 0.001 M tokens/s per process: met")


def test_an_unmet_requirement_exits_1_with_one_line(capsys):
    # No loader reaches a trillion tokens/s: the requirement fails, as a slow loader's would at 5 M.
    assert benchmark.main(["--smoke", "--loader-requirement", "1e12"]) == 1
    captured = capsys.readouterr()
    assert "requirement: TokenLoader" not in captured.out
    lines = captured.err.splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(r"benchmarks/data.py: requirement NOT met: TokenLoader reached [\d.]+ M tokens/s per "
                        r"process, below 1e\+06 M", lines[0])
