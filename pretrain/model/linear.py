"""megatron-core's tensor-parallel linear with its matmul swapped, and the weight gradient accumulated in float32 by
the matmul that computes it.

ColumnParallelLinear and RowParallelLinear do their tensor-parallel communication around one call,
`_forward_impl(input, weight, ...)` (megatron's `linear_with_grad_accumulation_and_async_allreduce`, which
traceable_megatron.py teaches the compiler). `linear_with_matmul` is that call with another matmul: float8's
(float8.py) or `matmul_into_float32_gradient`, set on a layer as an instance attribute over megatron's method.

Weight gradients straight into float32 (megatron's gradient_accumulation_fusion): with bf16 weights, DeepSpeed
(ZeRO-1; stage 0 runs in float32) keeps each weight's gradient in float32 and adds every micro-batch's into it, so
each weight-gradient matmul wrote a bf16 gradient that a second kernel then read and added. Here the matmul reads
the float32 gradient and writes the sum (cuBLAS's beta = 1, `torch.addmm(..., out_dtype=torch.float32)`): one pass
less over every weight per micro-batch, and the micro-batch's gradient is no longer rounded to bf16 before it is
added. On one H200, at the 8-layer slice of the 7B (8 micro-batches of 8192 tokens), the weight-gradient matmuls
and their adds took 318 ms per step fused against 344 (benchmarks/wgrad_accumulation.py). megatron needs apex's
`fused_weight_gradient_mlp_cuda` for this; PyTorch's addmm does it. A fused weight gets no gradient from autograd:
its float32 gradient is `weight.main_grad`, attached once DeepSpeed's optimizer exists
(pretrain/training/converters.py).

Its backward pass computes the input gradient before the weight gradient, and at tp > 1 a column-parallel layer
(without sequence parallelism) issues the input gradient's all-reduce between the two, so that it runs while the
weight gradient is computed, as in megatron's own linear; issued after the backward pass, it waited for both matmuls.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region
from megatron.core.utils import get_tensor_model_parallel_group_if_none
from torch import nn


def linear_with_matmul(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                       grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None, *, matmul,
                       matmul_reduces_input_gradient=False):
    """megatron's tensor-parallel linear (`linear_with_grad_accumulation_and_async_allreduce`, the same arguments)
    with `matmul(input, weight)` as its matmul, input (..., K) @ weight (N, K).T.

    Column-parallel: with sequence parallelism the sequence is gathered first (backward: the input gradient is
    reduce-scattered); without it the input gradient is all-reduced over the tensor-parallel ranks, after the
    matmul's backward pass, or inside it where `matmul_reduces_input_gradient`: then it is called as
    `matmul(input, weight, input_gradient_group=group)` and can overlap the all-reduce with its weight-gradient
    matmul. Row-parallel layers pass neither, and reduce their output themselves."""
    assert not gradient_accumulation_fusion and grad_output_buffer is None, "megatron options the model never sets"
    tp_group = get_tensor_model_parallel_group_if_none(tp_group)
    if sequence_parallel:
        input = funcol.all_gather_tensor_autograd(input, 0, tp_group)  # [S / tp, B, D] -> [S, B, D]
    elif allreduce_dgrad and matmul_reduces_input_gradient:
        matmul = functools.partial(matmul, input_gradient_group=tp_group)
    elif allreduce_dgrad:
        input = copy_to_tensor_model_parallel_region(input, group=tp_group)
    output = matmul(input, weight)
    return output if bias is None else output + bias


def swap_matmul(module: nn.Module, matmul, matmul_reduces_input_gradient: bool = False) -> None:
    """Make a tensor-parallel linear layer multiply with `matmul(input, weight)` (see linear_with_matmul)."""
    module._forward_impl = functools.partial(linear_with_matmul, matmul=matmul,
                                             matmul_reduces_input_gradient=matmul_reduces_input_gradient)


@torch.library.custom_op("pretrain::accumulate_weight_gradient", mutates_args=("main_grad",))
def accumulate_weight_gradient(grad_output: torch.Tensor, input: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad (N, K, float32) += grad_output (T, N).T @ input (T, K), summed in float32 and added unrounded. An
    operator of its own: the compiled backward keeps it whole, a matmul that writes into the float32 gradient."""
    if main_grad.is_cuda:
        torch.addmm(main_grad, grad_output.t(), input, out_dtype=torch.float32, out=main_grad)
    else:  # torch's CPU build has no addmm into another dtype
        main_grad.addmm_(grad_output.t().float(), input.float())


class MatmulIntoFloat32Gradient(torch.autograd.Function):
    """input (..., K) @ weight (N, K).T, whose weight gradient is added into `main_grad` (float32, the weight's
    shape) by the matmul that computes it; autograd gets none for the weight. With an `input_gradient_group`, the
    input gradient is all-reduced over it while the weight-gradient matmul runs (megatron's linear does the same)."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor, main_grad: torch.Tensor,
                input_gradient_group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.save_for_backward(input, weight)
        # Not saved as a tensor: every weight's float32 gradient is a view of one buffer, so the first add into any
        # of them would fail the saved tensors' version check of all the others.
        ctx.main_grad = main_grad
        ctx.input_gradient_group = input_gradient_group
        return torch.matmul(input, weight.t())

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, weight = ctx.saved_tensors
        # The input gradient first: the backward pass of the layers below waits for it (and for its all-reduce), the
        # weight gradient only the optimizer step does, so the all-reduce runs while the weight gradient is computed.
        grad_input = torch.matmul(grad_output, weight)
        if ctx.input_gradient_group is not None:
            # A functional collective: issued here, waited for where the gradient is first used (traceable, as the
            # compiled layers' other collectives).
            grad_input = funcol.all_reduce(grad_input, "sum", ctx.input_gradient_group)
        accumulate_weight_gradient(grad_output.reshape(-1, grad_output.shape[-1]), input.reshape(-1, input.shape[-1]),
                                   ctx.main_grad)
        return grad_input, None, None, None


def matmul_into_float32_gradient(input: torch.Tensor, weight: torch.Tensor,
                                 input_gradient_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """`MatmulIntoFloat32Gradient` into the weight's float32 gradient (`weight.main_grad`)."""
    main_grad = getattr(weight, "main_grad", None)
    if main_grad is None:
        raise RuntimeError("a weight whose gradient goes straight into float32 was used before its float32 gradient "
                           "was attached (pretrain.training.converters)")
    return MatmulIntoFloat32Gradient.apply(input, weight, main_grad, input_gradient_group)


def use_float32_weight_gradients(layers: Iterable[nn.Module]) -> list[nn.Parameter]:
    """Make the tensor-parallel linear `layers` add their weight gradients into `weight.main_grad`; returns their
    weights, whose `main_grad` the caller attaches before the first backward pass."""
    weights = []
    for layer in layers:
        swap_matmul(layer, matmul_into_float32_gradient, matmul_reduces_input_gradient=True)
        weights.append(layer.weight)
    return weights
