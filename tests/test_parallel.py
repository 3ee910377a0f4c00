import ast
from pathlib import Path

import pytest
import torch.distributed as dist

from pretrain import parallel
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]


def layout_worker(tp: int) -> dict:
    parallel.init_distributed(tp=tp, pp=1)
    [total] = parallel.all_reduce_numbers([1.0], group=parallel.tp_group())
    [largest, smallest] = parallel.all_reduce_numbers([dist.get_rank(), -dist.get_rank()], op=dist.ReduceOp.MAX)
    return {
        "backend": dist.get_backend(),
        "tp": (parallel.tp_rank(), parallel.tp_size()),
        "dp": (parallel.dp_rank(), parallel.dp_size()),
        "pp": (parallel.pp_rank(), parallel.pp_size()),
        "tp_group_sum": total,
        "max": (largest, smallest),
    }


def test_two_processes_tp2_and_dp2():
    tp2 = run_distributed(layout_worker, 2, 2)
    assert [r["tp"] for r in tp2] == [(0, 2), (1, 2)]
    assert [r["dp"] for r in tp2] == [(0, 1), (0, 1)]
    assert all(r["backend"] == "gloo" and r["pp"] == (0, 1) and r["tp_group_sum"] == 2.0 for r in tp2)
    assert all(r["max"] == (1.0, 0.0) for r in tp2)
    dp2 = run_distributed(layout_worker, 2, 1)
    assert [r["tp"] for r in dp2] == [(0, 1), (0, 1)]
    assert [r["dp"] for r in dp2] == [(0, 2), (1, 2)]
    assert all(r["tp_group_sum"] == 1.0 for r in dp2)


def test_world_must_divide_into_model_parallel_groups(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="not divisible"):
        parallel.init_distributed(tp=3)


# Collectives whose tensors the caller makes from host values. NCCL takes CUDA tensors only and gloo, which the CPU
# tests run on, CPU ones too: a tensor made without the group's device passes every CPU test and crashes on GPUs (an
# evaluation once did, in every GPU run). So these are made in pretrain/parallel.py alone, which picks the device.
HOST_VALUE_COLLECTIVES = {"all_reduce", "reduce", "broadcast", "reduce_scatter", "reduce_scatter_tensor",
                          "all_reduce_coalesced"}


def test_collectives_of_host_values_go_through_parallel():
    offenders = []
    for path in sorted(p for folder in ("pretrain", "launch", "data_pipeline") for p in (ROOT / folder).rglob("*.py")):
        if path == ROOT / "pretrain" / "parallel.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in HOST_VALUE_COLLECTIVES and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "dist"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} dist.{node.func.attr}")
    assert not offenders, f"use parallel.all_reduce_numbers (its tensor is on the group's device): {offenders}"
