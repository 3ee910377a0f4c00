"""ZeRO stages in bfloat16 on one GPU: stages 1-3 train; stage 0, which DeepSpeed 0.19 runs in bfloat16 only with
bfloat16 gradient accumulation, is refused with one line, also where train.dtype=auto becomes bfloat16 on the GPU
(the config's validation cannot know that; the engine's build checks it)."""

import pytest
import torch

from tests.runs import error_line, losses, run_train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHORT = ["train.steps=3", "checkpoint.every_steps=0", "model.attention_backend=sdpa"]


def test_zero_0_with_auto_dtype_is_refused_in_one_line(tiny_data, tmp_path):
    result = run_train(tmp_path / "run", tiny_data, [*SHORT, "parallel.zero_stage=0"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_line(result).endswith(
        "error: parallel.zero_stage=0 with bfloat16 (train.dtype=auto on a GPU): DeepSpeed keeps float32 master "
        "weights and float32 gradient accumulation only under ZeRO (stage 1 at dp=1 partitions nothing and costs "
        "nothing); set parallel.zero_stage=1 (or train.dtype=float32)")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_in_bfloat16(stage, tiny_data, tmp_path):
    result = run_train(tmp_path / "run", tiny_data, [*SHORT, "train.dtype=bfloat16", f"parallel.zero_stage={stage}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]
