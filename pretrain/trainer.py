"""The training loop, run by every rank: `pretrain train` starts `python -m launch.rank RUN_DIR`, which calls `main`.

RUN_DIR holds the resolved `config.yaml` written by `pretrain train` (its train.run_dir is RUN_DIR). One optimizer
step consumes one global batch; with pp == 1 the micro-batches go through the engine one by one (DeepSpeed
accumulates and steps at the boundary), with pp > 1 the pipeline engine runs them as 1F1B. Metrics go to the run
directory from rank 0.
"""

from __future__ import annotations

import faulthandler
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain import parallel
from pretrain.checkpoint.checkpointer import Checkpointer
from pretrain.checkpoint.state import (
    ShardReader,
    check_compatible,
    load_model_weights,
    load_optimizer_state,
    load_rng_state,
    read_trainer_state,
)
from pretrain.checkpoint.store import CheckpointError, CheckpointStore, verify
from pretrain.config import Config, ConfigError, load_config
from pretrain.engine import Built, build_engine
from pretrain.launch_contract import EXIT_SAVED_ON_SIGNAL, EXIT_USER_ERROR, STOP_SIGNALS
from pretrain.metrics import MetricsLogger, StepProfiler
from pretrain.plan import H100_BF16_PEAK_TFLOPS, flops_per_token


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _split(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed sample of seq_len + 1 tokens -> inputs and next-token labels."""
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


_ROLLBACK = "rollback"
# Testing hook: 1-based numbers of global batches (counted by the data loader) whose loss is made NaN, as a bad
# batch would; the real skip and rollback machinery then handles them. pp == 1 only.
INJECT_NONFINITE_ENV = "PRETRAIN_INJECT_NONFINITE_BATCHES"


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. it keeps diverging); the message says what to change."""


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, resume_from: Path | None = None,
                 stop_signals: tuple[int, ...] = STOP_SIGNALS,
                 data_position: dict | None = None, counters: dict | None = None):
        """`data_position` and `counters`, given on a rollback, replace the checkpoint's: the data goes on past
        the batches that diverged, and skipped steps and rollbacks stay counted."""
        from data_pipeline.loader import build_loader
        from data_pipeline.tokenizer import Tokenizer

        self.cfg = cfg
        self.run_dir = run_dir
        self.stop_signals = stop_signals
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        tokenizer = Tokenizer.load(cfg.data.tokenizer) if cfg.data.tokenizer else None
        seed_everything(cfg.train.seed)
        store = CheckpointStore(run_dir / "checkpoints", cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)
        ckpt = self._choose_checkpoint(store, resume_from)
        load_start = time.perf_counter()
        reader = ShardReader(ckpt, cfg.model) if ckpt else None
        state = read_trainer_state(ckpt) if ckpt else {}
        if ckpt:
            check_compatible(state.get("config", {}), cfg, ckpt)
        self.built: Built = build_engine(cfg, eos_id=tokenizer.eos_id if tokenizer else None,
                                         before_wrap=(lambda named: load_model_weights(reader, named)) if reader
                                         else None)
        self.engine = self.built.engine
        loader_args = {"dp_rank": parallel.dp_rank(), "dp_size": parallel.dp_size(),
                       "micro_batch": cfg.parallel.micro_batch, "vocab_size": cfg.model.vocab_size}
        self.loader = build_loader(cfg.data, **loader_args)
        self.eval_loader_args = loader_args
        self.checkpointer = Checkpointer(store, self.engine, self.built.canonical_names,
                                         cfg.model_dump(mode="json"),
                                         async_save=cfg.checkpoint.async_save and torch.cuda.is_available())
        self.step = int(state.get("step", 0))
        self.tokens_seen = int(state.get("tokens", 0))
        self.counters = {"skipped_steps": 0, "rollbacks": 0, **state.get("counters", {}), **(counters or {})}
        if reader:
            load_optimizer_state(reader, self.engine, self.built.canonical_names, state)
            if "loader" in state:  # a checkpoint made by `pretrain import` holds weights only: rng and data start fresh
                load_rng_state(ckpt, same_layout=state["layout"]["world"] == self.world and
                               state["layout"]["tp"] == cfg.parallel.tp and state["layout"]["pp"] == cfg.parallel.pp)
            load_s = time.perf_counter() - load_start
            self.log_rank0(f"resumed from {ckpt} at step {self.step}, loaded in {load_s:.1f} s")
        if data_position is not None or "loader" in state:
            self.loader.load_state_dict(data_position or state["loader"])
        self.tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)["total"]
        self.peak_flops = H100_BF16_PEAK_TFLOPS * 1e12 if torch.cuda.is_available() else None
        self.inject_nonfinite = {int(n) for n in os.environ.get(INJECT_NONFINITE_ENV, "").split(",") if n.strip()}
        self.stop_signal = 0
        for sig in stop_signals:
            signal.signal(sig, self._on_signal)

    def log_rank0(self, message: str) -> None:
        if self.rank == 0:
            print(f"[pretrain] {message}", file=sys.stderr, flush=True)

    def _choose_checkpoint(self, store: CheckpointStore, resume_from: Path | None) -> Path | None:
        """Rank 0 clears interrupted saves, verifies (hashing every file) and tells the others, so all ranks load
        the same checkpoint."""
        choice: list[object] = [None]
        if self.rank == 0:
            try:
                store.remove_incomplete()
                choice[0] = verify(resume_from).path if resume_from else getattr(store.newest_valid(), "path", None)
            except CheckpointError as e:
                choice[0] = e
        dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], CheckpointError):
            raise choice[0]
        return choice[0]

    def _on_signal(self, signum, _frame) -> None:
        # Only a flag: the save happens at the next step boundary, agreed on by every rank.
        self.stop_signal = signum

    def _poll(self) -> tuple[bool, bool]:
        """Once per step, agreed by every rank: (a stop signal arrived somewhere, every background save writer
        has finished)."""
        flags = torch.tensor([self.stop_signal, int(self.checkpointer.writing())], dtype=torch.int64,
                             device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0].item()), not bool(flags[1].item())

    def save(self, loss: float) -> None:
        self.checkpointer.save(self.step, {"step": self.step, "tokens": self.tokens_seen, "loss": loss,
                                           "loader": self.loader.state_dict(), "counters": self.counters})

    # ------------------------------------------------------------------ one step
    def _to_device(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.to(self.device, non_blocking=True) if self.device is not None else tokens

    def train_step(self, batches) -> tuple[float, float, bool]:
        """One optimizer step over a global batch: (mean loss over the global batch, data wait s, whether the
        update was applied: DeepSpeed skips it when the gradients are not finite)."""
        waited = 0.0

        def next_micro() -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal waited
            start = time.perf_counter()
            tokens = next(batches)["tokens"]
            waited += time.perf_counter() - start
            return tuple(self._to_device(t) for t in _split(tokens))

        if self.built.pipelined:
            loss = self.engine.train_batch(data_iter=_Repeat(next_micro))
            return float(loss), waited, self.engine.was_step_applied()
        accum = self.engine.gradient_accumulation_steps()
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            inputs, labels = next_micro()
            loss = self.engine(inputs, labels)
            if micro == 0 and self.inject_nonfinite and self._data_batch(accum) in self.inject_nonfinite:
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach()
        total /= accum
        dist.all_reduce(total, group=parallel.dp_group())
        return float(total) / parallel.dp_size(), waited, self.engine.was_step_applied()

    def _data_batch(self, accum: int) -> int:
        """The 1-based number of the global batch being consumed, as the data loader counts them."""
        return (self.loader.state_dict()["step"] - 1) // accum + 1

    @torch.no_grad()
    def evaluate(self) -> float | None:
        from data_pipeline.loader import build_loader

        if not self.cfg.data.eval:
            return None
        # A fresh loader each time: every evaluation reads the same held-out batches.
        batches = iter(build_loader(self.cfg.data, split="eval", **self.eval_loader_args))
        self.engine.eval()
        losses = []
        accum = self.engine.gradient_accumulation_steps()
        for _ in range(self.cfg.train.eval_steps):
            if self.built.pipelined:
                data = _Repeat(lambda: tuple(self._to_device(t) for t in _split(next(batches)["tokens"])))
                losses.append(float(self.engine.eval_batch(data_iter=data)))
                continue
            for _ in range(accum):
                inputs, labels = (self._to_device(t) for t in _split(next(batches)["tokens"]))
                losses.append(float(self.engine(inputs, labels)))
        self.engine.train()
        mean = torch.tensor(sum(losses) / len(losses), dtype=torch.float64)
        dist.all_reduce(mean, group=parallel.dp_group())
        return float(mean) / parallel.dp_size()

    # ------------------------------------------------------------------ the loop
    def fit(self) -> int | str:
        """Train to train.steps. Returns the process exit code (EXIT_SAVED_ON_SIGNAL after a signal), or
        _ROLLBACK after train.max_nonfinite_in_row skipped steps in a row."""
        cfg = self.cfg
        metrics = MetricsLogger(cfg, self.run_dir, cfg.train.steps, self.step, enabled=self.rank == 0)
        batches = iter(self.loader)
        window_start, window_tokens, window_wait = time.perf_counter(), 0, 0.0
        loss = float("nan")
        outcome: int | str = 0
        nonfinite_in_row = 0
        profiler = StepProfiler(cfg.logging.profile_step, self.run_dir, enabled=self.rank == 0)
        while self.step < cfg.train.steps:
            self._arm_watchdog()
            profiler.before_step(self.step + 1)
            loss, waited, applied = self.train_step(batches)
            self.step += 1
            profiler.after_step(self.step)
            self.tokens_seen += self.tokens_per_step
            window_tokens += self.tokens_per_step
            window_wait += waited
            nonfinite_in_row = 0 if applied else nonfinite_in_row + 1
            if not applied:
                self.counters["skipped_steps"] += 1
                self.log_rank0(f"step {self.step}: loss {loss} or its gradients are not finite: update skipped "
                               f"({nonfinite_in_row} in a row, {self.counters['skipped_steps']} in all)")
            if self.step % cfg.logging.every_steps == 0 or self.step == cfg.train.steps:
                elapsed = time.perf_counter() - window_start
                values = self._step_metrics(loss, elapsed, window_tokens, window_wait)
                metrics.log(self.step, values)
                window_start, window_tokens, window_wait = time.perf_counter(), 0, 0.0
            if nonfinite_in_row >= cfg.train.max_nonfinite_in_row:
                outcome = _ROLLBACK
                break
            if cfg.train.eval_every and (self.step % cfg.train.eval_every == 0 or self.step == cfg.train.steps):
                eval_loss = self.evaluate()
                if eval_loss is not None:
                    metrics.log(self.step, {"loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50))}, "eval")
            stop, writers_done = self._poll()
            if writers_done:
                self.checkpointer.settle()
            if stop:
                self.log_rank0(f"signal {self.stop_signal or 'on another rank'}: saving step {self.step} and exiting")
                self.save(loss)
                outcome = EXIT_SAVED_ON_SIGNAL
                break
            every = cfg.checkpoint.every_steps
            if (every and self.step % every == 0) or self.step == cfg.train.steps:
                self.save(loss)
        faulthandler.cancel_dump_traceback_later()
        self.checkpointer.settle()
        dist.barrier()
        # After a stop signal the scheduler's grace period is short: the plot waits for the run's real end.
        metrics.close(plot=outcome != EXIT_SAVED_ON_SIGNAL)
        return outcome

    def rolled_back(self) -> Trainer:
        """A trainer restarted from the newest checkpoint, its data going on past the batches that diverged."""
        if self.counters["rollbacks"] >= self.cfg.train.max_rollbacks:
            raise TrainingError(
                f"{self.cfg.train.max_nonfinite_in_row} steps in a row had a non-finite loss or gradients again after "
                f"{self.counters['rollbacks']} rollbacks: lower optim.lr, raise optim.warmup_steps or check the "
                "data, then resume"
            )
        position, counters = self.loader.state_dict(), {**self.counters, "rollbacks": self.counters["rollbacks"] + 1}
        if self.checkpointer.store.newest_valid(hash_files=False) is None:
            raise TrainingError(
                f"{self.cfg.train.max_nonfinite_in_row} steps in a row had a non-finite loss or gradients before "
                "the first checkpoint, so there is nothing to roll back to: lower optim.lr or check the data"
            )
        self.log_rank0(f"rolling back to the newest checkpoint (rollback {counters['rollbacks']}); the data goes on "
                       "after the batches that diverged")
        return Trainer(self.cfg, self.run_dir, None, self.stop_signals, data_position=position, counters=counters)

    def _arm_watchdog(self) -> None:
        """If no step completes in train.watchdog_s (a hung collective), dump every thread's stack and exit."""
        if self.cfg.train.watchdog_s:
            faulthandler.dump_traceback_later(self.cfg.train.watchdog_s, exit=True)

    def _step_metrics(self, loss: float, elapsed: float, tokens: int, waited: float) -> dict[str, float]:
        steps = max(1, tokens // self.tokens_per_step)
        tokens_per_s = tokens / elapsed
        values = {
            "loss": loss,
            "lr": self.engine.get_lr()[0],
            "tokens": self.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_gpu": tokens_per_s / self.world,
            "step_time_s": elapsed / steps,
            "data_wait_s": waited / steps,
            "checkpoint_stall_s": self.checkpointer.last_stall_s,
            "checkpoint_write_s": self.checkpointer.last_write_s,
            **self.counters,
        }
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:  # DeepSpeed does not keep it without ZeRO
            values["grad_norm"] = float(grad_norm)
        if self.peak_flops is not None:
            values["mfu"] = tokens_per_s / self.world * self.flops_per_token / self.peak_flops
            values["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            import psutil

            values["memory_gib"] = psutil.Process().memory_info().rss / 2**30
        return values


class _Repeat:
    """An endless iterator over a function's results, for DeepSpeed's pipeline `data_iter`."""

    def __init__(self, fn):
        self.fn = fn

    def __iter__(self):
        return self

    def __next__(self):
        return self.fn()


def run(cfg: Config, run_dir: Path, resume_from: Path | None = None,
        stop_signals: tuple[int, ...] = STOP_SIGNALS) -> int:
    parallel.init_distributed(cfg.parallel.tp, cfg.parallel.pp, rendezvous_timeout_s=cfg.train.rendezvous_timeout_s)
    try:
        trainer = Trainer(cfg, run_dir, resume_from, stop_signals)
        while (outcome := trainer.fit()) == _ROLLBACK:
            trainer = trainer.rolled_back()
        return outcome
    finally:
        parallel.destroy()


def load_run_config(run_dir: Path) -> Config:
    """RUN_DIR/config.yaml, which must name RUN_DIR as its train.run_dir: the run directory has one source."""
    cfg = load_config(run_dir / "config.yaml")
    if Path(cfg.train.run_dir).resolve() != run_dir.resolve():
        raise ConfigError(
            f"{run_dir / 'config.yaml'} has train.run_dir={cfg.train.run_dir}, not the directory it lies in: start "
            f"the run with `pretrain train {run_dir / 'config.yaml'} --run-dir {run_dir}`, which writes it"
        )
    return cfg


def main(run_dir: Path, resume_from: Path | None = None) -> int:
    """One rank, its environment set up by launch.rank; returns the exit status (pretrain.launch_contract)."""
    from data_pipeline.errors import DataError

    try:
        return run(load_run_config(run_dir), run_dir, resume_from)
    except (CheckpointError, ConfigError, DataError, TrainingError, parallel.RendezvousError) as e:
        print(f"[pretrain] rank {os.environ.get('RANK', '0')}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
