"""SwiGLU's activation and its backward pass of its own (pretrain/model/swiglu.py), against float64 autograd of
silu(gate) * up; in the model, tests/test_model_parity.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.model.swiglu import swiglu, swiglu_backward
from tests.devices import CPU_AND_CUDA


def reference(gate_up: torch.Tensor, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(gate) * up and its gradient with respect to gate_up, by float64 autograd."""
    gate_up = gate_up.detach().double().requires_grad_()
    gate, up = gate_up.chunk(2, dim=-1)
    out = F.silu(gate) * up
    out.backward(grad_output.double())
    return out.detach(), gate_up.grad


# (rows, F): tiles that fit exactly, and rows and widths that end inside a tile.
SHAPES = [(64, 2048), (37, 1000), (3, 7)]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_swiglu_and_its_gradient_are_float64_autograds_rounded_once(device, dtype, compiled):
    """Values and the gradient [d gate | d up] within one rounding of float64 autograd's: to 1e-6 in float32, to
    bf16's half ulp (and float32's arithmetic) in bf16; the same eager and compiled."""
    generator = torch.Generator(device).manual_seed(0)
    run = torch.compile(swiglu, fullgraph=True) if compiled else swiglu
    for rows, width in SHAPES:
        gate_up = (3 * torch.randn(2, rows, 2 * width, device=device, generator=generator)).to(dtype)
        grad_output = torch.randn(2, rows, width, device=device, generator=generator).to(dtype)
        expected_out, expected_grad = reference(gate_up, grad_output)
        gate_up.requires_grad_()
        out = run(gate_up)
        out.backward(grad_output)
        assert out.dtype == gate_up.grad.dtype == dtype and gate_up.grad.shape == gate_up.shape
        if dtype == torch.float32:
            torch.testing.assert_close(out.double(), expected_out, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(gate_up.grad.double(), expected_grad, rtol=1e-6, atol=1e-6)
        else:
            # The backward pass rounds once, from float32: within half a bf16 ulp plus float32's error.
            error = (gate_up.grad.double() - expected_grad).abs()
            assert (error <= expected_grad.abs() * 2.0 ** -8 * (1 + 1e-4) + 1e-6).all(), error.max()
            torch.testing.assert_close(out.double(), expected_out, rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_swiglu_backward_is_a_well_formed_operator(device):
    """torch.library's checks of the operator: its fake (meta) implementation, autograd and compile registrations."""
    generator = torch.Generator(device).manual_seed(0)
    torch.library.opcheck(swiglu_backward, (torch.randn(5, 2 * 96, device=device, generator=generator).bfloat16(),
                                            torch.randn(5, 96, device=device, generator=generator).bfloat16()))
