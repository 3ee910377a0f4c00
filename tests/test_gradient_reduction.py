"""The data-parallel sum of bf16 gradients, in real processes over gloo (which reduces bf16 tensors on CPU as NCCL
does on GPUs): float32 by default in every ZeRO stage, bf16 only when parallel.grad_reduce_dtype asks for it.

Two ranks, one weight, two micro-batches each, through DeepSpeed's engine with the trainer's configuration: rank 0's
micro-batch gradients are 1 and 2^-12, rank 1's 2^-8 and 3 * 2^-12 (each exact in bf16). ZeRO-1 adds each rank's
micro-batches in float32 and then sums over ranks; ZeRO 2 and 3 sum each micro-batch over ranks and add the sums into
float32. Either way the float32 total is 1 + 2^-8 + 2^-10, exact in float32 and not in bf16 (8 significant bits: a
bf16 sum of 1 and 2^-8 is 1, of 1 + 2^-12 and 2^-8 + 3 * 2^-12 is 1 + 2^-7). DeepSpeed scales each micro-batch's
loss by 1/2 (the accumulation) and averages over the 2 ranks, which divides the total by 4 exactly: the gradient
norm it reports after the reduction is (1 + 2^-8 + 2^-10) / 4 when the sums are float32.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.runs import ROOT

MICRO_BATCH_GRADIENTS = {0: (1.0, 2.0**-12), 1: (2.0**-8, 3 * 2.0**-12)}
FLOAT32_MEAN = (1 + 2**-8 + 2**-10) / 4


class OneWeight(torch.nn.Module):
    """loss = w * x: the gradient of w is x."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * x).sum()


SETTINGS = [(stage, dtype) for dtype in (None, "bfloat16") for stage in (1, 2, 3)]


def reduced_gradient_norms(backend: str) -> dict[tuple[int, str | None], float]:
    """The gradient norm DeepSpeed reports after one step, for each (ZeRO stage, parallel.grad_reduce_dtype) of
    SETTINGS (None: the default), each a new engine in these processes; over gloo on CPU or NCCL on GPUs."""
    import os

    os.environ["DS_ACCELERATOR"] = "cuda" if backend == "nccl" else "cpu"
    import deepspeed

    from pretrain import parallel
    from pretrain.config import load_config, resolve_world
    from pretrain.training.engine import MegatronMPU, deepspeed_config
    from pretrain.training.optim import build_optimizer

    parallel.init_distributed(backend=backend)
    deepspeed.init_distributed(dist_backend=backend)
    norms = {}
    for zero_stage, grad_reduce_dtype in SETTINGS:
        overrides = ["train.dtype=bfloat16", "train.global_batch=4", "parallel.micro_batch=1",
                     f"parallel.zero_stage={zero_stage}", "data.tokenizer=null"]
        if grad_reduce_dtype is not None:
            overrides.append(f"parallel.grad_reduce_dtype={grad_reduce_dtype}")
        cfg = resolve_world(load_config(ROOT / "configs" / "tiny.yaml", overrides), 2)
        model = OneWeight()
        engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim, zero_stage),
                                          config=deepspeed_config(cfg), mpu=MegatronMPU())
        assert engine.gradient_accumulation_steps() == 2
        for gradient in MICRO_BATCH_GRADIENTS[parallel.dp_rank()]:
            engine.backward(engine(torch.tensor([gradient], dtype=torch.bfloat16, device=engine.device)))
            engine.step()
        norms[zero_stage, grad_reduce_dtype] = float(engine.get_global_grad_norm())
    return norms


BACKENDS = ["gloo", pytest.param("nccl", marks=[pytest.mark.gpu, pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")])]


@pytest.fixture(scope="module", params=BACKENDS)
def norms(request) -> dict[tuple[int, str | None], float]:
    rank0, rank1 = run_distributed(reduced_gradient_norms, 2, request.param)
    assert rank0 == rank1
    return rank0


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_bf16_gradients_are_summed_in_float32_unless_asked(norms, zero_stage):
    assert norms[zero_stage, None] == FLOAT32_MEAN
    bf16 = norms[zero_stage, "bfloat16"]
    assert bf16 != FLOAT32_MEAN and bf16 == pytest.approx(FLOAT32_MEAN, rel=2**-7)
