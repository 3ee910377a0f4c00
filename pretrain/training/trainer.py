"""The training loop, run by every rank: `pretrain train` starts `python -m launch.rank RUN_DIR`, which calls `main`.

RUN_DIR holds the resolved `config.yaml` written by `pretrain train` (its train.run_dir is RUN_DIR). One optimizer
step consumes one global batch; with pp == 1 the micro-batches go through the engine one by one (DeepSpeed
accumulates and steps at the boundary), with pp > 1 the pipeline engine runs them as 1F1B. Metrics go to the run
directory from rank 0.
A stop signal (pretrain.training.stop) ends a rank at once with exit 1 before the first step; after it, every rank
saves at the next step boundary and exits 75. The loop marks its progress for the hang watchdog
(pretrain.training.hang), which ends the run with one line and exit 124 when a rank makes none for
train.hang_timeout_s.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain import parallel
from pretrain.checkpoint.checkpointer import Checkpointer, TrainState
from pretrain.checkpoint.store import CheckpointError
from pretrain.config import Config, ConfigError, TrainConfig, load_config
from pretrain.dtypes import resolve_dtype
from pretrain.hardware import peak_flops
from pretrain.launch_contract import EXIT_FAILURE, EXIT_HANG, EXIT_SAVED_ON_SIGNAL, EXIT_USER_ERROR, rank_log
from pretrain.model.attention import needs_mask, resolve_backend
from pretrain.plan import halo_tokens
from pretrain.training.determinism import make_deterministic
from pretrain.training.engine import Built, build_engine
from pretrain.training.evaluator import Evaluator
from pretrain.training.global_batch import GlobalBatchReader
from pretrain.training.hang import HangWatchdog
from pretrain.training.metrics import MetricsLogger, StepMetrics, StepProfiler
from pretrain.training.op_builds import op_builds
from pretrain.training.spike_guard import SPIKE_FACTOR, SpikeGate
from pretrain.training.stop import StopSignals


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seconds_since_process_start() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


_ROLLBACK = "rollback"


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. it keeps diverging); the message says what to change."""


