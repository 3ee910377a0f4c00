"""SentencePiece BPE tokenizer shaped like Mistral's: byte fallback, split digits, unk=0 `<unk>`, bos=1 `<s>`,
eos=2 `</s>`, no pad. Training reads a deterministic sample of the input and runs sentencepiece with one
thread, because the model it learns depends on the thread count (1 and 2 threads give different models): with
one, the same input gives a byte-identical tokenizer.model on every machine.

`Tokenizer.load` opens any sentencepiece `tokenizer.model` (ours or Mistral's own) without retraining.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from data_pipeline.errors import DataError
from durable import atomic_directory, check_replaceable, write_json_atomic

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer_meta.json"


class Tokenizer:
    """A loaded sentencepiece model with the ids and identity (sha256 of the model bytes) the pipeline records."""

    def __init__(self, model_bytes: bytes, path: str | None = None) -> None:
        self.path = path
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self._model_bytes = model_bytes
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """From a directory holding tokenizer.model or from the .model file itself."""
        path = Path(path)
        model_path = path / MODEL_FILE if path.is_dir() else path
        if not model_path.is_file():
            raise DataError(
                f"tokenizer {path} not found: pass a directory with {MODEL_FILE} or a sentencepiece .model file "
                "(train one with `pretrain tokenizer train`)"
            )
        data = model_path.read_bytes()
        try:
            return cls(data, str(model_path))
        except RuntimeError as e:
            raise DataError(f"tokenizer {model_path} is not a sentencepiece model ({str(e).strip()}): "
                            "point at a sentencepiece .model file") from None

    def __getstate__(self) -> dict:
        return {"model_bytes": self._model_bytes, "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_bytes"], state["path"])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One thread: callers parallelize over processes, and sentencepiece's own threads would oversubscribe.
        return self._sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


def sample_documents(documents: Iterable[str], total_bytes: int, sample_bytes: int) -> Iterable[str]:
    """A deterministic sample of about `sample_bytes` spread over the whole input, not just its head.

    A document is kept when a hash of its text falls under the sampling fraction, so the same input always
    gives the same sample whatever the order of reading inside a file.
    """
    fraction = 1.0 if total_bytes <= sample_bytes else sample_bytes / total_bytes
    threshold = int(fraction * 2**64)
    taken = 0
    for text in documents:
        if taken >= sample_bytes:
            return
        digest = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
        if fraction >= 1.0 or digest < threshold:
            taken += len(text.encode("utf-8"))
            yield text


def train_tokenizer(
    inputs: Sequence[str], out_dir: str | os.PathLike, vocab_size: int = 32000, sample_bytes: int = 100_000_000
) -> Tokenizer:
    """Train on a deterministic sample of the input files (.txt, .jsonl, .parquet); write tokenizer.model + meta."""
    from data_pipeline.prepare import expand_inputs, iter_documents

    files = expand_inputs(inputs)
    total = sum(os.path.getsize(f) for f in files)
    out = Path(out_dir)
    check_replaceable(out, (MODEL_FILE, META_FILE, f".{MODEL_FILE}.tmp", f"{META_FILE}.tmp"), "a tokenizer")
    # sentencepiece reads one sentence per line; blank lines carry nothing to learn. The sample is collected
    # first so that bad input fails here, with its DataError, rather than inside sentencepiece's C++ loop.
    lines: list[str] = []
    sampled = 0
    for text in sample_documents((doc for path in files for doc in iter_documents(path)), total, sample_bytes):
        lines.extend(line for line in text.splitlines() if line.strip())
        sampled += len(text.encode("utf-8"))
    if not lines:
        raise DataError(f"inputs {files} hold no text to train on: pass files with documents in them")
    # In memory, in and out: a file path would be recorded in the model's trainer_spec and change its sha256.
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            # Code and prose keep their whitespace; Mistral's tokenizer does not normalize either.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            character_coverage=0.99995,
            max_sentence_length=1 << 16,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(f"sentencepiece training on {files} failed: {_training_advice(str(e), vocab_size)}") from None
    model_bytes = model.getvalue()
    tokenizer = Tokenizer(model_bytes, str(out / MODEL_FILE))
    meta = {
        "sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "unk_id": tokenizer.unk_id,
        "pad_id": tokenizer.pad_id,
        "model_type": "bpe",
        "sample_bytes": sampled,
        "inputs": [{"path": f, "bytes": os.path.getsize(f)} for f in files],
        "sentencepiece_version": spm.__version__,
    }
    with atomic_directory(out) as tmp:  # the model and its meta replace the previous pair together
        (tmp / MODEL_FILE).write_bytes(model_bytes)
        write_json_atomic(tmp / META_FILE, meta)
    return tokenizer


def _training_advice(error: str, vocab_size: int) -> str:
    """sentencepiece's reason in our flags' terms: it names its own options (--character_coverage)."""
    # The vocabulary must hold every character kept by character_coverage, the 256 byte pieces and <unk> <s> </s>.
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", error)
    if too_small:
        return (f"--vocab-size {vocab_size} is smaller than the {too_small.group(1)} pieces this text needs (its "
                f"characters, 256 byte pieces, 3 special pieces): pass --vocab-size {too_small.group(1)} or more")
    too_large = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", error)
    if too_large:
        return (f"--vocab-size {vocab_size} is more pieces than this text yields: pass --vocab-size "
                f"{too_large.group(1)} or less, or give more text")
    return f"{' '.join(error.split())}: check the input text and --vocab-size"
