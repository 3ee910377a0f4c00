"""GPU runs with NCCL in bf16: layout parity of the single-GPU run against dp=2 (ZeRO-1 and ZeRO-3) and tp=2; a
pipelined run with the presets' data workers that exits when done; a stop signal during startup that ends it.

Tolerance: bf16 rounds every matmul input to 8 significant bits (about 4e-3 relative) and the layouts round in
different places (sharded matmuls, all-reduces), so two layouts of one run drift apart by rounding, not by a
mechanism; 3e-2 relative on the loss over 20 steps bounds that drift, while a missing gradient reduction or a
wrong shard moves the loss by 1e-1 or more within a few steps at this learning rate.
"""

import signal
import time

import pytest
import torch

from tests.runs import Watched, losses, train, train_command

STEPS = 20
# SDPA: the layouts are under test here, not the attention kernels (tests/test_attention*.py), and it needs no
# compilation in each of the four runs.
COMMON = [f"train.steps={STEPS}", "parallel.micro_batch=2", "checkpoint.every_steps=0", "train.dtype=bfloat16",
          "model.attention_backend=sdpa"]
LAYOUTS = {"dp2-zero1": ["parallel.zero_stage=1"], "dp2-zero3": ["parallel.zero_stage=3"], "tp2": ["parallel.tp=2"]}

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]


@pytest.fixture(scope="module")
def single_gpu(tiny_data, tmp_path_factory):
    return train(tmp_path_factory.mktemp("single"), tiny_data, COMMON)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_layout_matches_single_gpu(layout, single_gpu, tiny_data, tmp_path):
    got = train(tmp_path / layout, tiny_data, COMMON + LAYOUTS[layout], nproc=2)
    assert got[STEPS] < got[1] - 1.0
    for step, loss in single_gpu.items():
        assert abs(got[step] - loss) <= 3e-2 * abs(loss), f"{layout} step {step}: {got[step]} vs {loss}"


# pp=2 as a user runs it: the presets' data workers and compiled decoder layers.
PIPELINED = ["parallel.pp=2", "data.num_workers=2", "train.dtype=bfloat16", "train.compile=true"]


def test_pipelined_run_with_data_workers_exits_when_done(tiny_data, tmp_path):
    run = Watched(train_command(tmp_path / "run", tiny_data, PIPELINED + ["train.steps=5"], nproc=2),
                  tmp_path / "stderr.log")
    assert run.wait(timeout=600) == 0, run.stderr()[-3000:]
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4, 5]
    assert not run.left_behind()


def test_stop_signal_during_startup_ends_every_gpu_rank(tiny_data, tmp_path):
    run = Watched(train_command(tmp_path / "run", tiny_data, PIPELINED + ["train.steps=1000"], nproc=2),
                  tmp_path / "stderr.log")
    run.started_ranks(2)
    time.sleep(5)  # into the imports, CUDA and NCCL setup, or the model build
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    signalled = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 1, run.stderr()[-3000:]
    assert time.monotonic() - signalled < 15
    assert not run.left_behind()
