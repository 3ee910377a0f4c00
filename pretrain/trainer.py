"""The training loop, run by every rank: `python -m pretrain.trainer RUN_DIR`.

RUN_DIR holds the resolved `config.yaml` written by `pretrain train`. One optimizer step consumes one global
batch; with pp == 1 the micro-batches go through the engine one by one (DeepSpeed accumulates and steps at the
boundary), with pp > 1 the pipeline engine runs them as 1F1B. Metrics go to the run directory from rank 0.
"""

from __future__ import annotations

import argparse
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
from pretrain.config import Config, load_config
from pretrain.engine import Built, build_engine
from pretrain.metrics import MetricsLogger
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


EXIT_SAVED_ON_SIGNAL = 75  # EX_TEMPFAIL: preempted or out of time, checkpoint saved, run again to resume


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, resume_from: Path | None = None,
                 stop_signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        from data_pipeline.loader import build_loader
        from data_pipeline.tokenizer import Tokenizer

        self.cfg = cfg
        self.run_dir = run_dir
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        tokenizer = Tokenizer.load(cfg.data.tokenizer) if cfg.data.tokenizer else None
        seed_everything(cfg.train.seed)
        store = CheckpointStore(run_dir / "checkpoints", cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)
        ckpt = self._choose_checkpoint(store, resume_from)
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
        if reader:
            load_optimizer_state(reader, self.engine, self.built.canonical_names, state)
            load_rng_state(ckpt, same_layout=state["layout"]["world"] == self.world
                           and state["layout"]["tp"] == cfg.parallel.tp and state["layout"]["pp"] == cfg.parallel.pp)
            self.loader.load_state_dict(state["loader"])
            self.log_rank0(f"resumed from {ckpt} at step {self.step}")
        self.tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)["total"]
        self.peak_flops = H100_BF16_PEAK_TFLOPS * 1e12 if torch.cuda.is_available() else None
        self.stop_signal = 0
        for sig in stop_signals:
            signal.signal(sig, self._on_signal)

    def log_rank0(self, message: str) -> None:
        if self.rank == 0:
            print(f"[pretrain] {message}", file=sys.stderr, flush=True)

    def _choose_checkpoint(self, store: CheckpointStore, resume_from: Path | None) -> Path | None:
        """Rank 0 verifies (hashing every file) and tells the others, so all ranks load the same one."""
        choice: list[object] = [None]
        if self.rank == 0:
            try:
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

    def _stop_requested(self) -> bool:
        flag = torch.tensor([self.stop_signal], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def save(self, loss: float) -> None:
        self.checkpointer.save(self.step, {"step": self.step, "tokens": self.tokens_seen, "loss": loss,
                                           "loader": self.loader.state_dict()})

    # ------------------------------------------------------------------ one step
    def _to_device(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.to(self.device, non_blocking=True) if self.device is not None else tokens

    def train_step(self, batches) -> tuple[float, float]:
        """One optimizer step over a global batch; returns (mean loss over the global batch, data wait s)."""
        waited = 0.0

        def next_micro() -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal waited
            start = time.perf_counter()
            tokens = next(batches)["tokens"]
            waited += time.perf_counter() - start
            return tuple(self._to_device(t) for t in _split(tokens))

        if self.built.pipelined:
            loss = self.engine.train_batch(data_iter=_Repeat(next_micro))
            return float(loss), waited
        accum = self.engine.gradient_accumulation_steps()
        total = torch.zeros((), device=self.device)
        for _ in range(accum):
            inputs, labels = next_micro()
            loss = self.engine(inputs, labels)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach()
        total /= accum
        dist.all_reduce(total, group=parallel.dp_group())
        return float(total) / parallel.dp_size(), waited

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
    def fit(self) -> int:
        """Train to train.steps; returns the process exit code (EXIT_SAVED_ON_SIGNAL after a signal)."""
        cfg = self.cfg
        metrics = MetricsLogger(cfg, self.run_dir, cfg.train.steps, self.step, enabled=self.rank == 0)
        batches = iter(self.loader)
        window_start, window_tokens, window_wait = time.perf_counter(), 0, 0.0
        loss = float("nan")
        code = 0
        while self.step < cfg.train.steps:
            self._arm_watchdog()
            loss, waited = self.train_step(batches)
            self.step += 1
            self.tokens_seen += self.tokens_per_step
            window_tokens += self.tokens_per_step
            window_wait += waited
            if self.step % cfg.logging.every_steps == 0 or self.step == cfg.train.steps:
                elapsed = time.perf_counter() - window_start
                values = self._step_metrics(loss, elapsed, window_tokens, window_wait)
                values["checkpoint_stall_s"] = self.checkpointer.last_stall_s
                metrics.log(self.step, values)
                window_start, window_tokens, window_wait = time.perf_counter(), 0, 0.0
            if cfg.train.eval_every and (self.step % cfg.train.eval_every == 0 or self.step == cfg.train.steps):
                eval_loss = self.evaluate()
                if eval_loss is not None:
                    metrics.log(self.step, {"loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50))}, "eval")
            every = cfg.checkpoint.every_steps
            if self._stop_requested():
                self.log_rank0(f"signal {self.stop_signal or 'on another rank'}: saving step {self.step} and exiting")
                self.save(loss)
                code = EXIT_SAVED_ON_SIGNAL
                break
            if (every and self.step % every == 0) or self.step == cfg.train.steps:
                self.save(loss)
        faulthandler.cancel_dump_traceback_later()
        self.checkpointer.wait()
        dist.barrier()
        metrics.close()
        return code

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
            "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "tokens": self.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_gpu": tokens_per_s / self.world,
            "step_time_s": elapsed / steps,
            "data_wait_s": waited / steps,
        }
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
        stop_signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> int:
    if not torch.cuda.is_available():
        # Ranks on one machine share its cores; more threads than cores only thrash.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    parallel.init_distributed(cfg.parallel.tp, cfg.parallel.pp)
    try:
        return Trainer(cfg, run_dir, resume_from, stop_signals).fit()
    finally:
        parallel.destroy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one training rank (started by `pretrain train`)")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume-from", type=Path)
    args = parser.parse_args(argv)
    return run(load_config(args.run_dir / "config.yaml"), args.run_dir, args.resume_from)


if __name__ == "__main__":
    sys.exit(main())
