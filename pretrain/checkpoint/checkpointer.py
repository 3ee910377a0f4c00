"""Saving and restoring a training run: the trainer's one entry point into checkpointing.

A save snapshots this rank's state into host memory (the only part the training loop waits for: the stall) and
writes it into `.tmp-step_N/`. Then the ranks *settle* it together: they agree whether every rank wrote its part,
rank 0 finalizes (manifest last, rename, `latest`), or, if any rank failed (a full disk, say), the partial directory
is removed and every rank raises the same CheckpointError, so the previous checkpoint stays the newest. With
`async_save` the writing runs in a background thread while training continues, and the trainer settles once its
per-step poll shows every rank's writer finished (or at the next save, a stop, or the end of the run).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.checkpoint.state import snapshot_rank_state, write_rank_state
from pretrain.checkpoint.store import CheckpointError, CheckpointStore, mark_rank_done


@dataclass
class _PendingSave:
    step: int
    meta: dict
    thread: threading.Thread | None = None
    error: BaseException | None = None
    write_s: float = 0.0


class Checkpointer:
    def __init__(self, store: CheckpointStore, engine, canonical, config: dict, async_save: bool):
        self.store = store
        self.engine = engine
        self.canonical = canonical
        self.config = config
        self.async_save = async_save
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        self._pending: _PendingSave | None = None
        self.last_stall_s = 0.0  # how long the training loop waited for the last save
        self.last_write_s = 0.0  # how long the slowest rank took to write it (in the background when async)

    def save(self, step: int, trainer_state: dict) -> None:
        self.settle()
        start = time.perf_counter()
        pending = _PendingSave(step, {"tokens": trainer_state.get("tokens"), "loss": trainer_state.get("loss")})
        if self.rank == 0:
            try:
                self.store.prepare(step)
            except (OSError, CheckpointError) as e:
                pending.error = e
        # Nobody writes before rank 0 has made a fresh temporary directory, and everybody learns if it could not.
        if self._any_rank(pending.error is not None):
            self._fail(pending, "preparing")
        snapshot = snapshot_rank_state(self.engine, self.canonical, trainer_state, self.config)
        self._pending = pending
        if self.async_save:
            self.last_stall_s = time.perf_counter() - start
            self._pending.thread = threading.Thread(target=self._write, args=(self._pending, snapshot))
            self._pending.thread.start()
        else:
            self._write(self._pending, snapshot)
            self.settle()
            self.last_stall_s = time.perf_counter() - start

    def _write(self, pending: _PendingSave, snapshot: dict) -> None:
        start = time.perf_counter()
        try:
            tmp = self.store.tmp_dir(pending.step)
            mark_rank_done(tmp, self.rank, write_rank_state(tmp, self.rank, snapshot))
        except BaseException as e:  # reported to every rank by settle()
            pending.error = e
        pending.write_s = time.perf_counter() - start

    def writing(self) -> bool:
        """This rank's background writer is still running (the trainer's per-step poll reduces it over ranks)."""
        return self._pending is not None and self._pending.thread is not None and self._pending.thread.is_alive()

    def settle(self) -> None:
        """Collective: finish the pending save on every rank; finalize it or remove it and raise CheckpointError."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.thread is not None:
            pending.thread.join()
        failed, self.last_write_s = self._max_over_ranks(float(pending.error is not None), pending.write_s)
        if failed:
            self._fail(pending, "writing")
        if self.rank == 0:
            try:
                final = self.store.finalize(pending.step, self.world, pending.meta)
                size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
                print(f"[pretrain] checkpoint step {pending.step}: {size / 1e9:.2f} GB written in "
                      f"{self.last_write_s:.1f} s ({size / 1e9 / max(self.last_write_s, 1e-9):.2f} GB/s)",
                      file=sys.stderr, flush=True)
            except (OSError, CheckpointError) as e:
                pending.error = e
        if self._any_rank(pending.error is not None):
            self._fail(pending, "finalizing")

    def _max_over_ranks(self, *values: float) -> list[float]:
        reduced = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        return reduced.tolist()

    def _any_rank(self, flag: bool) -> bool:
        return bool(self._max_over_ranks(float(flag))[0])

    def _fail(self, pending: _PendingSave, stage: str) -> None:
        if self.rank == 0:
            self.store.abandon(pending.step)
        newest = self.store.complete_steps()
        cause = f"{pending.error}" if pending.error is not None else "failed on another rank"
        raise CheckpointError(
            f"{stage} checkpoint step {pending.step} under {self.store.root} failed ({cause}): free disk space or "
            f"point train.run_dir at a writable file system, then resume; the newest complete checkpoint is "
            + (f"step {newest[-1]}, untouched" if newest else "none")
        )
