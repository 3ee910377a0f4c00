"""How torch.compile traces megatron-core's tensor-parallel layers inside a compiled decoder layer.

Each rule replaces, for dynamo's tracing only, a piece of megatron-core that dynamo cannot trace, would split the
compiled layer at, or traces wrongly; eager code is unchanged. With all of them a tensor-parallel layer (with or
without sequence parallelism) compiles to one graph, forward and backward, its collectives inside it for inductor to
schedule (and, with parallel.async_tensor_parallel, to fuse with their matmuls). Importing this module installs them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from megatron.core import parallel_state
from megatron.core.tensor_parallel import layers, mappings
from megatron.core.utils import get_tensor_model_parallel_group_if_none


@torch._dynamo.substitute_in_graph(get_tensor_model_parallel_group_if_none)
def _tensor_parallel_group_or_default(tp_group, is_expert=False, check_initialized=True):
    """megatron-core's lookup of the default tensor-parallel group without its deprecation warning (RowParallelLinear
    passes no group): the warning cannot be traced and is issued on rank 0 alone, so it split rank 0's compiled
    layer and no other rank's."""
    if not dist.is_initialized():
        return None
    if tp_group is not None or not parallel_state.is_initialized():
        return tp_group
    if is_expert:
        return parallel_state.get_expert_tensor_parallel_group(check_initialized=check_initialized)
    return parallel_state.get_tensor_model_parallel_group(check_initialized=check_initialized)


# megatron's communication helpers write their results in place: the sequence-parallel gather and reduce-scatter into
# tensors they have just allocated (torch.empty, or its global buffer), the all-reduce into its input. Traced in a
# backward pass, dynamo in torch 2.11 lost the writes into fresh tensors: the compiled layer's gradients came out as if
# nothing had flowed through its branches (GPU test in tests/test_tensor_parallel.py). In the graph all three are
# functional collectives instead, which return their result and leave nothing to an in-place write.
@torch._dynamo.substitute_in_graph(mappings._gather_along_first_dim)
def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
    assert output_split_sizes is None, "uneven sequence-parallel splits are not traced"
    if group.size() == 1:
        return input_
    return funcol.all_gather_tensor(input_.contiguous(), 0, group)


@torch._dynamo.substitute_in_graph(mappings._reduce_scatter_along_first_dim)
def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
    assert input_split_sizes is None, "uneven sequence-parallel splits are not traced"
    if group.size() == 1:
        return input_
    return funcol.reduce_scatter_tensor(input_.contiguous(), "sum", 0, group)


@torch._dynamo.substitute_in_graph(mappings._reduce)
def _reduce(input_, group):
    if group.size() == 1:
        return input_
    return funcol.all_reduce(input_, "sum", group)


@torch._dynamo.substitute_in_graph(layers.linear_with_grad_accumulation_and_async_allreduce)
def _linear(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
            grad_output_buffer=None, wgrad_deferral_limit=0, async_grad_allreduce=None, tp_group=None):
    """megatron's tensor-parallel linear; with sequence parallelism as the same computation in differentiable
    functional collectives (gather the sequence, matmul; backward: reduce-scatter the input gradient, the weight
    gradient from the gathered input), which autograd differentiates in the graph."""
    tp_group = get_tensor_model_parallel_group_if_none(tp_group)
    if sequence_parallel:
        assert not gradient_accumulation_fusion and grad_output_buffer is None
        output = torch.matmul(funcol.all_gather_tensor_autograd(input, 0, tp_group), weight.t())
        return output if bias is None else output + bias
    return layers.LinearWithGradAccumulationAndAsyncCommunication.apply(
        input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel, grad_output_buffer,
        wgrad_deferral_limit, tp_group)


class _Completed:
    """The handle of a collective that has already run (in the graph, where inductor orders it)."""

    def wait(self) -> None:
        return None


# Without sequence parallelism megatron's linear backward all-reduces the input gradient with async_op=True and waits
# before it returns, to overlap it with the weight-gradient GEMM; dynamo refuses async_op=True. In the graph the same
# all-reduce runs as a functional one, and inductor does the overlapping. The op defaults to None, not ReduceOp.SUM:
# dynamo in torch 2.11 cannot hold a ReduceOp that comes from no variable of the traced code, which split every
# tensor-parallel layer into 12 graphs on GPUs.
@torch._dynamo.substitute_in_graph(dist.all_reduce, skip_signature_check=True)
def _all_reduce(tensor, op=None, group=None, async_op=False):
    funcol.all_reduce_inplace(tensor, "sum" if op is None else funcol.REDUCE_OP_TO_STR[op], group)
    return _Completed() if async_op else None


# megatron advises CUDA_DEVICE_MAX_CONNECTIONS=1 once, for its eager overlap of those collectives; the flag that
# makes it once cannot be set inside a graph, so the advice split the first compiled layer and then recompiled it.
# Compiled layers schedule their collectives themselves: mark the advice as given.
layers.linear_with_grad_accumulation_and_async_allreduce.warned = True
