"""Mistral-style pretraining: model, parallelism, training loop, checkpointing, export."""
