"""`pretrain data prepare`: text, JSON lines or Parquet in; packed token sequences in webdataset tar shards out.

Each document becomes `<s> tokens </s>`; documents are concatenated and cut into samples of seq_len + 1
tokens (inputs and shifted targets), the final partial sample is dropped and counted. With keep_documents
each document is cut on its own instead, so no sample spans two documents; each document's tail, and so every
document shorter than a sample, is dropped (counted in the manifest's dropped_tokens).

Output: `shard-000000.tar`, ... whose members are `{key}.tokens.bin` (raw little-endian uint16 when the
vocabulary fits, else uint32; recorded in the manifest) and `manifest.json`, written last. Runs are
byte-deterministic: inputs are sorted, parallel results are consumed in input order, and tar headers carry no
time, owner or mode from the machine. Runs are all or nothing (durable.atomic_directory): the dataset is written
into a hidden temporary directory that takes the output's place only once complete, so a run that fails or is
killed midway leaves the previous dataset there byte for byte. A directory that holds anything but a dataset is
never replaced.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import multiprocessing
import os
import queue
import signal
import sys
import tarfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataError, lone_surrogate
from data_pipeline.tokenizer import Tokenizer
from durable import atomic_directory, check_replaceable, sha256_file, write_json_atomic

MANIFEST = "manifest.json"
# What a dataset directory holds (the last, what runs before atomic output left): only these are replaced.
_DATASET_ENTRIES = (MANIFEST, "shard-*.tar", f"{MANIFEST}.tmp", ".shard-*.tar.tmp")
MANIFEST_VERSION = 1
MEMBER_SUFFIX = ".tokens.bin"
SUFFIXES = (".txt", ".jsonl", ".parquet")
TAR_BLOCK = 512
# Documents per unit of parallel work: big enough to amortize pickling, small enough to keep workers busy.
_CHUNK_BYTES = 1 << 20


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Sorted, de-duplicated files matching the globs; every pattern must match a supported file."""
    if not patterns:
        raise DataError("no input given: pass --input with files or globs such as 'data/*.jsonl'")
    files: set[str] = set()
    for pattern in patterns:
        if os.path.isdir(pattern):
            raise DataError(f"input {pattern} is a directory: pass a glob of its files, e.g. '{pattern}/*.jsonl'")
        matches = [m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m)]
        if not matches:
            raise DataError(f"input glob {pattern!r} matches no file: check the path (quote globs for the shell)")
        for match in matches:
            if not match.endswith(SUFFIXES):
                raise DataError(f"input {match} has an unsupported type: use .txt, .jsonl or .parquet files")
            files.add(match)
    return sorted(files)


def iter_documents(path: str) -> Iterator[str]:
    """Documents of one file: a .txt is one document, a .jsonl line's `text`, a Parquet row's `text`."""
    if path.endswith(".txt"):
        yield _decode(Path(path).read_bytes(), path)
    elif path.endswith(".jsonl"):
        with open(path, "rb") as f:
            for line_number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(_decode(raw, f"{path}:{line_number}"))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_number} is not valid JSON ({e.msg}): "
                                    "fix or remove the line") from None
                if isinstance(record, dict) and "messages" in record and "text" not in record:
                    raise DataError(f'{path}:{line_number} is a conversation ({{"messages": [...]}}), not text: '
                                    "prepare chat data with --chat")
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f'{path}:{line_number} has no string "text" field: each line needs {{"text": ...}}')
                surrogate = lone_surrogate(record["text"], raw)
                if surrogate:
                    raise DataError(f'{path}:{line_number} has a lone surrogate in "text" ({surrogate}): '
                                    "fix or remove the line")
                yield record["text"]
    elif path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for unreadable files
            raise DataError(f"{path} is not a readable Parquet file ({e}): re-export it") from None
        schema = parquet.schema_arrow
        if "text" not in schema.names:
            raise DataError(f"{path} has no 'text' column (columns: {schema.names}): rename the column")
        if not (pa.types.is_string(schema.field("text").type) or pa.types.is_large_string(schema.field("text").type)):
            raise DataError(f"{path} column 'text' holds {schema.field('text').type}, not strings: "
                            "store the documents as UTF-8 strings")
        row = 0
        for batch in parquet.iter_batches(columns=["text"], batch_size=1024):
            try:
                texts = batch.column(0).to_pylist()
            except UnicodeDecodeError:  # pyarrow reads string columns without checking that they are UTF-8
                raise _not_utf8_row(path, batch.column(0), row) from None
            for text in texts:
                if text is not None:
                    yield text
            row += batch.num_rows
    else:
        raise DataError(f"input {path} has an unsupported type: use .txt, .jsonl or .parquet files")


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where} is not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}): re-encode it, "
            "e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def _not_utf8_row(path: str, column, first_row: int) -> DataError:
    """The error for the first value of a batch's `text` column that is not UTF-8."""
    for i in range(len(column)):
        try:
            column[i].as_py()
        except UnicodeDecodeError as e:
            value = column[i].as_buffer().to_pybytes()
            return DataError(f"{path} row {first_row + i} (counting from 0) is not UTF-8 (byte {e.start} of its "
                             f"text: {value[e.start:e.start + 1]!r}): re-export the file with the 'text' column as "
                             "UTF-8 strings")
    return DataError(f"{path} has text that is not UTF-8: re-export the file with the 'text' column as UTF-8 strings")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size < 65536 else np.dtype("<u4")


