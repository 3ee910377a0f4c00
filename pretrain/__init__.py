"""Mistral-style pretraining, in rooms on floors (tests/test_layout.py): the base (config, parallel, ...), then model,
then checkpoint, then training, release and inference side by side."""