class Trainer:
    """One rank's training by concern: the setup (`__init__`: the engine, the data loaders, the checkpointer and the
    checkpoint loaded), one optimizer step (`train_step`, over the global batch `GlobalBatchReader` reads), the loop
    (`fit`, and `roll_back` after it diverged). The evaluations are the `Evaluator`'s, the values logged
    `StepMetrics`'."""

    def __init__(self, cfg: Config, run_dir: Path, stop: StopSignals, watchdog: HangWatchdog,
                 resume_from: Path | None = None):
        from data_pipeline.loader import build_loader
        from data_pipeline.tokenizer import Tokenizer

        self.cfg = cfg
        self.run_dir = run_dir
        self.stop = stop
        self.watchdog = watchdog
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        tokenizer = Tokenizer.load(cfg.data.tokenizer) if cfg.data.tokenizer else None
        seed_everything(cfg.train.seed)
        if cfg.train.deterministic:
            make_deterministic()
        self.startup = {"python_and_process_group_s": seconds_since_process_start()}
        with op_builds() as ops:
            watchdog.progress(f"startup, DeepSpeed engine (its ops build in {ops})")
            self.built: Built = build_engine(cfg, eos_id=tokenizer.eos_id if tokenizer else None)
        self.startup.update(self.built.setup_s)
        self.engine = self.built.engine
        self.global_batch = GlobalBatchReader(self.engine.gradient_accumulation_steps(), self.device,
                                              cfg.data.loss_mask, watchdog)
        watchdog.progress("startup, data loaders")
        loader_args = {"dp_rank": parallel.dp_rank(), "dp_size": parallel.dp_size(),
                       "cp_rank": parallel.cp_rank(), "cp_size": parallel.cp_size(),
                       "micro_batch": cfg.parallel.micro_batch, "vocab_size": cfg.model.vocab_size}
        self.loader = build_loader(cfg.data, **loader_args)
        self.evaluator = None
        if cfg.data.eval and cfg.train.eval_every:
            self.evaluator = Evaluator(build_loader(cfg.data, split="eval", **loader_args), cfg.train.eval_steps,
                                       self.built, self.global_batch, watchdog)
        self.state = TrainState()
        self.checkpointer = Checkpointer(cfg, run_dir, self.engine, self.built.canonical_names, self.loader,
                                         self.state)
        checkpoint_start = time.perf_counter()
        with watchdog.long_operation("startup, loading the checkpoint"):
            if self.checkpointer.restore(resume_from) is None and cfg.train.init_from is not None:
                self.checkpointer.load_weights(Path(cfg.train.init_from))
        self.startup["checkpoint_s"] = time.perf_counter() - checkpoint_start
        self.tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
        device_name = torch.cuda.get_device_name(self.device) if self.device is not None else None
        self.step_metrics = StepMetrics(cfg, self.engine, self.checkpointer, self.state, self.world, self.device,
                                        peak_flops(cfg, device_name, self.log_rank0))
        self.spike_gate = None
        if cfg.train.spike_guard.enabled:
            self.spike_gate = SpikeGate(cfg.train.spike_guard, self.engine, self.state)
            self.engine.client_optimizer.gate = self.spike_gate
        self.inject_nonfinite = set(cfg.train.inject_nonfinite_batches)
        self.inject_spike = set(cfg.train.inject_spike_batches)
        self._log_setup()

    def log_rank0(self, message: str) -> None:
        if self.rank == 0:
            print(f"[pretrain] {message}", file=sys.stderr, flush=True)

    def _log_setup(self) -> None:
        """What the config leaves to this machine (the attention kernel), and how the run is set up where that is
        not plain from the config: context parallelism, FP8, injected faults."""
        cfg, m = self.cfg, self.cfg.model
        # With context parallelism, the last chunk's queries over its keys (the halo's, then its own).
        chunk_len, halo = cfg.data.seq_len // cfg.parallel.cp, halo_tokens(cfg)
        kernel = resolve_backend(m.attention_backend, self.device or torch.device("cpu"),
                                 resolve_dtype(cfg.train.dtype),
                                 needs_mask(chunk_len, m.sliding_window, m.document_masking, chunk_len + halo))
        self.log_rank0(f"attention: {kernel}" + (" (auto)" if m.attention_backend == "auto" else ""))
        if cfg.parallel.cp > 1:
            self.log_rank0(f"context parallel: {cfg.parallel.cp} chunks of {chunk_len} tokens per sequence; each rank "
                           f"receives the keys and values of up to {halo} positions before its chunk")
        if cfg.train.fp8 != "off":
            self.log_rank0(f"fp8 ({cfg.train.fp8} scaling): {len(self.built.float8.names)} linear layers of this "
                           f"rank multiply in float8; in bf16: {', '.join(cfg.train.fp8_bf16_layers) or 'none'}; MFU "
                           "is counted against the bf16 peak")
        if self.inject_nonfinite:
            self.log_rank0(f"train.inject_nonfinite_batches: the loss of global batches "
                           f"{sorted(self.inject_nonfinite)} is made NaN (a test of skipping and rolling back)")
        if self.inject_spike:
            self.log_rank0(f"train.inject_spike_batches: the loss of global batches {sorted(self.inject_spike)} is "
                           f"multiplied by {SPIKE_FACTOR:g} (a test of the spike guard)")
        if cfg.train.inject_error_at_step:
            self.log_rank0(f"train.inject_error_at_step: rank {self.world - 1} raises an error in step "
                           f"{cfg.train.inject_error_at_step} (a test of crash handling)")
        if cfg.train.inject_hang_at_step:
            what = {"collective": "skips the stop-signal poll", "eval_data": "never gets its evaluation data"}
            self.log_rank0(f"train.inject_hang={cfg.train.inject_hang}: rank {self.world - 1} "
                           f"{what[cfg.train.inject_hang]} after step {cfg.train.inject_hang_at_step} (a test of hang "
                           "reports)")

    def _report_startup(self, metrics: MetricsLogger, first_step_s: float) -> None:
        """How long each phase before the first step took (once per process), to the terminal and the metrics."""
        times = {**self.startup, "first_step_s": first_step_s, "to_first_step_s": seconds_since_process_start()}
        metrics.write(self.state.step, times, "startup")
        self.log_rank0("startup: " + ", ".join(f"{key.removesuffix('_s').replace('_', ' ')} {value:.1f} s"
                                               for key, value in times.items()))
        self.startup = {}

    def _injected_hang(self, kind: str) -> bool:
        train = self.cfg.train
        return (train.inject_hang == kind and self.state.step == train.inject_hang_at_step
                and self.rank == self.world - 1)

    # ------------------------------------------------------------------ one step
    def train_step(self, batches) -> tuple[float, float, bool]:
        """One optimizer step over a global batch: (mean loss over the global batch, data wait s, whether the
        update was applied: DeepSpeed skips it when the gradients are not finite, the spike gate when it is a
        spike)."""
        if self.state.step + 1 == self.cfg.train.inject_error_at_step and self.rank == self.world - 1:
            raise RuntimeError(f"train.inject_error_at_step={self.cfg.train.inject_error_at_step}: an error injected "
                               "into this step")
        where = f"step {self.state.step + 1}"
        start = time.perf_counter()
        micro_batches, divisor = self.global_batch.read(batches, where)
        waited = time.perf_counter() - start
        self.built.float8.refresh_weights()  # the last step (or a checkpoint load) changed the weights
        accum = len(micro_batches)
        if self.built.pipelined:
            self.built.pipeline_loss.divisor = divisor
            marked = self.global_batch.marked(micro_batches, f"{where}, pipeline micro-batch")
            if self.spike_gate is not None:
                self.spike_gate.expect(lambda: self._pipeline_loss(accum))
            return float(self.engine.train_batch(data_iter=marked)), waited, self.engine.was_step_applied()
        total = torch.zeros((), device=self.device)
        for micro, (inputs, labels) in enumerate(micro_batches):
            self.watchdog.progress(f"{where}, micro-batch {micro + 1}")
            loss = self.engine(inputs, labels, loss_divisor=divisor)
            if micro == 0 and (self.inject_nonfinite or self.inject_spike):
                loss = self._injected(loss, self._data_batch(accum))
            self.engine.backward(loss)
            total += loss.detach()
            if micro < accum - 1:
                self.engine.step()  # accumulates only: the last micro-batch's step() updates, below
        self.watchdog.progress(f"{where}, loss all-reduce")
        [total_over_ranks] = parallel.all_reduce_numbers([float(total) / accum], group=parallel.dp_cp_group())
        step_loss = total_over_ranks / parallel.dp_cp_size()
        if self.spike_gate is not None:
            self.spike_gate.expect(lambda: step_loss)  # judged in the optimizer step
        self.engine.step()
        return step_loss, waited, self.engine.was_step_applied()

    def _pipeline_loss(self, accum: int) -> float:
        """Asked in the pipeline's optimizer step: the mean loss over the global batch as train_batch will return it
        (0 on stages before the last), from the pipeline engine's sum over this rank's micro-batches."""
        total = self.engine.total_loss if self.engine.is_last_stage() else None
        [over_ranks] = parallel.all_reduce_numbers([0.0 if total is None else float(total) / accum],
                                                   group=parallel.dp_cp_group())
        return over_ranks / parallel.dp_cp_size()

    def _injected(self, loss: torch.Tensor, data_batch: int) -> torch.Tensor:
        """The loss as train.inject_nonfinite_batches and train.inject_spike_batches make it for this batch."""
        if data_batch in self.inject_nonfinite:
            return loss * float("nan")
        if data_batch in self.inject_spike:
            return loss * SPIKE_FACTOR
        return loss

    def _data_batch(self, accum: int) -> int:
        """The 1-based number of the global batch being consumed, as the data loader counts them."""
        return (self.loader.state_dict()["step"] - 1) // accum + 1

    # ------------------------------------------------------------------ the loop
    def _poll(self) -> tuple[bool, bool]:
        """Once per step, agreed by every rank: (a stop signal arrived somewhere, every background save writer
        has finished)."""
        self.watchdog.progress(f"step {self.state.step}, stop-signal poll")
        if self._injected_hang("collective"):
            return bool(self.stop.requested), not self.checkpointer.writing()  # skips the collective
        stop, writing = parallel.all_reduce_numbers([self.stop.requested, self.checkpointer.writing()],
                                                    op=dist.ReduceOp.MAX)
        return bool(stop), not bool(writing)

    def fit(self) -> int | str:
        """Train to train.steps. Returns the process exit code (EXIT_SAVED_ON_SIGNAL after a signal), or
        _ROLLBACK after train.max_skipped_in_row skipped steps in a row."""
        cfg, state = self.cfg, self.state
        metrics = MetricsLogger(cfg, self.run_dir, cfg.train.steps, state.step, enabled=self.rank == 0)
        self.step_metrics.start_window()
        loss = float("nan")
        outcome: int | str = 0
        skipped_in_row = 0
        profiler = StepProfiler(cfg.logging.profile_step, self.run_dir, enabled=self.rank == 0)
        # Closed however the loop ends: the workers of an unclosed iterator outlive training (see Batches).
        with iter(self.loader) as batches:
            while state.step < cfg.train.steps:
                profiler.before_step(state.step + 1)
                step_start = time.perf_counter()
                loss, waited, applied = self.train_step(batches)
                state.step += 1
                if self.startup:
                    self._report_startup(metrics, time.perf_counter() - step_start)
                profiler.after_step(state.step)
                state.tokens += self.tokens_per_step
                self.step_metrics.add_data_wait(waited)
                skipped_in_row = 0 if applied else skipped_in_row + 1
                if not applied:
                    state.skipped_steps += 1
                    spike = self.spike_gate.spike if self.spike_gate is not None else None
                    if spike is None:
                        self.log_rank0(f"step {state.step}: loss {loss} or its gradients are not finite: update "
                                       f"skipped ({skipped_in_row} in a row, {state.skipped_steps} in all)")
                    else:
                        self._record_spike(metrics, spike, skipped_in_row)
                if state.step % cfg.logging.every_steps == 0 or state.step == cfg.train.steps:
                    metrics.log(state.step, self.step_metrics.values(loss))
                    self.step_metrics.start_window()
                if skipped_in_row >= cfg.train.max_skipped_in_row:
                    outcome = _ROLLBACK
                    break
                if self.evaluator and (state.step % cfg.train.eval_every == 0 or state.step == cfg.train.steps):
                    eval_loss = self.evaluator.evaluate(state.step, hang=self._injected_hang("eval_data"))
                    metrics.log(state.step, {"loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50))}, "eval")
                stop, writers_done = self._poll()
                self.stop.first_step_done()  # every rank is past step 1: a stop signal now means saving
                self.watchdog.first_step_done()
                self.checkpointer.start_staging()
                if writers_done:
                    with self.watchdog.long_operation(f"step {state.step}, finishing a save"):
                        self.checkpointer.settle()
                if stop:
                    self.log_rank0(f"signal {self.stop.requested or 'on another rank'}: saving step {state.step} "
                                   "and exiting")
                    with self.watchdog.long_operation(f"step {state.step}, save"):
                        self.checkpointer.save(loss)
                    outcome = EXIT_SAVED_ON_SIGNAL
                    break
                every = cfg.checkpoint.every_steps
                final = state.step == cfg.train.steps and cfg.checkpoint.save_final
                if (every and state.step % every == 0) or final:
                    with self.watchdog.long_operation(f"step {state.step}, save"):
                        self.checkpointer.save(loss)
        with self.watchdog.long_operation(f"step {state.step}, finishing a save"):
            self.checkpointer.settle()
        self.watchdog.progress(f"step {state.step}, end of the run")
        dist.barrier()
        self.watchdog.progress(f"step {state.step}, closing the metrics")
        # After a stop signal the scheduler's grace period is short: the plot waits for the run's real end.
        metrics.close(plot=outcome != EXIT_SAVED_ON_SIGNAL)
        return outcome

    def _record_spike(self, metrics: MetricsLogger, spike: dict, in_row: int) -> None:
        """A step skipped as a loss spike: in the checkpointed counters, metrics.jsonl (kind "spike") and one line."""
        state, global_batch = self.state, self._data_batch(self.engine.gradient_accumulation_steps())
        first_sample = (global_batch - 1) * self.cfg.train.global_batch
        record = {**spike, "global_batch": global_batch, "samples": [first_sample,
                                                                     first_sample + self.cfg.train.global_batch]}
        state.spike_steps += 1
        state.spikes.append({"step": state.step, **record})
        metrics.write(state.step, record, "spike")
        exceeded = spike["exceeded"]
        self.log_rank0(f"step {state.step}: {exceeded} {spike[exceeded]:.4g} is a spike (over {spike['threshold']:.4g}"
                       f" = mean + {spike['sigmas']:g} sigma of the last applied steps): update skipped ({in_row} in "
                       f"a row, {state.skipped_steps} in all), global batch {global_batch}")

    def roll_back(self) -> None:
        """Reload the newest checkpoint into this engine; the data goes on past the batches that diverged, and
        skipped steps and rollbacks stay counted."""
        if self.state.rollbacks >= self.cfg.train.max_rollbacks:
            raise TrainingError(
                f"{self.cfg.train.max_skipped_in_row} steps in a row were skipped (a non-finite loss or gradients, or "
                f"loss spikes) again after {self.state.rollbacks} rollbacks: lower optim.lr, raise "
                "optim.warmup_steps or check the data, then resume"
            )
        position, counters, spikes = self.loader.state_dict(), self.state.counters(), self.state.spikes
        with self.watchdog.long_operation(f"step {self.state.step}, rollback"):
            ckpt = self.checkpointer.restore(None)
        if ckpt is None:
            raise TrainingError(
                f"{self.cfg.train.max_skipped_in_row} steps in a row were skipped (a non-finite loss or gradients, or "
                "loss spikes) before the first checkpoint, so there is nothing to roll back to: lower optim.lr or "
                "check the data"
            )
        self.log_rank0(f"rolled back to {ckpt.name} (rollback {counters['rollbacks'] + 1}); the data goes on after the "
                       "batches that diverged")
        self.loader.load_state_dict(position)
        self.state.skipped_steps, self.state.spike_steps = counters["skipped_steps"], counters["spike_steps"]
        self.state.rollbacks, self.state.spikes = counters["rollbacks"] + 1, spikes


def collective_timeout_s(train: TrainConfig) -> float:
    """How long one collective may wait: past the hang watchdog's longest allowance (a collective of step 1 waits
    for the ranks that still compile), so that a hang is reported by it (where every rank waits, every thread's
    stack) before the process group's own timeout ends a rank (NCCL's watchdog aborts it without a Python stack)."""
    return max(train.hang_timeout_s, train.startup_timeout_s) + 60.0


def run(cfg: Config, run_dir: Path, watchdog: HangWatchdog, resume_from: Path | None = None) -> int:
    stop = StopSignals.install()  # before process-group setup and DeepSpeed: a stop signal must end them too
    timeout_s = collective_timeout_s(cfg.train)
    watchdog.progress("startup, process group")
    parallel.init_distributed(cfg.parallel.tp, cfg.parallel.pp, timeout_s=timeout_s,
                              rendezvous_timeout_s=cfg.train.rendezvous_timeout_s, cp=cfg.parallel.cp)
    print(f"[pretrain] process group: {dist.get_backend()}, {dist.get_world_size()} ranks, collective timeout "
          f"{timeout_s:.0f} s (train.hang_timeout_s={cfg.train.hang_timeout_s}, "
          f"train.startup_timeout_s={cfg.train.startup_timeout_s})", flush=True)
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir, stop, watchdog, resume_from)
        while (outcome := trainer.fit()) == _ROLLBACK:
            trainer.roll_back()
        return outcome
    except BaseException:
        if trainer is not None:
            with watchdog.long_operation("after an error, finishing a save"):
                trainer.checkpointer.complete_after_error()
        raise
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

    rank = int(os.environ.get("RANK", "0"))
    watchdog = None
    try:
        cfg = load_run_config(run_dir)
        watchdog = HangWatchdog(run_dir, cfg.train.hang_timeout_s, cfg.train.startup_timeout_s).start()
        return run(cfg, run_dir, watchdog, resume_from)
    except (CheckpointError, ConfigError, DataError, TrainingError, parallel.RendezvousError) as e:
        print(f"[pretrain] rank {rank}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except Exception as e:
        # The traceback goes to standard output, which launch.rank sends to the rank's log; the terminal gets a line.
        traceback.print_exc(file=sys.stdout)
        sys.stdout.flush()
        if watchdog is not None and watchdog.run_hung():
            return EXIT_HANG  # the error follows from the hang that was reported (its peers are gone, say)
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"[pretrain] rank {rank}: error: {type(e).__name__}: {first_line} (traceback in "
              f"{rank_log(run_dir, rank)})", file=sys.stderr, flush=True)
        return EXIT_FAILURE