# ---------------------------------------------------------------- parallel tokenization
#
# Workers are forked processes (no re-import of the caller's main module; they inherit the loaded tokenizer), each
# with a pipe of its own: no lock is shared between processes, as multiprocessing.Pool's queues share theirs, so a
# worker that dies at any point blocks no other, and the parent reads its death as the end of its pipe. Stop
# signals are the parent's alone: workers ignore them, and the parent kills them on its way out, whatever ends it.

# How long the parent waits for a SIGKILLed worker to be reaped: it never waits on a worker for ever.
_REAP_WAIT_S = 10.0


def _tokenize_chunk(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Each document as `<s> ids </s>`."""
    return [np.array([tok.bos_id, *ids, tok.eos_id], dtype=np.uint32) for ids in tok.encode_batch(texts)]


def _signals_handled_in_python() -> set[int]:
    """Ctrl-C's (KeyboardInterrupt), launch.cli's SIGTERM (Terminated), and any other this process handles."""
    return {sig for sig in signal.valid_signals() if callable(signal.getsignal(sig))}


class _Worker:
    """A forked tokenizing process, and the parent's end of its pipe: chunks of texts in, their tokens out."""

    def __init__(self, tok: Tokenizer, parent_signals: set[int], parent_mask: set[int]) -> None:
        self._pipe, theirs = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("fork").Process(
            target=_work, args=(theirs, tok, parent_signals, parent_mask), daemon=True)
        self.process.start()
        theirs.close()  # the worker's alone: its death closes the pipe, and no later worker inherits this end

    def send(self, texts: list[str]) -> None:
        try:
            self._pipe.send(texts)
        except OSError:
            raise self._died() from None

    def receive(self) -> list[np.ndarray]:
        try:
            tokens = self._pipe.recv()
        except (EOFError, OSError):
            raise self._died() from None
        if isinstance(tokens, Exception):  # what tokenizing raised, as it would without workers
            raise tokens
        return tokens

    def kill(self) -> None:
        self.process.kill()

    def reap(self) -> None:
        self.process.join(_REAP_WAIT_S)
        self._pipe.close()

    def _died(self) -> DataError:
        self.process.join(_REAP_WAIT_S)
        return DataError(f"tokenizing process {self.process.pid} ended mid-run with exit code {self.process.exitcode} "
                         "(-9: killed, as by the out-of-memory killer): run again with fewer --workers")


def _work(pipe, tok: Tokenizer, parent_signals: set[int], parent_mask: set[int]) -> None:
    """A worker's life: tokenize the chunks that come, in order, until killed or the parent is gone."""
    # The parent's handlers would raise its exceptions (Terminated, KeyboardInterrupt) here, inside
    # multiprocessing's code, and print their tracebacks. Blocked since before the fork, none has run yet.
    for sig in parent_signals:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, parent_mask)
    chunks: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_receive_chunks, args=(pipe, chunks), daemon=True).start()
    try:
        while (texts := chunks.get()) is not None:
            try:
                tokens = _tokenize_chunk(tok, texts)
            except Exception as e:  # raised again in the parent
                tokens = e
            pipe.send(tokens)
    except OSError:  # the parent is gone
        pass


def _receive_chunks(pipe, chunks: queue.SimpleQueue) -> None:
    """Takes each chunk as it comes, so that the parent never waits to send one while this worker waits to send it
    a result (each would wait for the other to read)."""
    try:
        while True:
            chunks.put(pipe.recv())
    except (EOFError, OSError):  # the parent is gone
        chunks.put(None)


