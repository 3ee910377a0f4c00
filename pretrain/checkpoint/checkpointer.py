"""Saving and restoring a training run: the trainer's one entry point into checkpointing.

A save snapshots this rank's state into host memory (the only part the training loop waits for: the stall)
and writes it to `.tmp-step_N/`; rank 0 finalizes (manifest last, rename, `latest`). With `async_save` the
writing and finalizing run in a background thread while training continues; the next save, or the end of the
run, waits for it first.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch.distributed as dist

from pretrain.checkpoint.state import snapshot_rank_state, write_rank_state
from pretrain.checkpoint.store import CheckpointStore, mark_rank_done


class Checkpointer:
    def __init__(self, store: CheckpointStore, engine, canonical, config: dict, async_save: bool):
        self.store = store
        self.engine = engine
        self.canonical = canonical
        self.config = config
        self.async_save = async_save
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_stall_s = 0.0

    def save(self, step: int, trainer_state: dict) -> None:
        self.wait()
        start = time.perf_counter()
        if self.rank == 0:
            self.store.prepare(step)
        # Nobody writes before rank 0 has made a fresh temporary directory.
        dist.barrier()
        snapshot = snapshot_rank_state(self.engine, self.canonical, trainer_state, self.config)
        self.last_stall_s = time.perf_counter() - start
        meta = {"tokens": trainer_state.get("tokens"), "loss": trainer_state.get("loss")}
        if self.async_save:
            self._thread = threading.Thread(target=self._write, args=(step, snapshot, meta), daemon=False)
            self._thread.start()
        else:
            self._write(step, snapshot, meta)
            self._raise_pending()
            self.last_stall_s = time.perf_counter() - start
            # The checkpoint is complete for every rank before anyone moves on (or exits).
            dist.barrier()

    def _write(self, step: int, snapshot: dict, meta: dict) -> None:
        try:
            tmp = self.store.tmp_dir(step)
            mark_rank_done(tmp, self.rank, write_rank_state(tmp, self.rank, snapshot))
            if self.rank == 0:
                self.store.finalize(step, self.world, meta)
        except BaseException as e:  # surfaced in the training thread by wait()
            self._error = e

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def wait(self) -> None:
        """Block until a background save has finished (its errors are raised here)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_pending()

    def latest_dir(self) -> Path | None:
        found = self.store.newest_valid()
        return found.path if found else None
