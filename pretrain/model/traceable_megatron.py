"""How torch.compile traces megatron-core's tensor-parallel layers inside a compiled decoder layer.

Each rule replaces, for dynamo's tracing only, a piece of megatron-core that dynamo cannot trace and would split the
compiled layer at; eager code is unchanged. With all of them a tensor-parallel layer (with or without sequence
parallelism) compiles to one graph, forward and backward, its collectives inside it for inductor to schedule.
Importing this module installs them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from megatron.core import parallel_state
from megatron.core.parallel_state import get_global_memory_buffer
from megatron.core.tensor_parallel import layers
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


class _FreshBuffers:
    """In the graph, megatron's scratch buffers are fresh tensors for inductor to allocate and reuse."""

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        return torch.empty(tensor_shape, dtype=dtype, device=torch.cuda.current_device())


_FRESH_BUFFERS = _FreshBuffers()


# Sequence-parallel linears gather their input into megatron's global buffer. Traced, that buffer is a graph input
# written in place: a copy into it after every gather, a recompilation once it exists, and a gather whose result
# reaches its matmul only through the buffer's views, which hides the gather-matmul pair from inductor's async
# tensor parallelism.
@torch._dynamo.substitute_in_graph(get_global_memory_buffer)
def _global_memory_buffer():
    return _FRESH_BUFFERS


class _Completed:
    """The handle of a collective that has already run (in the graph, where inductor orders it)."""

    def wait(self) -> None:
        return None


# megatron's linear backward starts its collectives with async_op=True and waits before it needs their results, to
# overlap them with the gradient GEMMs; dynamo refuses async_op=True. In the graph the same collective runs as a
# functional one, and inductor does the overlapping.
@torch._dynamo.substitute_in_graph(dist.all_gather_into_tensor)
def _all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
    funcol.all_gather_tensor_inplace(output_tensor, input_tensor, group)
    return _Completed() if async_op else None


def _reduce_op_name(op) -> str:
    # megatron passes no op (a sum). The default is None rather than ReduceOp.SUM because dynamo in torch 2.11 cannot
    # hold a ReduceOp that comes from no variable of the traced code: that split every tensor-parallel layer on GPUs.
    return "sum" if op is None else funcol.REDUCE_OP_TO_STR[op]


@torch._dynamo.substitute_in_graph(dist.reduce_scatter_tensor, skip_signature_check=True)
def _reduce_scatter_tensor(output, input, op=None, group=None, async_op=False):
    funcol.reduce_scatter_tensor_inplace(output, input, _reduce_op_name(op), group)
    return _Completed() if async_op else None


@torch._dynamo.substitute_in_graph(dist.all_reduce, skip_signature_check=True)
def _all_reduce(tensor, op=None, group=None, async_op=False):
    funcol.all_reduce_inplace(tensor, _reduce_op_name(op), group)
    return _Completed() if async_op else None


# megatron advises CUDA_DEVICE_MAX_CONNECTIONS=1 once, for its eager overlap of those collectives; the flag that
# makes it once cannot be set inside a graph, so the advice split the first compiled layer and then recompiled it.
# Compiled layers schedule their collectives themselves: mark the advice as given.
layers.linear_with_grad_accumulation_and_async_allreduce.warned = True
