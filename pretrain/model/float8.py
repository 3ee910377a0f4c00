"""FP8 training of the tensor-parallel linear layers (`train.fp8`), through torchao's float8 matmul.

torchao's `convert_to_float8_training` swaps `nn.Linear` modules for its `Float8Linear`. megatron-core's
ColumnParallelLinear and RowParallelLinear are not `nn.Linear`, so the conversion would leave every one of them in
bf16 and say nothing. Each of them does its tensor-parallel communication around a single call,
`_forward_impl(input, weight, ...)` (megatron's `linear_with_grad_accumulation_and_async_allreduce`, which
traceable_megatron.py teaches the compiler). `use_float8` replaces that call, layer by layer, with `float8_linear`:
the same communication, and torchao's `matmul_with_hp_or_float8_args` for the matmul (dynamic scaling: in the
forward pass the input and the weight, in the backward pass the output gradient, are scaled to float8 e4m3 or e5m2
and multiplied on the float8 tensor cores, with a result in the input's dtype).

Parameters, their dtype, DeepSpeed's float32 master weights and optimizer state are untouched, so checkpoints and
exports are the same as without FP8, and a run resumes with FP8 switched on or off.

Scales are per shard: with tp > 1 a tensorwise scale covers this rank's shard of a weight (no communication, and a
finer scale than one for the whole tensor); rowwise scales are per row of each shard.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Iterable

import torch
import torch.distributed._functional_collectives as funcol
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, copy_to_tensor_model_parallel_region
from megatron.core.utils import get_tensor_model_parallel_group_if_none
from torch import nn

from pretrain.config import ConfigError, Float8Recipe

# torch._scaled_mm's float8 tensor cores: Ada (8.9), Hopper (9.0) and later.
FLOAT8_COMPUTE_CAPABILITY = (8, 9)


def check_float8_device(recipe: Float8Recipe) -> None:
    """ConfigError unless this process's GPU multiplies in float8 and torchao is installed."""
    fix = "set train.fp8=off"
    if not torch.cuda.is_available():
        raise ConfigError(f"train.fp8={recipe} needs an NVIDIA GPU with float8 tensor cores (compute capability "
                          f"8.9 or newer: Ada, Hopper, Blackwell) and this machine has none: {fix}")
    capability = torch.cuda.get_device_capability()
    if capability < FLOAT8_COMPUTE_CAPABILITY:
        raise ConfigError(f"train.fp8={recipe}: {torch.cuda.get_device_name()} (compute capability "
                          f"{capability[0]}.{capability[1]}) has no float8 tensor cores, which need 8.9 or newer "
                          f"(Ada, Hopper, Blackwell): {fix}")
    try:
        _torchao_float8()
    except ImportError:
        raise ConfigError(f"train.fp8={recipe} needs torchao: pip install 'torchao>=0.18,<0.19' (in the "
                          f"project's [gpu] extra), or {fix}") from None


def _torchao_float8():
    """torchao's float8 training pieces, imported when FP8 is on."""
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
    from torchao.float8.float8_training_tensor import LinearMMConfig

    return Float8LinearConfig, matmul_with_hp_or_float8_args, LinearMMConfig


def float8_linear(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                  grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None, *, matmul, mm_config, config):
    """megatron's tensor-parallel linear (`linear_with_grad_accumulation_and_async_allreduce`, the same arguments)
    with its matmul in float8: torchao's `matmul` (matmul_with_hp_or_float8_args) under its `mm_config` and `config`.

    Column-parallel: with sequence parallelism the sequence is gathered first (backward: the input gradient is
    reduce-scattered); without it the input gradient is all-reduced over the tensor-parallel ranks. Row-parallel
    layers pass neither, and reduce their output themselves."""
    assert not gradient_accumulation_fusion and grad_output_buffer is None, "megatron options the model never sets"
    tp_group = get_tensor_model_parallel_group_if_none(tp_group)
    if sequence_parallel:
        input = funcol.all_gather_tensor_autograd(input, 0, tp_group)  # [S / tp, B, D] -> [S, B, D]
    elif allreduce_dgrad:
        input = copy_to_tensor_model_parallel_region(input, group=tp_group)
    output = matmul.apply(input, weight.t(), mm_config, config)
    return output if bias is None else output + bias


def use_float8(modules: Iterable[tuple[str, nn.Module]], recipe: Float8Recipe, bf16_layers: list[str]) -> list[str]:
    """Make the linear layers among `modules` (canonical name, module) multiply in float8 with torchao's `recipe`,
    but those whose name matches a pattern of `bf16_layers`; returns the names of the layers converted."""
    Float8LinearConfig, matmul_with_hp_or_float8_args, LinearMMConfig = _torchao_float8()
    float8 = functools.partial(float8_linear, matmul=matmul_with_hp_or_float8_args, mm_config=LinearMMConfig(),
                               config=Float8LinearConfig.from_recipe_name(recipe))
    converted = []
    for name, module in modules:
        if not isinstance(module, ColumnParallelLinear | RowParallelLinear):
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in bf16_layers):
            continue
        # An instance attribute over megatron's method of the same name: the layer's forward calls it.
        module._forward_impl = float8
        converted.append(name)
    return converted
