"""Held-out loss and perplexity of a trained model over prepared token shards, in one process.

Batches come from the training loader (data_pipeline.loader.TokenLoader) with the run's data seed, so a
checkpoint's evaluation sees the same batches, in the same order, as the trainer's own evaluation did.
"""

from __future__ import annotations

import math
import sys
import time

import torch

from data_pipeline.errors import DataError
from data_pipeline.loader import TokenLoader
from pretrain.model.mistral import IGNORE_INDEX, Mistral, inputs_and_labels


def eval_loader(data_dir: str, model: Mistral, *, micro_batch: int, seed: int,
                tokenizer_sha256: str | None) -> TokenLoader:
    loader = TokenLoader([(data_dir, 1.0)], micro_batch=micro_batch, seed=seed, vocab_size=model.cfg.vocab_size,
                         tokenizer_sha256=tokenizer_sha256)
    if loader.seq_len > model.cfg.max_seq_len:
        raise DataError(f"{data_dir} holds sequences of {loader.seq_len} tokens, longer than the model's "
                        f"max_seq_len {model.cfg.max_seq_len}: prepare it with a shorter --seq-len")
    return loader


@torch.no_grad()
def evaluate(model: Mistral, loader: TokenLoader, batches: int, progress: bool = False) -> dict[str, float]:
    """The mean next-token loss over every target token of `batches` micro-batches (for chat data: the tokens its
    loss mask keeps; "tokens" counts those)."""
    device = next(model.parameters()).device
    losses, counts = [], []
    start = time.perf_counter()
    with iter(loader) as loaded:
        for batch in loaded:
            inputs, labels = inputs_and_labels(batch, device)
            losses.append(float(model(inputs, labels)))
            counts.append(int((labels != IGNORE_INDEX).sum()))
            if progress:
                print(f"batch {len(losses)}/{batches}: loss {losses[-1]:.4f}, "
                      f"{sum(counts) / (time.perf_counter() - start):.0f} tokens/s", file=sys.stderr)
            if len(losses) == batches:
                break
    loss = sum(loss * n for loss, n in zip(losses, counts, strict=True)) / max(sum(counts), 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "batches": len(losses), "tokens": sum(counts)}
