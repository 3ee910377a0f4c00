"""The loss-spike guard (train.spike_guard): a finite step whose loss or gradient norm lies more than `sigmas`
standard deviations above the mean of the last `window` applied steps is not applied, as OLMo-core's SkipStepAdamW
does (6 sigma over 128 steps for OLMo 3 7B).

The decision falls inside the optimizer step (`SpikeGate`, called by the AdamW that DeepSpeed steps, see
pretrain.training.optim): DeepSpeed has reduced the gradients and taken their global norm by then, and has not yet
changed a weight or a moment. A refused step is marked as DeepSpeed marks a non-finite one (the wrapper's `overflow`),
so that the engine leaves the learning-rate schedule where it was and reports the step as not applied: a spike is a
skipped step like a non-finite one, and counts toward train.max_skipped_in_row and its rollback. Every rank takes the
same decision from the same numbers: the loss and norm are agreed over all ranks before they are judged, and the
window they are judged against is saved in the checkpoint (`TrainState.spike_window`), so a resumed or replayed run
decides alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch.distributed as dist

from pretrain import parallel
from pretrain.config import SpikeGuardConfig

# train.inject_spike_batches multiplies the loss of those batches by this: far past 6 sigma of any window.
SPIKE_FACTOR = 100.0


def judge(cfg: SpikeGuardConfig, window: dict[str, list[float]], values: dict[str, float | None]) -> dict | None:
    """The first of `values` (loss, grad_norm; None: not known) that is a spike against `window` (the same keys,
    oldest first), as {"exceeded": key, "threshold": mean + sigmas * std, "mean", "std", "sigmas"}; None if neither
    is."""
    for key, value in values.items():
        past = window.get(key, [])
        if value is None or len(past) < cfg.min_steps:
            continue
        mean = sum(past) / len(past)
        std = math.sqrt(sum((x - mean) ** 2 for x in past) / (len(past) - 1))
        threshold = mean + cfg.sigmas * std
        if value > threshold:
            return {"exceeded": key, "threshold": threshold, "mean": mean, "std": std, "sigmas": cfg.sigmas}
    return None


def remember(cfg: SpikeGuardConfig, window: dict[str, list[float]], values: dict[str, float | None]) -> None:
    """Add an applied step's values to `window`, keeping the newest cfg.window of each."""
    for key, value in values.items():
        if value is not None:
            window[key] = (window.get(key, []) + [value])[-cfg.window:]


class SpikeGate:
    """Asked by the optimizer, once per step, whether to apply the update (`allows_update`). The trainer gives it the
    step's loss before DeepSpeed's optimizer step (`expect`); after the step, `spike` holds what was found (None: the
    step was not judged a spike, or was not judged at all because its gradients were not finite)."""

    def __init__(self, cfg: SpikeGuardConfig, engine, state):
        """`state`: the trainer's TrainState, whose spike_window is checkpointed."""
        self.cfg, self.engine, self.state = cfg, engine, state
        self.loss: Callable[[], float] | None = None
        self.verdict: bool | None = None
        self.spike: dict | None = None

    def expect(self, loss: Callable[[], float]) -> None:
        """How this rank gets the step's loss over the global batch when the optimizer step asks (0 on a pipeline
        stage that computes none)."""
        self.loss, self.verdict, self.spike = loss, None, None

    def allows_update(self) -> bool:
        if self.verdict is None:  # ZeRO 1-3 step their client optimizer once per parameter group: decide once
            self.verdict = self._decide()
        return self.verdict

    def _decide(self) -> bool:
        norm = getattr(self.engine.optimizer, "_global_grad_norm", None)  # ZeRO's, taken before this call
        # The largest over ranks: bitwise the same everywhere, and the loss of the stages that compute it (>= 0).
        loss, norm_over_ranks = parallel.all_reduce_numbers([self.loss(), -1.0 if norm is None else float(norm)],
                                                            op=dist.ReduceOp.MAX)
        values = {"loss": loss, "grad_norm": None if norm_over_ranks < 0 else norm_over_ranks}
        found = judge(self.cfg, self.state.spike_window, values)
        if found is None:
            remember(self.cfg, self.state.spike_window, values)
            return True
        self.spike = {**values, **found}
        self.engine.optimizer.overflow = True  # the engine skips the schedule and counts the step as not applied
        return False
