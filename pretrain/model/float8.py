"""FP8 training of the tensor-parallel linear layers (`train.fp8`).

torchao's `convert_to_float8_training` swaps `nn.Linear` modules for its `Float8Linear`. megatron-core's
ColumnParallelLinear and RowParallelLinear are not `nn.Linear`, so the conversion would leave every one of them in
bf16 and say nothing. `use_float8` swaps their matmul instead, layer by layer (linear.py): the same tensor-parallel
communication around a float8 matmul with dynamic scaling (in the forward pass the input and the weight, in
the backward pass the output gradient, are scaled to float8 e4m3 or e5m2 and multiplied on the float8 tensor cores,
with a result in the input's dtype).

- tensorwise (one scale per tensor): `TensorwiseFloat8Matmul`, torchao's numerics with Transformer Engine's kernel
  layout. Hopper's float8 matmul takes its operands only as (rows, K) row-major times (K, cols) column-major, so the
  weight gradient needs the output gradient and the input transposed, the input gradient the weight transposed.
  Compiled, torchao's matmul left those casts to inductor, which fused each transposed cast into the kernel that made
  the tensor (a row-wise reduction such as RMSNorm's backward) and stored it column by column: on one H200 these casts
  took 182 ms of a 1.17 s step. Here one tiled kernel (`cast_to_float8_and_transpose`) reads each tensor once and
  writes both layouts, and the forward pass keeps the float8 transposed input and weight for the backward pass
  instead of the bf16 ones (the input's amax and cast are not redone, and they take half the memory). Weights change
  only at the optimizer step, so each is cast once per step (`Float8Weight`) and not once per micro-batch: the weights
  were three quarters of the bytes these casts moved.
- rowwise (one scale per row, finer): torchao's `matmul_with_hp_or_float8_args`.

Parameters, their dtype, DeepSpeed's float32 master weights and optimizer state are untouched, so checkpoints and
exports are the same as without FP8, and a run resumes with FP8 switched on or off.

Scales are per shard: with tp > 1 a tensorwise scale covers this rank's shard of a weight (no communication, and a
finer scale than one for the whole tensor); rowwise scales are per row of each shard.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from pretrain.config import ConfigError, Float8Recipe
from pretrain.model.linear import swap_matmul

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


# The largest finite values of the float8 formats: e4m3 for activations and weights, e5m2 (wider range, one bit less
# precision) for output gradients, as in torchao's recipes.
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
AMAX_FLOOR = 1e-12  # torchao's: a tensor of zeros still gets a finite scale


def tensorwise_scale(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float32 factor that maps x's largest magnitude onto float8 `dtype`'s largest value (torchao's, to the bit:
    the division in float64)."""
    amax = x.abs().amax().to(torch.float64)
    return (torch.finfo(dtype).max / amax.clamp(min=AMAX_FLOOR)).to(torch.float32)


