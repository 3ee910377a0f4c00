import pytest
import torch
import torch.distributed as dist

from pretrain import parallel
from tests.distributed import run_distributed


def layout_worker(tp: int) -> dict:
    parallel.init_distributed(tp=tp, pp=1)
    total = torch.tensor([1.0])
    dist.all_reduce(total, group=parallel.tp_group())
    return {
        "backend": dist.get_backend(),
        "tp": (parallel.tp_rank(), parallel.tp_size()),
        "dp": (parallel.dp_rank(), parallel.dp_size()),
        "pp": (parallel.pp_rank(), parallel.pp_size()),
        "tp_group_sum": total.item(),
    }


def test_two_processes_tp2_and_dp2():
    tp2 = run_distributed(layout_worker, 2, 2)
    assert [r["tp"] for r in tp2] == [(0, 2), (1, 2)]
    assert [r["dp"] for r in tp2] == [(0, 1), (0, 1)]
    assert all(r["backend"] == "gloo" and r["pp"] == (0, 1) and r["tp_group_sum"] == 2.0 for r in tp2)
    dp2 = run_distributed(layout_worker, 2, 1)
    assert [r["tp"] for r in dp2] == [(0, 1), (0, 1)]
    assert [r["dp"] for r in dp2] == [(0, 2), (1, 2)]
    assert all(r["tp_group_sum"] == 1.0 for r in dp2)


def test_world_must_divide_into_model_parallel_groups(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="not divisible"):
        parallel.init_distributed(tp=3)
