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


def backward_order_worker() -> dict:
    """Rank of a tp=2 world: a column-parallel then a row-parallel layer (an MLP's pair) whose weight gradients go into
    float32; the matmuls and collectives their backward pass dispatches, in order, and its gradients with those of
    the same products computed one by one."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from torch.utils._python_dispatch import TorchDispatchMode

    from pretrain import parallel
    from pretrain.model.linear import use_float32_weight_gradients

    parallel.init_distributed(tp=2, backend="gloo")
    config = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True,
                                 params_dtype=torch.bfloat16)
    column = ColumnParallelLinear(64, 96, config=config, init_method=torch.nn.init.normal_, bias=False,
                                  gather_output=False)
    row = RowParallelLinear(96, 32, config=config, init_method=torch.nn.init.normal_, bias=False,
                            input_is_parallel=True, skip_bias_add=True)
    weights = use_float32_weight_gradients([column, row])
    for weight in weights:
        weight.main_grad = torch.zeros(weight.shape)
    generator = torch.Generator().manual_seed(0)  # the same input and output gradient on both ranks
    x = torch.randn(2, 8, 64, generator=generator).bfloat16().requires_grad_()
    grad_y = torch.randn(2, 8, 32, generator=generator).bfloat16()
    hidden, _ = column(x)
    y, _ = row(hidden)

    class Dispatched(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Dispatched():
        y.backward(grad_y)
    # The same gradients, product by product: the row layer's input gradient is the column layer's output gradient.
    grad_hidden = grad_y @ row.weight.detach()
    grad_x = grad_hidden @ column.weight.detach()
    torch.distributed.all_reduce(grad_x, group=parallel.parallel_state.get_tensor_model_parallel_group())
    flat = {name: tensor.reshape(-1, tensor.shape[-1]).float() for name, tensor in
            [("x", x.detach()), ("hidden", hidden.detach()), ("grad_y", grad_y), ("grad_hidden", grad_hidden)]}
    return {
        "ops": [op for op in Dispatched.ops
                if op.split(".")[1] in ("mm", "accumulate_weight_gradient", "all_reduce")],
        "equal": [torch.equal(x.grad, grad_x),
                  torch.equal(row.weight.main_grad, flat["grad_y"].t() @ flat["hidden"]),
                  torch.equal(column.weight.main_grad, flat["grad_hidden"].t() @ flat["x"])],
    }


def test_at_tp2_the_input_gradient_is_computed_and_all_reduced_before_the_weight_gradient():
    """Each layer's backward computes its input gradient first; the column-parallel layer's all-reduce of it is
    issued before its weight-gradient matmul, which runs while the all-reduce does (as in megatron's own linear). The
    gradients are those of the products computed one by one, to the bit."""
    from tests.distributed import run_distributed

    for rank in run_distributed(backward_order_worker, 2):
        assert rank["ops"] == [
            "aten.mm.default", "pretrain.accumulate_weight_gradient.default",  # row: input, then weight gradient
            "aten.mm.default", "_c10d_functional.all_reduce.default",  # column: the input gradient and its all-reduce,
            "pretrain.accumulate_weight_gradient.default",  # then the weight gradient, while the all-reduce runs
        ], rank["ops"]
        assert rank["equal"] == [True, True, True]