@torch.library.custom_op("pretrain::cast_to_float8_and_transpose", mutates_args=())
def cast_to_float8_and_transpose(x: torch.Tensor, scale: torch.Tensor,
                                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, cols), contiguous, times `scale`, saturated and rounded to float8 `dtype`: (rows, cols) and its
    transpose (cols, rows), both contiguous. An operator of its own so that inductor leaves it whole (it would fuse
    the transposed store into the kernel that makes x); on CUDA one tiled Triton kernel."""
    limit = torch.finfo(dtype).max
    cast = (x.float() * scale).clamp(-limit, limit).to(dtype)
    return cast, cast.t().contiguous()


@cast_to_float8_and_transpose.register_fake
def _(x, scale, dtype):
    return x.new_empty(x.shape, dtype=dtype), x.new_empty(x.shape[::-1], dtype=dtype)


if torch.cuda.is_available():
    import triton
    import triton.language as tl

    @triton.autotune(configs=[triton.Config({"ROWS": rows, "COLS": cols}, num_warps=warps)
                              for rows, cols, warps in [(64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 8)]],
                     key=["rows", "cols"])
    @triton.jit
    def _cast_and_transpose(x_ptr, scale_ptr, out_ptr, out_t_ptr, rows, cols, limit,
                            ROWS: tl.constexpr, COLS: tl.constexpr):
        """One (ROWS, COLS) tile of x: scaled, saturated, rounded, stored as it is and transposed, both coalesced."""
        row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]  # (ROWS, 1)
        col = (tl.program_id(1) * COLS + tl.arange(0, COLS)).to(tl.int64)[None, :]  # (1, COLS)
        inside = (row < rows) & (col < cols)
        x = tl.load(x_ptr + row * cols + col, mask=inside).to(tl.float32)
        cast = tl.clamp(x * tl.load(scale_ptr), -limit, limit).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * cols + col, cast, mask=inside)
        tl.store(out_t_ptr + tl.trans(col) * rows + tl.trans(row), tl.trans(cast), mask=tl.trans(inside))

    @cast_to_float8_and_transpose.register_kernel("cuda")
    def _(x, scale, dtype):
        assert x.dim() == 2 and x.is_contiguous()
        rows, cols = x.shape
        cast, cast_t = x.new_empty(x.shape, dtype=dtype), x.new_empty((cols, rows), dtype=dtype)
        grid = lambda meta: (triton.cdiv(rows, meta["ROWS"]), triton.cdiv(cols, meta["COLS"]))  # noqa: E731
        _cast_and_transpose[grid](x, scale, cast, cast_t, rows, cols, torch.finfo(dtype).max)
        return cast, cast_t


class TensorwiseFloat8Matmul(torch.autograd.Function):
    """input (..., K) @ weight (N, K).T in float8 with one scale per tensor: torchao's tensorwise recipe (its scales,
    casts and matmul settings) on tensors cast once and in both layouts (module docstring). The weight's float8
    casts and scale may be given (`Float8Weight`); otherwise the weight is cast here."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight: torch.Tensor, weight8: torch.Tensor | None = None,
                weight8_t: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None) -> torch.Tensor:
        x = input.reshape(-1, input.shape[-1]).contiguous()  # (T, K)
        x_scale = tensorwise_scale(x, E4M3)
        x8, x8_t = cast_to_float8_and_transpose(x, x_scale, E4M3)  # (T, K), (K, T)
        w8, w8_t, w_scale = weight8, weight8_t, weight_scale
        if w8 is None:
            w_scale = tensorwise_scale(weight, E4M3)
            w8, w8_t = cast_to_float8_and_transpose(weight.contiguous(), w_scale, E4M3)  # (N, K), (K, N)
        output = torch._scaled_mm(x8, w8.t(), scale_a=x_scale.reciprocal(), scale_b=w_scale.reciprocal(),
                                  out_dtype=input.dtype, use_fast_accum=True)  # (T, N)
        ctx.save_for_backward(x8_t, x_scale, w8_t, w_scale)
        return output.view(*input.shape[:-1], output.shape[-1])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x8_t, x_scale, w8_t, w_scale = ctx.saved_tensors
        dy = grad_output.reshape(-1, grad_output.shape[-1]).contiguous()  # (T, N)
        dy_scale = tensorwise_scale(dy, E5M2)
        dy8, dy8_t = cast_to_float8_and_transpose(dy, dy_scale, E5M2)  # (T, N), (N, T)
        # torchao's recipe accumulates both gradients' matmuls exactly (no fast accumulation).
        grad_input = torch._scaled_mm(dy8, w8_t.t(), scale_a=dy_scale.reciprocal(), scale_b=w_scale.reciprocal(),
                                      out_dtype=grad_output.dtype)  # (T, K)
        grad_weight = torch._scaled_mm(dy8_t, x8_t.t(), scale_a=dy_scale.reciprocal(),
                                       scale_b=x_scale.reciprocal(), out_dtype=grad_output.dtype)  # (N, K)
        return grad_input.view(*grad_output.shape[:-1], grad_input.shape[-1]), grad_weight, None, None, None


