"""Process groups: the one place they are created and torn down.

Reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), starts
torch.distributed (gloo on CPU, nccl on CUDA) and lets megatron-core build the tensor- and
pipeline-parallel groups. Ranks are numbered tensor-parallel fastest, then data-parallel, then pipeline,
which is also DeepSpeed's order.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def init_distributed(tp: int = 1, pp: int = 1, backend: str | None = None, timeout_s: float = 600.0) -> None:
    """Join the process group described by the torchrun environment and build the model-parallel groups.

    Without torchrun variables this starts a world of one process, so single-process runs and tests use
    the same code path. `backend` defaults to nccl when CUDA is available, gloo otherwise.
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    address = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = os.environ.get("MASTER_PORT", "29500")
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by tp * pp = {tp} * {pp}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{address}:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        distributed_timeout_minutes=max(1, round(timeout_s / 60)),
    )


def destroy() -> None:
    """Tear down megatron's groups and the default group; safe to call when nothing was started."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_group() -> dist.ProcessGroup:
    return parallel_state.get_tensor_model_parallel_group()


def pp_rank() -> int:
    return parallel_state.get_pipeline_model_parallel_rank()


def pp_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size()


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def dp_group() -> dist.ProcessGroup:
    return parallel_state.get_data_parallel_group()