@contextlib.contextmanager
def _blocked(signals: set[int]) -> Iterator[set[int]]:
    """`signals` held back from this thread, and handled (raising here) once the block ends; yields the mask before."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield before
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


@contextlib.contextmanager
def _workers(tok: Tokenizer, count: int) -> Iterator[list[_Worker]]:
    """`count` workers, killed and reaped on the way out."""
    parent_signals = _signals_handled_in_python()
    workers: list[_Worker] = []
    try:
        # Blocked across the forks, so that no worker runs a handler of this process before ignoring it.
        with _blocked(parent_signals) as mask:
            for _ in range(count):
                workers.append(_Worker(tok, parent_signals, mask))
        yield workers
    finally:
        with _blocked(parent_signals):  # a second stop signal waits until every worker is killed and reaped
            for worker in workers:
                worker.kill()
            for worker in workers:
                worker.reap()


def _chunks(files: Sequence[str]) -> Iterator[tuple[list[str], int]]:
    """Documents in groups of about _CHUNK_BYTES, each with the input bytes it accounts for (for progress).

    Progress counts a document's UTF-8 bytes, capped at its file's size (Parquet is compressed), and a finished
    file counts whole, so the total reaches the sum of the file sizes exactly.
    """
    chunk: list[str] = []
    chunk_bytes = progress = 0
    for path in files:
        size, counted = os.path.getsize(path), 0
        for text in iter_documents(path):
            if not text:
                continue
            nbytes = len(text.encode("utf-8"))
            chunk.append(text)
            chunk_bytes += nbytes
            progress += min(nbytes, size - counted)
            counted += min(nbytes, size - counted)
            if chunk_bytes >= _CHUNK_BYTES:
                yield chunk, progress
                chunk, chunk_bytes, progress = [], 0, 0
        progress += size - counted
    if chunk:
        yield chunk, progress


def _tokenized(files: Sequence[str], tok: Tokenizer, workers: int) -> Iterator[tuple[list[np.ndarray], int]]:
    """(documents as token arrays, input bytes) chunk by chunk, in input order.

    Chunks go to the workers in turn, and each worker returns its results in the order it got the chunks. At most
    two chunks per worker are in flight, so memory stays bounded however large the input is.
    """
    if workers <= 1:
        for texts, nbytes in _chunks(files):
            yield _tokenize_chunk(tok, texts), nbytes
        return
    with _workers(tok, workers) as started:
        in_flight: deque[tuple[_Worker, int]] = deque()
        for i, (texts, nbytes) in enumerate(_chunks(files)):
            worker = started[i % workers]
            worker.send(texts)
            in_flight.append((worker, nbytes))
            if len(in_flight) >= 2 * workers:
                worker, done = in_flight.popleft()
                yield worker.receive(), done
        while in_flight:
            worker, done = in_flight.popleft()
            yield worker.receive(), done


# ---------------------------------------------------------------- shards


class ShardWriter:
    """Writes samples into size-bounded deterministic tar shards."""

    def __init__(self, out_dir: Path, shard_bytes: int, dtype: np.dtype, sample_tokens: int) -> None:
        self.out_dir = out_dir
        self.sample_tokens = sample_tokens
        self.shard_bytes = shard_bytes
        self.dtype = dtype
        self.shards: list[dict] = []
        self.samples_written = 0
        self._file: io.BufferedWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._shard_samples = 0
        self._shard_size = 0

    def add(self, sample: np.ndarray) -> None:
        data = sample.astype(self.dtype, copy=False).tobytes()
        member_size = TAR_BLOCK + -(-len(data) // TAR_BLOCK) * TAR_BLOCK
        if self._tar is not None and self._shard_size + member_size > self.shard_bytes:
            self._finish_shard()
        if self._tar is None:
            self._start_shard()
        info = tarfile.TarInfo(f"{self.samples_written:010d}{MEMBER_SUFFIX}")
        info.size = len(data)
        info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
        self._tar.addfile(info, io.BytesIO(data))
        self.samples_written += 1
        self._shard_samples += 1
        self._shard_size += member_size

    def close(self) -> None:
        if self._tar is not None:
            self._finish_shard()

    def _path(self) -> Path:
        return self.out_dir / f"shard-{len(self.shards):06d}.tar"

    def _start_shard(self) -> None:
        self._file = open(self._path(), "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._shard_samples = 0
        self._shard_size = 0

    def _finish_shard(self) -> None:
        self._tar.close()
        self._file.close()
        path = self._path()
        self.shards.append({
            "name": path.name,
            "samples": self._shard_samples,
            "tokens": self._shard_samples * self.sample_tokens,
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        })
        self._tar = self._file = None


# ---------------------------------------------------------------- progress


class _Progress:
    """Input bytes done, tokens/s and ETA on stderr: a live bar on a terminal, a line every 10 s in a log."""

    LOG_EVERY_S = 10.0

    def __init__(self, total_bytes: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total = max(total_bytes, 1)
        self.done = self.tokens = 0
        self.start = self._last_line = time.perf_counter()
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("prepare"), BarColumn(), TextColumn("{task.fields[summary]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True),
            )
            self._task = self._bar.add_task("prepare", total=self.total, summary="")
            self._bar.start()

    def summary(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return (f"{self.done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB, {self.tokens:,} tokens, "
                f"{self.tokens / elapsed / 1e6:.2f} M tokens/s, {self.done / elapsed / 1e6:.2f} MB/s")

    def update(self, nbytes: int, ntokens: int) -> None:
        self.done += nbytes
        self.tokens += ntokens
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, summary=self.summary())
            return
        now = time.perf_counter()
        if now - self._last_line >= self.LOG_EVERY_S:
            self._last_line = now
            eta = (now - self.start) / max(self.done, 1) * (self.total - self.done)
            print(f"prepare: {self.summary()}, ETA {eta:.0f} s", file=sys.stderr, flush=True)

    def close(self, finished: bool) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self.enabled and finished:
            elapsed = time.perf_counter() - self.start
            print(f"prepare: {self.summary()}, done in {elapsed:.1f} s", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- prepare


@contextlib.contextmanager
def _dataset_output(out_dir: str | os.PathLike, meter: _Progress) -> Iterator[Path]:
    """A temporary directory to write the dataset into, which replaces `out_dir` (nothing, or a previous dataset)
    when the block succeeds. The progress meter stops either way."""
    out = Path(out_dir)
    check_replaceable(out, _DATASET_ENTRIES, "a prepared dataset")
    finished = False
    try:
        with atomic_directory(out) as tmp:
            yield tmp
            finished = True
    finally:
        meter.close(finished)


def prepare(
    inputs: Sequence[str],
    tokenizer: str | os.PathLike | Tokenizer,
    seq_len: int,
    out_dir: str | os.PathLike,
    *,
    shard_mb: float = 64,
    workers: int | None = None,
    keep_documents: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize, pack and shard `inputs` into `out_dir`; returns the manifest."""
    if seq_len <= 0:
        raise DataError(f"seq_len={seq_len} must be positive: pass --seq-len, e.g. 2048")
    files = expand_inputs(inputs)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    sample_tokens = seq_len + 1
    counts = {"documents": 0, "tokens": 0, "dropped_tokens": 0}
    carry = np.zeros(0, dtype=np.uint32)
    meter = _Progress(sum(os.path.getsize(f) for f in files), progress)
    with _dataset_output(out_dir, meter) as out:
        writer = ShardWriter(out, max(int(shard_mb * 1e6), 1), dtype, sample_tokens)
        for documents, nbytes in _tokenized(files, tok, workers or os.cpu_count() or 1):
            counts["documents"] += len(documents)
            ntokens = sum(len(d) for d in documents)
            counts["tokens"] += ntokens
            if keep_documents:
                for doc in documents:
                    whole = len(doc) // sample_tokens * sample_tokens
                    counts["dropped_tokens"] += len(doc) - whole
                    for sample in doc[:whole].reshape(-1, sample_tokens):
                        writer.add(sample)
            else:
                stream = np.concatenate([carry, *documents])
                whole = len(stream) // sample_tokens * sample_tokens
                for sample in stream[:whole].reshape(-1, sample_tokens):
                    writer.add(sample)
                carry = stream[whole:]
            meter.update(nbytes, ntokens)
        writer.close()
        counts["dropped_tokens"] += len(carry)
        if counts["documents"] == 0:
            raise DataError(f"inputs {_names(files)} hold no documents (empty files or empty texts): "
                            "pass files with text in them")
        if writer.samples_written == 0:
            raise DataError(
                f"inputs {_names(files)} hold {counts['tokens']} tokens in {counts['documents']} documents, fewer "
                f"than one sample of seq_len+1={sample_tokens}"
                + (" per document (--keep-documents drops documents shorter than a sample)" if keep_documents else "")
                + ": give more text or lower --seq-len"
            )
        manifest = _manifest(tok, files, seq_len, writer, counts, keep_documents=keep_documents)
        write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _manifest(tok: Tokenizer, files: Sequence[str], seq_len: int, writer: ShardWriter, counts: dict,
              **extra) -> dict:
    return {
        "version": MANIFEST_VERSION,
        "format": f"packed token sequences, one `{{key}}{MEMBER_SUFFIX}` member per sample",
        "seq_len": seq_len,
        "sample_tokens": seq_len + 1,
        "dtype": writer.dtype.name,
        "vocab_size": tok.vocab_size,
        "tokenizer_sha256": tok.sha256,
        # Where it was, for `pretrain data inspect` to decode samples; the sha256 above is what identifies it.
        "tokenizer_path": os.path.abspath(tok.path) if tok.path else None,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "sources": [{"path": f, "bytes": os.path.getsize(f)} for f in files],
        **counts,
        "samples": writer.samples_written,
        "sample_tokens_total": writer.samples_written * (seq_len + 1),
        "shards": writer.shards,
        **extra,
    }


