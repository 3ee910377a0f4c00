"""SwiGLU's activation, silu(gate) * up, with a backward pass that reads each input once.

The gate/up projection's output is one tensor [gate | up] (..., 2F) and its gradient must be one too, for the
projection's weight- and input-gradient matmuls. Compiled from plain torch ops, the backward pass is the gradient of
a split: inductor lowers that concatenation as one kernel over the (..., 2F) output whose every element computes its
half's formula, so gate and the output gradient are read once for each half. Here the backward pass is one tiled
Triton kernel over (..., F) that reads gate, up and the output gradient once and writes both halves: on one H200,
0.28 ms against 0.59 ms per 8192 x 14,336 micro-batch in the trainer's profile (benchmarks/RESULTS.md). On CPU the
same formula in torch ops.

The forward pass stays plain torch ops: inductor fuses it with its neighbours (under FP8 with the float8 scale's
amax reduction).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("pretrain::swiglu_backward", mutates_args=())
def swiglu_backward(gate_up: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """The gradient of silu(gate) * up with respect to gate_up = [gate | up] (..., 2F), given the output's gradient
    (..., F), computed in float32 (or float64) and rounded once to gate_up's dtype."""
    compute = torch.promote_types(gate_up.dtype, torch.float32)
    gate, up = gate_up.to(compute).chunk(2, dim=-1)
    grad = grad_output.to(compute)
    sigmoid = torch.sigmoid(gate)
    grad_gate = grad * up * sigmoid * (1 + gate * (1 - sigmoid))
    return torch.cat([grad_gate, grad * gate * sigmoid], dim=-1).to(gate_up.dtype)


@swiglu_backward.register_fake
def _(gate_up, grad_output):
    return torch.empty_like(gate_up)


if torch.cuda.is_available():
    import triton
    import triton.language as tl

    @triton.autotune(configs=[triton.Config({"ROWS": rows, "COLS": cols}, num_warps=warps)
                              for rows, cols, warps in [(1, 2048, 8), (4, 1024, 8), (8, 512, 4), (16, 256, 4)]],
                     key=["rows", "width"])
    @triton.jit
    def _swiglu_backward(gate_up_ptr, grad_ptr, out_ptr, rows, width, ROWS: tl.constexpr, COLS: tl.constexpr):
        """One (ROWS, COLS) tile of the output gradient and the gate and up tiles beside it."""
        row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]  # (ROWS, 1)
        col = (tl.program_id(1) * COLS + tl.arange(0, COLS)).to(tl.int64)[None, :]  # (1, COLS)
        inside = (row < rows) & (col < width)
        gate_at = gate_up_ptr + row * 2 * width + col
        gate = tl.load(gate_at, mask=inside).to(tl.float32)
        up = tl.load(gate_at + width, mask=inside).to(tl.float32)
        grad = tl.load(grad_ptr + row * width + col, mask=inside).to(tl.float32)
        sigmoid = tl.sigmoid(gate)
        grad_gate = grad * up * sigmoid * (1 + gate * (1 - sigmoid))
        out_at = out_ptr + row * 2 * width + col
        tl.store(out_at, grad_gate.to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(out_at + width, (grad * gate * sigmoid).to(out_ptr.dtype.element_ty), mask=inside)

    @swiglu_backward.register_kernel("cuda")
    def _(gate_up, grad_output):
        gate_up, grad_output = gate_up.contiguous(), grad_output.contiguous()
        width = grad_output.shape[-1]
        rows = grad_output.numel() // width
        out = torch.empty_like(gate_up)
        grid = lambda meta: (triton.cdiv(rows, meta["ROWS"]), triton.cdiv(width, meta["COLS"]))  # noqa: E731
        _swiglu_backward[grid](gate_up, grad_output, out, rows, width)
        return out


class SwiGLUActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        return swiglu_backward(gate_up, grad_output)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up = [gate | up] (..., 2F) -> (..., F)."""
    return SwiGLUActivation.apply(gate_up)
