"""The held-out loss during training: train.eval_steps global batches of the eval split through the engine, averaged
over the data- and context-parallel ranks."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from pretrain import parallel
from pretrain.training.engine import Built
from pretrain.training.global_batch import GlobalBatchReader
from pretrain.training.hang import HangWatchdog


def _never_returning() -> Iterator[dict]:
    """train.inject_hang=eval_data: an evaluation loader whose next batch never comes."""
    threading.Event().wait()
    yield {}


class Evaluator:
    """Evaluates `steps` global batches of `loader`, kept for the run and rewound to its start for each evaluation:
    every evaluation reads the same batches."""

    def __init__(self, loader, steps: int, built: Built, global_batch: GlobalBatchReader, watchdog: HangWatchdog):
        self.loader = loader
        self.start = loader.state_dict()
        self.steps = steps
        self.built = built
        self.global_batch = global_batch
        self.watchdog = watchdog

    @torch.no_grad()
    def evaluate(self, step: int, hang: bool = False) -> float:
        """The mean loss after `step`; with `hang` (train.inject_hang=eval_data) the batches never come."""
        engine = self.built.engine
        engine.eval()
        self.built.float8.refresh_weights()
        losses = []
        self.loader.load_state_dict(self.start)
        with iter(self.loader) as batches:
            if hang:
                batches = _never_returning()
            for batch in range(self.steps):
                where = f"step {step}, evaluation batch {batch + 1}"
                micro_batches, divisor = self.global_batch.read(batches, where)
                if self.built.pipelined:
                    self.built.pipeline_loss.divisor = divisor
                    marked = self.global_batch.marked(micro_batches, f"{where}, pipeline micro-batch")
                    losses.append(float(engine.eval_batch(data_iter=marked)))
                    continue
                self.watchdog.progress(f"{where}, forward")
                losses += [float(engine(inputs, labels, loss_divisor=divisor)) for inputs, labels in micro_batches]
        engine.train()
        self.watchdog.progress(f"step {step}, evaluation loss all-reduce")
        [total] = parallel.all_reduce_numbers([sum(losses) / len(losses)], group=parallel.dp_cp_group())
        return total / parallel.dp_cp_size()