def prepare_chat(
    inputs: Sequence[str],
    tokenizer: str | os.PathLike | Tokenizer,
    seq_len: int,
    out_dir: str | os.PathLike,
    *,
    shard_mb: float = 64,
    skip_bad: bool = False,
    progress: bool = True,
) -> dict:
    """Conversations (`.jsonl` lines of {"messages": [...]}) in Mistral's instruct format (data_pipeline.chat),
    each sample stored with its loss mask; returns the manifest.

    A sample's member holds 2 x (seq_len + 1) values: the tokens, then the mask (1 where the token is a target of
    the loss: the assistant's tokens and its `</s>`). Conversations are packed whole, in input order: one that
    does not fit in what is left of the current sample starts the next, and the rest is padded with `</s>`
    (mask 0). A conversation longer than seq_len + 1 tokens is dropped and counted.
    """
    from data_pipeline.chat import SkippedLines, encode, iter_conversations

    if seq_len <= 0:
        raise DataError(f"seq_len={seq_len} must be positive: pass --seq-len, e.g. 2048")
    files = expand_inputs(inputs)
    for path in files:
        if not path.endswith(".jsonl"):
            raise DataError(f"input {path} is not .jsonl: chat data is one {{\"messages\": [...]}} per line")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    sample_tokens = seq_len + 1
    counts = {"documents": 0, "tokens": 0, "trained_tokens": 0, "dropped_tokens": 0, "dropped_conversations": 0,
              "padding_tokens": 0, "bad_lines": 0}
    tokens: list[int] = []
    trained: list[bool] = []

    def flush(writer: ShardWriter) -> None:
        pad = sample_tokens - len(tokens)
        counts["padding_tokens"] += pad
        writer.add(np.array([*tokens, *[tok.eos_id] * pad, *trained, *[False] * pad], dtype=np.uint32))
        tokens.clear()
        trained.clear()

    meter = _Progress(sum(os.path.getsize(f) for f in files), progress)
    bad = SkippedLines()
    with _dataset_output(out_dir, meter) as out:
        writer = ShardWriter(out, max(int(shard_mb * 1e6), 1), token_dtype(tok.vocab_size), sample_tokens)
        for path in files:
            tokens_before = counts["tokens"]
            for messages in iter_conversations(path, skip_bad, bad):
                encoded = encode(tok, messages)
                counts["documents"] += 1
                counts["tokens"] += len(encoded.tokens)
                if len(encoded.tokens) > sample_tokens:
                    counts["dropped_conversations"] += 1
                    counts["dropped_tokens"] += len(encoded.tokens)
                    continue
                if len(tokens) + len(encoded.tokens) > sample_tokens:
                    flush(writer)
                tokens += encoded.tokens
                trained += encoded.trained
                counts["trained_tokens"] += sum(encoded.trained)
            meter.update(os.path.getsize(path), counts["tokens"] - tokens_before)
        if tokens:
            flush(writer)
        writer.close()
        counts["bad_lines"] = bad.count
        if writer.samples_written == 0:
            raise DataError(f"inputs {_names(files)} hold no conversation of at most seq_len+1={sample_tokens} "
                            f"tokens ({counts['documents']} read, {bad.count} bad lines): give more data or raise "
                            "--seq-len")
        manifest = _manifest(tok, files, seq_len, writer, counts, keep_documents=True, loss_mask=True,
                             chat_format="mistral-instruct-v1", bad_line_examples=bad.listed())
        write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _names(files: Sequence[str], shown: int = 3) -> str:
    more = f" and {len(files) - shown} more" if len(files) > shown else ""
    return ", ".join(files[:shown]) + more
