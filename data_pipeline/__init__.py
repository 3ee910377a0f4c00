"""Tokenizer, webdataset shard writer and the deterministic, resumable loader."""
