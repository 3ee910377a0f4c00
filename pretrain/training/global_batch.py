"""A global batch as this rank takes it, alike in the training steps and the evaluations: its micro-batches on the
device with the loss divisor (`GlobalBatchReader.read`), and each one marked as progress as the pipeline engine takes
it (`GlobalBatchReader.marked`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pretrain import parallel
from pretrain.model.mistral import IGNORE_INDEX, inputs_and_labels
from pretrain.training.hang import HangWatchdog


@dataclass
class GlobalBatchReader:
    micro_batches: int  # this rank's per global batch: DeepSpeed's gradient accumulation steps
    device: torch.device | None
    loss_mask: bool  # data.loss_mask: micro-batches hold different numbers of trained tokens
    watchdog: HangWatchdog

    def read(self, batches: Iterator[dict], where: str) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float | None]:
        """This rank's micro-batches of the next global batch as (inputs, labels) on the device, and the loss divisor.

        Without a loss mask the divisor is None: each micro-batch's loss is its mean, and the step's loss the mean of
        those (every micro-batch holds the same number of tokens). With one, micro-batches hold different numbers of
        trained tokens, so each one's loss is its summed loss divided by the global batch's trained tokens per
        micro-batch: the mean that DeepSpeed then takes over micro-batches and data-parallel ranks is the mean over
        every trained token of the global batch (as Megatron and torchtitan average), and a global batch without
        any trained token gives 0. With context parallelism a micro-batch is this rank's chunk of each sequence, and
        the chunks' losses are averaged with the data-parallel ranks' (every chunk holds as many tokens)."""
        micro = []
        for index in range(self.micro_batches):
            self.watchdog.progress(f"{where}, reading micro-batch {index + 1}")
            micro.append(inputs_and_labels(next(batches), self.device))
        if not self.loss_mask:
            return micro, None
        self.watchdog.progress(f"{where}, counting trained tokens")
        # Counted on the device and read once: one host sync per step, not one per micro-batch.
        trained = int(torch.stack([(labels != IGNORE_INDEX).sum() for _, labels in micro]).sum())
        [trained] = parallel.all_reduce_numbers([trained], group=parallel.dp_cp_group())
        return micro, max(trained, 1) / (len(micro) * parallel.dp_cp_size())

    def marked(self, micro_batches: list, doing: str) -> Iterator:
        """The micro-batches for the pipeline engine, each one it takes marked as progress."""
        for index, micro_batch in enumerate(micro_batches):
            self.watchdog.progress(f"{doing} {index + 1}")
            yield micro_batch
