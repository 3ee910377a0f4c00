"""The linear layers' weight gradients added into float32 by the matmul that computes them (pretrain/model/linear.py);
in the trainer, tests/test_engine.py."""

from __future__ import annotations

import pytest
import torch

from pretrain.model.linear import matmul_into_float32_gradient
from tests.devices import CPU_AND_CUDA


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_weight_gradients_are_summed_into_float32_views_of_one_buffer(device, compiled):
    """Two layers whose float32 gradients are views of one buffer (as DeepSpeed's), over two micro-batches: each
    gradient is its start plus the exact products dY.T @ X summed in float32 (within 1e-5 of float64), nothing
    outside the views is written, autograd makes no weight gradient, and the input gradient is dY @ W."""
    generator = torch.Generator(device).manual_seed(0)

    def bf16(*shape):
        return torch.randn(*shape, device=device, generator=generator).bfloat16()

    weights = [bf16(96, 64).requires_grad_(), bf16(48, 80).requires_grad_()]  # (N, K)
    sizes = [weight.numel() for weight in weights]
    flat = torch.randn(sum(sizes) + 1, device=device, generator=generator)
    for weight, view in zip(weights, torch.split(flat[:-1], sizes), strict=True):
        weight.main_grad = view.view(weight.shape)
    expected = flat.double()

    def layers(inputs):
        return [matmul_into_float32_gradient(x, weight) for x, weight in zip(inputs, weights, strict=True)]

    run = torch.compile(layers, fullgraph=True) if compiled else layers
    for _ in range(2):  # micro-batches
        inputs = [bf16(2, 16, weight.shape[1]).requires_grad_() for weight in weights]  # (B, S, K)
        grads = [bf16(2, 16, weight.shape[0]) for weight in weights]  # (B, S, N)
        torch.autograd.backward(run(inputs), grads)
        products = [(dy.double().reshape(-1, dy.shape[-1]).t() @ x.detach().double().reshape(-1, x.shape[-1]))
                    for dy, x in zip(grads, inputs, strict=True)]
        expected[:-1] += torch.cat([product.view(-1) for product in products])
        for x, dy, weight in zip(inputs, grads, weights, strict=True):
            torch.testing.assert_close(x.grad, dy @ weight.detach())
    assert all(weight.grad is None for weight in weights)
    assert flat[-1] == expected[-1]
    torch.testing.assert_close(flat.double(), expected, rtol=1e-5, atol=1e-5)