class Float8Weight:
    """A weight cast for `TensorwiseFloat8Matmul` (e4m3, as it is and transposed, with its scale), kept from one
    optimizer step to the next: weights change only at the step, and cast for every micro-batch they made three
    quarters of the bytes the float8 casts moved. Held by the weight itself (its `float8` attribute), where the
    compiled layers find it: one graph still serves every layer, each one's casts being inputs of the graph.
    `refresh` after every change of the weights (the trainer does before each step and each evaluation)."""

    def __init__(self) -> None:
        self.cast: torch.Tensor | None = None  # (N, K)
        self.cast_t: torch.Tensor | None = None  # (K, N)
        self.scale: torch.Tensor | None = None

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor) -> None:
        # New tensors of the same shapes: the compiled layers neither recompile nor keep the old ones.
        self.scale = tensorwise_scale(weight, E4M3)
        self.cast, self.cast_t = cast_to_float8_and_transpose(weight.contiguous(), self.scale, E4M3)


def kept_weight_tensorwise_matmul(input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`TensorwiseFloat8Matmul` with the weight's kept float8 casts (`weight.float8`, a `Float8Weight`)."""
    kept = weight.float8
    if kept.cast is None:
        raise RuntimeError("a float8 weight was used before its first refresh (Float8Layers.refresh_weights)")
    return TensorwiseFloat8Matmul.apply(input, weight, kept.cast, kept.cast_t, kept.scale)


def torchao_matmul(input: torch.Tensor, weight: torch.Tensor, *, mm_config, config) -> torch.Tensor:
    """input (..., K) @ weight (N, K).T by torchao's float8 matmul (matmul_with_hp_or_float8_args) under its
    `mm_config` (LinearMMConfig) and `config` (Float8LinearConfig)."""
    _, matmul_with_hp_or_float8_args, _ = _torchao_float8()
    return matmul_with_hp_or_float8_args.apply(input, weight.t(), mm_config, config)


def _torchao_float8():
    """torchao's float8 training pieces, imported when FP8 is on."""
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
    from torchao.float8.float8_training_tensor import LinearMMConfig

    return Float8LinearConfig, matmul_with_hp_or_float8_args, LinearMMConfig


@dataclass
class Float8Layers:
    """The linear layers `use_float8` converted: their canonical names, and the weights kept in float8 between
    optimizer steps (tensorwise with kept weights only)."""

    names: list[str] = field(default_factory=list)
    kept_weights: list[torch.nn.Parameter] = field(default_factory=list)

    def refresh_weights(self) -> None:
        """Cast the kept weights again: after any change of the weights, before they are next used."""
        for weight in self.kept_weights:
            weight.float8.refresh(weight)


def use_float8(modules: Iterable[tuple[str, nn.Module]], recipe: Float8Recipe, bf16_layers: list[str],
               keep_weights: bool = True) -> Float8Layers:
    """Make the linear layers among `modules` (canonical name, module) multiply in float8 with `recipe`, but those
    whose name matches a pattern of `bf16_layers`. With tensorwise and `keep_weights` each weight is cast once per
    refresh (`Float8Weight`), not once per call: not where weights exist only while gathered (ZeRO-3)."""
    keep_weights = keep_weights and recipe == "tensorwise"
    if recipe == "tensorwise":
        matmul = kept_weight_tensorwise_matmul if keep_weights else TensorwiseFloat8Matmul.apply
    else:
        Float8LinearConfig, _, LinearMMConfig = _torchao_float8()
        matmul = functools.partial(torchao_matmul, mm_config=LinearMMConfig(),
                                   config=Float8LinearConfig.from_recipe_name(recipe))
    converted = Float8Layers()
    for name, module in modules:
        if not isinstance(module, ColumnParallelLinear | RowParallelLinear):
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in bf16_layers):
            continue
        swap_matmul(module, matmul)
        converted.names.append(name)
        if keep_weights:
            module.weight.float8 = Float8Weight()
            converted.kept_weights.append(module.weight)
    return converted
