"""Saving and restoring a training run: the trainer's one entry point into checkpointing.

Like torchtitan's checkpointer, one object covers every stateful part of a run: the model and its float32 masters,
the optimizer (Adam moments), the learning-rate schedule, the data loader's position, each rank's random
generators and the trainer's counters (`TrainState`). `restore` loads the checkpoint to start from, on a start as
on a rollback: the newest one that loads intact (hashed while read), saying why any newer one was skipped.

A save snapshots this rank's state into host memory (the only part the training loop waits for: the stall) and
writes it into `.tmp-step_N/`. Then the ranks *settle* it together: they agree whether every rank wrote its part,
rank 0 finalizes (manifest last, rename, `latest`), or, if any rank failed (a full disk, say), the partial directory
is removed and every rank raises the same CheckpointError, so the previous checkpoint stays the newest. With
`async_save` the writing runs in a background thread while training continues, and the trainer settles once its
per-step poll shows every rank's writer finished (or at the next save, a stop, or the end of the run); the pinned
host buffers the snapshot copies into are allocated in another background thread from the second step on, so that
no save waits for the seconds that pinning tens of gigabytes takes.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from pretrain import parallel
from pretrain.checkpoint.state import (
    Fragment,
    ShardReader,
    allocate_staging,
    check_compatible,
    load_model_and_optimizer,
    load_rng_state,
    rank_fragments,
    read_trainer_state,
    snapshot_rank_state,
    write_rank_state,
)
from pretrain.checkpoint.store import (
    CheckpointError,
    CheckpointStore,
    DamagedCheckpoint,
    complete_steps,
    mark_rank_done,
    step_dir_name,
    verify,
)
from pretrain.config import Config

T = TypeVar("T")


@dataclass
class TrainState:
    """The trainer's own counters, saved and restored with everything else."""

    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0  # non-finite and spikes
    spike_steps: int = 0
    rollbacks: int = 0
    # Each step skipped as a loss spike: its step, loss, grad_norm, what exceeded which threshold, its data.
    spikes: list[dict] = field(default_factory=list)
    # The spike guard's window: the loss and grad_norm of the latest applied steps, oldest first.
    spike_window: dict[str, list[float]] = field(default_factory=dict)

    def state_dict(self) -> dict:
        # Copies: an asynchronous save writes them while training goes on.
        return {"step": self.step, "tokens": self.tokens, "counters": self.counters(), "spikes": list(self.spikes),
                "spike_window": {key: list(values) for key, values in self.spike_window.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = int(state.get("step", 0)), int(state.get("tokens", 0))
        counters = state.get("counters", {})
        self.skipped_steps, self.rollbacks = counters.get("skipped_steps", 0), counters.get("rollbacks", 0)
        self.spike_steps = counters.get("spike_steps", 0)
        self.spikes, self.spike_window = state.get("spikes", []), state.get("spike_window", {})

    def counters(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "spike_steps": self.spike_steps, "rollbacks": self.rollbacks}


@dataclass
class _PendingSave:
    step: int
    meta: dict
    thread: threading.Thread | None = None
    error: BaseException | None = None
    write_s: float = 0.0


class Checkpointer:
    def __init__(self, cfg: Config, run_dir: Path, engine, canonical: dict[torch.nn.Parameter, str], loader,
                 train_state: TrainState):
        self.store = CheckpointStore(run_dir / "checkpoints", cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)
        self.cfg = cfg
        self.config = cfg.model_dump(mode="json")
        self.engine = engine
        self.canonical = canonical
        self.loader = loader
        self.train_state = train_state
        self.async_save = cfg.checkpoint.async_save
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        self._pending: _PendingSave | None = None
        # Pinned host buffers of this rank's part, reused by every asynchronous save from a GPU; synchronous saves
        # (and any on CPU) copy into pageable memory. Allocated by a background thread (`start_staging`) that the
        # first save waits for.
        self._staging: dict[str, torch.Tensor] | None = {} if self.async_save and torch.cuda.is_available() else None
        self._staging_thread: threading.Thread | None = None
        self._staging_error: BaseException | None = None
        self.last_stall_s = 0.0  # how long the training loop waited for the last save
        self.last_write_s = 0.0  # how long the slowest rank took to write it (in the background when async)

    # ------------------------------------------------------------------ loading

    def restore(self, resume_from: Path | None) -> Path | None:
        """Load the checkpoint to start from and return it: `resume_from`, or the newest one under the run's
        checkpoints that loads intact (None when there is none). Rank 0 clears interrupted saves and checks each
        candidate's manifest, file sizes and small files; the parameter files are hashed while they load (`load`).
        A damaged checkpoint is skipped, saying why; a damaged `resume_from`, or checkpoints none of which is intact,
        is an error. Collective."""
        def rank0_candidates() -> list[Path]:
            self.store.remove_incomplete()
            if resume_from is not None:
                return [resume_from]
            return [self.store.root / step_dir_name(step) for step in reversed(complete_steps(self.store.root))]

        candidates = self._decided_on_rank0(rank0_candidates)
        for ckpt in candidates:
            try:
                self._decided_on_rank0(lambda ckpt=ckpt: verify(ckpt, deferred="model"))
                self.load(ckpt)
                return ckpt
            except DamagedCheckpoint as e:
                if resume_from is not None:
                    raise
                if self.rank == 0:
                    _log(f"skipping a damaged checkpoint: {e}")
        if candidates:
            # Damage may show only once some of a checkpoint is loaded, and starting over would let retention delete
            # the damaged ones.
            raise CheckpointError(
                f"no checkpoint under {self.store.root} loads intact (each was skipped, above): restore a good copy "
                "of one there, or move them away to start the run over"
            )
        return None

    def _decided_on_rank0(self, decide: Callable[[], T]) -> T:
        """What `decide()` returns on rank 0 (or the CheckpointError it raises), on every rank. Collective."""
        choice: list[object] = [None]
        if self.rank == 0:
            try:
                choice[0] = decide()
            except CheckpointError as e:
                choice[0] = e
        dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], CheckpointError):
            raise choice[0]
        return choice[0]

    def load_weights(self, source: Path) -> None:
        """train.init_from: only the weights of `source` (a checkpoint, or a run directory's newest one that
        verifies); the optimizer, schedule, data position and counters start fresh, as for a fine-tune. Collective."""
        from pretrain.checkpoint.weights import resolve_checkpoint

        ckpt = self._decided_on_rank0(lambda: resolve_checkpoint(source).path)
        check_compatible(read_trainer_state(ckpt).get("config", {}), self.cfg, ckpt)
        load_model_and_optimizer(ShardReader(ckpt, self.cfg.model), self.engine, self.canonical, {},
                                 weights_only=True)
        if self.rank == 0:
            _log(f"initialized the weights from {ckpt} (train.init_from); optimizer, schedule and data start fresh")

    def load(self, ckpt: Path) -> None:
        """Every stateful part from `ckpt`: weights and masters, Adam moments, schedule, then (for a training
        checkpoint, not one made by `pretrain import`) the random generators, the loader's position and the
        counters. The parameter files are hashed while they are read, each rank a share of their blocks, so that
        verifying costs no second pass over the disk; if any block does not match its manifest, every rank raises
        DamagedCheckpoint before the generators, loader or counters are touched. Collective."""
        start = time.perf_counter()
        state = read_trainer_state(ckpt)
        check_compatible(state.get("config", {}), self.cfg, ckpt)
        with ThreadPoolExecutor(1) as background:
            hashing = background.submit(verify, ckpt, share=(self.rank, self.world))
            try:
                load_model_and_optimizer(ShardReader(ckpt, self.cfg.model), self.engine, self.canonical, state)
            except Exception:
                if isinstance(hashing.exception(), DamagedCheckpoint):  # it failed on damaged bytes
                    raise hashing.exception() from None
                raise
        damage = self._first_message_over_ranks(hashing.exception())
        if damage is not None:
            raise DamagedCheckpoint(damage)
        if "loader" in state:
            if not load_rng_state(ckpt, state["layout"]) and self.rank == 0:
                _log(f"{ckpt} was saved in another layout ({state['layout']}): the random generators start from "
                     "the seed")
            self.loader.load_state_dict(state["loader"])
        self.train_state.load_state_dict(state)
        if self.rank == 0:
            _log(f"resumed from {ckpt} at step {self.train_state.step}, loaded in {time.perf_counter() - start:.1f} s")

    def _first_message_over_ranks(self, error: BaseException | None) -> str | None:
        """The message of the lowest rank's `error`, on every rank (None if no rank has one). Collective."""
        messages: list[str | None] = [None] * self.world
        dist.all_gather_object(messages, None if error is None else str(error))
        return next((message for message in messages if message is not None), None)

    # ------------------------------------------------------------------ saving

    def start_staging(self) -> None:
        """Called after the first step: started with the checkpointer, the pinning (12 s for 18.8 GB on an H200
        host) delayed the startup by as much; from the second step on it overlaps training. Only when saves are
        scheduled: a run that saves only on a stop signal pins its buffers at that save."""
        scheduled = self.cfg.checkpoint.every_steps > 0 or self.cfg.checkpoint.save_final
        if self._staging is None or self._staging_thread is not None or not scheduled:
            return
        fragments = rank_fragments(self.canonical, parallel.dp_cp_rank(), parallel.dp_cp_size())
        self._staging_thread = threading.Thread(target=self._allocate_staging, args=(fragments,), daemon=True)
        self._staging_thread.start()

    def _allocate_staging(self, fragments: list[Fragment]) -> None:
        """In a background thread: no collectives here, and a failure is raised by `_staging_ready`."""
        start = time.perf_counter()
        try:
            torch.cuda.set_device(self.device)  # a new thread starts on device 0
            size = allocate_staging(fragments, self._staging)
        except BaseException as e:
            self._staging_error = e
            return
        if self.rank == 0:
            _log(f"checkpoint: {size / 1e9:.1f} GB of pinned host memory for asynchronous saves ready in "
                 f"{time.perf_counter() - start:.1f} s (rank 0's part)")

    def _staging_ready(self) -> None:
        """Collective at each asynchronous save once staging has started: wait for the staging buffers (at once
        after the first save); if any rank could not allocate its own, every rank raises (one rank alone would leave
        the others waiting in the save's collectives)."""
        if self._staging_thread is None:
            return
        self._staging_thread.join()
        if self._any_rank(self._staging_error is not None):
            error = self._staging_error
            cause = f"{type(error).__name__}: {error}" if error is not None else "failed on another rank"
            raise CheckpointError(
                f"allocating pinned host memory for asynchronous checkpoint saves failed ({cause}): free host memory "
                "on the nodes or set checkpoint.async_save=false (synchronous saves pin no memory)"
            )

    def save(self, loss: float) -> None:
        """Checkpoint the current step (collective); returns once this rank's state is in host memory, or written
        too without async_save."""
        self.settle()
        start = time.perf_counter()
        self._staging_ready()
        step = self.train_state.step
        trainer_state = {**self.train_state.state_dict(), "loss": loss, "loader": self.loader.state_dict()}
        pending = _PendingSave(step, {"tokens": self.train_state.tokens, "loss": loss})
        if self.rank == 0:
            try:
                self.store.prepare(step)
            except (OSError, CheckpointError) as e:
                pending.error = e
        # Nobody writes before rank 0 has made a fresh temporary directory, and everybody learns if it could not.
        if self._any_rank(pending.error is not None):
            self._fail(pending, "preparing")
        snapshot = snapshot_rank_state(self.engine, self.canonical, trainer_state, self.config, self._staging)
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
        pending = self._pending
        if pending is None:
            return
        if pending.thread is not None:
            pending.thread.join()
        failed, self.last_write_s = self._max_over_ranks(float(pending.error is not None), pending.write_s)
        # Every rank knows the outcome now: from here on rank 0 alone finishes the save (an error on another rank
        # must not also finish it: `complete_after_error`).
        self._pending = None
        if failed:
            self._fail(pending, "writing")
        if self.rank == 0:
            try:
                final = self.store.finalize(pending.step, self.world, pending.meta)
                size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
                _log(f"checkpoint step {pending.step}: {size / 1e9:.2f} GB written in {self.last_write_s:.1f} s "
                     f"({size / 1e9 / max(self.last_write_s, 1e-9):.2f} GB/s)")
            except (OSError, CheckpointError) as e:
                pending.error = e
        if self._any_rank(pending.error is not None):
            self._fail(pending, "finalizing")

    def complete_after_error(self) -> None:
        """After an error in the training loop, before the process exits: the save still being written completes
        and becomes the newest checkpoint, or, if it cannot, is removed. Not collective (the other ranks may be gone,
        or blocked in a collective): this rank finishes its own part, then whichever rank finds every rank's part
        written finalizes the save; the other ranks' writers run on in the background of their processes."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.thread is not None:
            pending.thread.join()
        if pending.error is not None:
            self.store.abandon(pending.step)  # this rank's part is missing: no rank can finish the save
            _log(f"rank {self.rank}: removed the unfinished checkpoint step {pending.step} ({pending.error})")
            return
        # The other ranks write as much as this one, in parallel: a rank that has not finished well after it never
        # will (it was killed).
        try:
            final = self.store.finalize_when_written(pending.step, self.world, pending.meta,
                                                     wait_s=max(60.0, 2 * pending.write_s))
        except (OSError, CheckpointError) as e:
            _log(f"rank {self.rank}: could not complete checkpoint step {pending.step} ({e})")
            return
        if final is not None:
            _log(f"rank {self.rank}: completed checkpoint step {pending.step}, which was being written when the "
                 "error came: the run resumes from it")

    def _max_over_ranks(self, *values: float) -> list[float]:
        return parallel.all_reduce_numbers(values, op=dist.ReduceOp.MAX)

    def _any_rank(self, flag: bool) -> bool:
        return bool(self._max_over_ranks(float(flag))[0])

    def _fail(self, pending: _PendingSave, stage: str) -> None:
        if self.rank == 0:
            self.store.abandon(pending.step)
        newest = complete_steps(self.store.root)
        cause = f"{pending.error}" if pending.error is not None else "failed on another rank"
        raise CheckpointError(
            f"{stage} checkpoint step {pending.step} under {self.store.root} failed ({cause}): free disk space or "
            f"point train.run_dir at a writable file system, then resume; the newest complete checkpoint is "
            + (f"step {newest[-1]}, untouched" if newest else "none")
        )


def _log(message: str) -> None:
    print(f"[pretrain] {message}", file=sys.stderr, flush=True)
