"""Process groups: the one place they are created and torn down.

Reads torchrun's environment only (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: the launchers in
launch/ give every rank these, also under Slurm), starts torch.distributed (gloo on CPU, nccl on CUDA) and lets
megatron-core build the tensor-, context- and pipeline-parallel groups. Ranks are numbered tensor-parallel fastest,
then context-parallel, then data-parallel, then pipeline (megatron-core's order; DeepSpeed's pipeline topology, which
has no context parallelism, numbers them as megatron does without it).

Context parallelism splits each sequence over the ranks of a context-parallel group, which read the same samples:
the loader shards samples over the data-parallel group (`dp_*`), while gradients, losses, ZeRO's partitions and a
checkpoint's writers span data and context parallelism together (`dp_cp_*`); without it the two are the same.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import socket
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from pretrain.launch_contract import free_port

_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RendezvousError(RuntimeError):
    """The process group could not form; the message names the address tried and what to check."""


def rendezvous_from_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables; without them, a world of one process."""
    env = os.environ
    rank = int(env.setdefault("RANK", "0"))
    world_size = int(env.setdefault("WORLD_SIZE", "1"))
    local_rank = int(env.setdefault("LOCAL_RANK", "0"))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    return rank, world_size, local_rank


def init_distributed(tp: int = 1, pp: int = 1, backend: str | None = None, timeout_s: float = 600.0,
                     rendezvous_timeout_s: float = 300.0, cp: int = 1) -> None:
    """Join the process group described by torchrun's environment and build the model-parallel groups.

    Without it this starts a world of one process, so single-process runs and tests use the same code
    path. `backend` defaults to nccl when CUDA is available, gloo otherwise. A master that cannot be reached
    within `rendezvous_timeout_s` is an error naming it, not a hang; so are ranks that would share a GPU.
    `timeout_s` bounds every collective (NCCL's watchdog aborts the process past it).
    """
    rank, world_size, local_rank = rendezvous_from_environment()
    if world_size % (tp * pp * cp):
        raise ValueError(f"world size {world_size} is not divisible by tp * pp * cp = {tp} * {pp} * {cp}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(gpu_of_local_rank(rank, local_rank))
    if not dist.is_initialized():
        master = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        try:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                  is_master=rank == 0, timeout=datetime.timedelta(seconds=rendezvous_timeout_s))
        except (RuntimeError, OSError) as e:
            raise RendezvousError(
                f"rank {rank} could not reach the master {master} within {rendezvous_timeout_s:.0f} s ({e}): "
                "check MASTER_ADDR/MASTER_PORT (or the Slurm node list) and that rank 0 is running"
            ) from None
        if backend == "nccl":
            _claim_gpu(store, rank)
        dist.init_process_group(
            backend=backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
    )


def gpu_of_local_rank(rank: int, local_rank: int) -> int:
    """The CUDA device of this rank: its local rank among the visible GPUs, or the only one visible (Slurm's
    --gpus-per-task=1 or --gpu-bind give each task its own GPU, so every task sees one, as device 0)."""
    visible = torch.cuda.device_count()
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise RendezvousError(
        f"rank {rank} is local rank {local_rank} on {socket.gethostname()}, which shows it {visible} GPUs "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one rank per GPU "
        "(--nproc at most the GPU count; under Slurm as many tasks per node as GPUs, or --gpus-per-task=1)"
    )


def _claim_gpu(store: dist.Store, rank: int) -> None:
    """Refuse a GPU that another rank already took (NCCL would fail later with a duplicate-GPU error, or hang)."""
    device = torch.cuda.current_device()
    uuid = torch.cuda.get_device_properties(device).uuid
    if store.add(f"pretrain/gpu/{uuid}", 1) > 1:
        raise RendezvousError(
            f"rank {rank} on {socket.gethostname()} got GPU {device} ({uuid}), which another rank already uses: "
            "start one rank per GPU (--nproc at most the GPU count; under Slurm check --gpus-per-task and "
            "--gpu-bind)"
        )


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a tensor handed to a collective on `group` must live: NCCL takes CUDA tensors only, gloo CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_numbers(numbers: Sequence[float], op: dist.ReduceOp = dist.ReduceOp.SUM,
                       group: dist.ProcessGroup | None = None) -> list[float]:
    """Host numbers (a loss, flags, counts) reduced over `group`, through a float64 tensor on the group's device:
    the one way the training loop, checkpointer and optimizer reduce what they computed on the host."""
    reduced = torch.tensor(numbers, dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(reduced, op=op, group=group)
    return reduced.tolist()


@contextlib.contextmanager
def single_process_group(backend: str | None = None) -> Iterator[None]:
    """A world of one process at tp=1 for code that needs megatron's groups (inference, single-process tests),
    unless the caller has a process group already."""
    if parallel_state.model_parallel_is_initialized():
        if tp_size() != 1:
            raise RuntimeError("inference runs at tensor-parallel size 1, the process group has another")
        yield
        return
    # On a free port, whatever torchrun or Slurm variables this process inherited. Only the rendezvous reads them:
    # they are put back at once, so that processes started meanwhile (Slurm jobs among them) do not inherit rank 0.
    saved = {key: os.environ.get(key) for key in _RENDEZVOUS}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        try:
            init_distributed(tp=1, pp=1, backend=backend)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        yield
    finally:
        destroy()


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


def cp_rank() -> int:
    return parallel_state.get_context_parallel_rank()


def cp_size() -> int:
    return parallel_state.get_context_parallel_world_size()


def cp_group() -> dist.ProcessGroup:
    return parallel_state.get_context_parallel_group()


def dp_cp_rank() -> int:
    return parallel_state.get_data_parallel_rank(with_context_parallel=True)


def dp_cp_size() -> int:
    return parallel_state.get_data_parallel_world_size(with_context_parallel=True)


def dp_cp_group() -> dist.ProcessGroup:
    return parallel_state.get_data_parallel_group(with_context_parallel=True)
