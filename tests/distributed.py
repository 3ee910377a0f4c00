"""Run a function in N real processes joined by a gloo process group, as torchrun would start them."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import traceback
from collections.abc import Callable
from typing import Any

from pretrain.launch_contract import free_port


def _child(fn: Callable, rank: int, world_size: int, port: int, args: tuple, results) -> None:
    import torch

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # One thread per process: the processes share the machine's cores.
    torch.set_num_threads(1)
    try:
        outcome = ("ok", fn(*args))
    except Exception:  # noqa: BLE001 - any failure must reach the parent, which raises it with this traceback
        outcome = ("error", traceback.format_exc())
    finally:
        from pretrain import parallel

        parallel.destroy()
    # Plain pickle copies tensors; the torch queue would share memory that dies with this process.
    results.put((rank, pickle.dumps(outcome)))


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 300.0) -> list[Any]:
    """fn(*args) in `world_size` spawned processes with torchrun's environment; returns results by rank.

    `fn` must be importable by name (a module-level function) and should call
    `pretrain.parallel.init_distributed`. A failure in any rank raises with that rank's traceback.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_child, args=(fn, rank, world_size, port, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    outcomes: dict[int, tuple[str, Any]] = {}
    try:
        for _ in range(world_size):
            rank, payload = results.get(timeout=timeout_s)
            outcomes[rank] = pickle.loads(payload)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    errors = [
        f"rank {rank}:\n{value}" for rank, (status, value) in sorted(outcomes.items()) if status == "error"
    ]
    if errors:
        raise RuntimeError("distributed run failed\n" + "\n".join(errors))
    return [outcomes[rank][1] for rank in range(world_size)]
