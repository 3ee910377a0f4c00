"""Small real datasets for the data-pipeline tests, and a reader of shards that does not use our decoder."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np

from data_pipeline.corpus import write_builtin_corpus
from data_pipeline.prepare import prepare
from data_pipeline.tokenizer import train_tokenizer


def make_tokenizer(root: Path, vocab_size: int = 1000, max_mb: float = 0.4) -> Path:
    """The built-in corpus (train/ and eval/ under root/corpus) and a tokenizer trained on it, in root/tokenizer."""
    write_builtin_corpus(root / "corpus", max_mb=max_mb)
    train_tokenizer([str(root / "corpus" / "train" / "*.jsonl")], root / "tokenizer", vocab_size=vocab_size)
    return root / "tokenizer"


def make_dataset(root: Path, inputs: list[str], tokenizer: Path, seq_len: int = 32, shard_mb: float = 0.01,
                 **kwargs) -> Path:
    prepare(inputs, tokenizer, seq_len, root, shard_mb=shard_mb, workers=1, progress=False, **kwargs)
    return root


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def tar_samples(directory: Path) -> list[np.ndarray]:
    """Every sample of a prepared directory in shard order, read member by member with tarfile."""
    manifest = json.loads((directory / "manifest.json").read_text())
    samples = []
    for shard in manifest["shards"]:
        with tarfile.open(directory / shard["name"]) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                samples.append(np.frombuffer(data, dtype=np.dtype(manifest["dtype"]).newbyteorder("<")))
    return samples
