"""The training loader: deterministic, resumable, data-parallel batches of packed token sequences.

Design
------
*One global order per source and epoch.* The epoch's shard order is a permutation drawn from
(seed, source, epoch); consecutive runs of `window_shards` shards form a window whose samples are permuted
together (from seed, source, epoch, window). Concatenating the epochs gives each source an infinite sample
stream, and a position in it is (epoch, window, offset) - three integers.

*One global cursor, every rank reads the same stream.* Global step t takes the next dp_size * micro_batch
samples of the source chosen for step t; rank r takes slice [r*micro_batch, (r+1)*micro_batch). Because
the cursor counts samples consumed by all ranks, the state is identical on every rank, and restoring it under
another dp_size still hands each remaining sample of the epoch to exactly one rank.

*Context parallelism takes a chunk of each sample.* The cp ranks of a data-parallel rank read the same samples;
rank c of cp keeps tokens [c*L, (c+1)*L + 1) of each (L = seq_len / cp: its chunk and the next token, the label of
the chunk's last position). The state is the same as without it, so a run resumes under another cp.

*Mixing by weight without state.* The source of global step t is a categorical draw with the source weights
from an RNG seeded by (seed, t), so the mixture's "rng position" is the step counter itself.

*Workers produce whole steps.* With W DataLoader workers, worker w builds the batches of steps i with
i % W == w (counted from the restore point) and only advances its cursors over the others; DataLoader returns
worker outputs round-robin, i.e. in step order. Each batch travels with the loader state after its step,
so `state_dict()` is exact whatever W was, and W may change between save and restore. The state names each
source by a fingerprint of its shard list: resuming on other data is refused, the same data moved is accepted.
Workers ignore stop signals (their rank decides when to stop); iterating returns `Batches`, whose `close()` ends
them deterministically, so a rank never waits at exit for workers that garbage collection did not reach.

*Reading.* Shards are opened by URL with webdataset's `gopen` (local paths, `pipe:` commands, http(s) and
object stores through their command-line clients; a `{name}` in a source path is replaced by the shard name,
e.g. `pipe:aws s3 cp s3://bucket/data/{name} -`). A shard is read whole and sequentially, its sha256 checked
on first open, and - since `pretrain data prepare` writes fixed-size members with fixed headers - its tar
layout is validated and decoded in one vectorized numpy pass instead of member by member, which is what
lets one process deliver well over 5 M tokens/s. Only the current window's shards are held in memory (per
source and worker): window_shards * shard size.

*Bad data* raises `DataError` naming the shard and the fix; with skip_corrupt_shards the shard's samples are
left out of its window (every rank and worker reaches the same verdict from the same bytes) and counted in
`stats()`.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import json
import multiprocessing.util  # noqa: F401  (registers its exit handler before ours: see _close_open_batches)
import signal
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.errors import DataError
from data_pipeline.prepare import MANIFEST, MANIFEST_VERSION, MEMBER_SUFFIX, TAR_BLOCK

STATE_VERSION = 2  # 2: sources named by fingerprint, not path


def shard_url(source: str, name: str) -> str:
    if "{name}" in source:
        return source.replace("{name}", name)
    return source.rstrip("/") + "/" + name


def _read_url(url: str) -> bytes:
    from webdataset.gopen import gopen

    try:
        with gopen(url, "rb") as stream:
            return stream.read()
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {url} ({e}): check the path or URL and its permissions") from None


def read_manifest(source: str) -> dict:
    """The manifest.json of a prepared directory (or URL prefix); DataError if missing or unusable."""
    url = shard_url(source, MANIFEST)
    try:
        raw = _read_url(url)
    except DataError:
        raise DataError(
            f"{url} not found: {source} is not a finished `pretrain data prepare` output "
            "(an interrupted prepare leaves no manifest); run prepare again"
        ) from None
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{url} is not valid JSON ({e.msg}): re-run `pretrain data prepare`") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise DataError(f"{url} has version {manifest.get('version')}, this code reads {MANIFEST_VERSION}: "
                        "re-run `pretrain data prepare`")
    if not manifest.get("shards"):
        raise DataError(f"{url} lists no shards: re-run `pretrain data prepare` on non-empty input")
    return manifest


def check_compatible(manifest: dict, vocab_size: int | None, tokenizer_sha: str | None,
                     source: str = "dataset") -> None:
    """Refuse data tokenized for another vocabulary or tokenizer: its ids would silently mean other tokens."""
    if vocab_size is not None and manifest["vocab_size"] != vocab_size:
        raise DataError(
            f"{source} was tokenized with vocab_size {manifest['vocab_size']}, the model has {vocab_size}: "
            "re-run `pretrain data prepare` with the model's tokenizer or set model.vocab_size to match"
        )
    if tokenizer_sha is not None and manifest["tokenizer_sha256"] != tokenizer_sha:
        raise DataError(
            f"{source} was tokenized with tokenizer sha256 {manifest['tokenizer_sha256'][:12]}..., the configured "
            f"tokenizer is {tokenizer_sha[:12]}...: re-run `pretrain data prepare --tokenizer` with data.tokenizer"
        )


def decode_shard(data: bytes, where: str, samples: int, sample_tokens: int, dtype: np.dtype) -> np.ndarray:
    """[samples, sample_tokens] tokens of a shard written by `prepare`, its whole tar layout validated at once."""
    sample_bytes = sample_tokens * dtype.itemsize
    stride = TAR_BLOCK + -(-sample_bytes // TAR_BLOCK) * TAR_BLOCK
    needed = samples * stride + 2 * TAR_BLOCK
    if len(data) < needed:
        raise DataError(f"shard {where} is truncated ({len(data)} bytes, at least {needed} expected): "
                        "re-copy or re-prepare it, or set data.skip_corrupt_shards=true to skip it")
    raw = np.frombuffer(data, dtype=np.uint8, count=samples * stride).reshape(samples, stride)
    headers = raw[:, :TAR_BLOCK]
    # The ustar checksum: the header's byte sum with its own 8-byte checksum field counted as spaces; tarfile
    # stores it as six octal digits, NUL, space.
    sums = headers.sum(axis=1, dtype=np.int64) - headers[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
    digits = headers[:, 148:154].astype(np.int64) - ord("0")
    stored = digits @ (8 ** np.arange(5, -1, -1))
    suffix = np.frombuffer(MEMBER_SUFFIX.encode(), np.uint8)
    name_length = 10 + len(suffix)
    valid = (
        (digits >= 0).all() and (digits < 8).all() and (stored == sums).all()
        and (headers[:, 124:136] == headers[0, 124:136]).all()
        and (headers[:, 10:name_length] == suffix).all()
        and not headers[:, name_length:100].any()
    )
    if not valid:
        raise DataError(f"shard {where} is corrupt (bad tar headers): re-copy or re-prepare it, "
                        "or set data.skip_corrupt_shards=true to skip it")
    if int(bytes(headers[0, 124:136]).strip(b"\0 "), 8) != sample_bytes:
        raise DataError(f"shard {where} holds samples of another length than its manifest says: re-prepare it")
    if any(data[samples * stride: needed]):
        raise DataError(f"shard {where} has extra members or a damaged end: re-copy or re-prepare it")
    return raw[:, TAR_BLOCK:TAR_BLOCK + sample_bytes].copy().view(dtype).reshape(samples, sample_tokens)


def values_per_sample(sample_tokens: int, loss_mask: bool) -> int:
    """Values a shard stores per sample: its tokens, then, for chat data (prepare --chat), as many loss-mask values."""
    return sample_tokens * (2 if loss_mask else 1)


def read_shard(source: str, shard: dict, sample_tokens: int, dtype: str, verify_checksum: bool = True) -> np.ndarray:
    """[samples, sample_tokens] tokens of a shard listed in `source`'s manifest: size, sha256 and tar layout checked."""
    url = shard_url(source, shard["name"])
    data = _read_url(url)
    if len(data) != shard["bytes"]:
        raise DataError(f"shard {url} has {len(data)} bytes, its manifest says {shard['bytes']} "
                        "(truncated or replaced): re-copy or re-prepare it, "
                        "or set data.skip_corrupt_shards=true to skip it")
    if verify_checksum:
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard["sha256"]:
            raise DataError(f"shard {url} fails its sha256 check ({digest[:12]}... != manifest "
                            f"{shard['sha256'][:12]}...): re-copy or re-prepare it, "
                            "or set data.skip_corrupt_shards=true to skip it")
    # prepare writes little-endian whatever the machine
    return decode_shard(data, url, shard["samples"], sample_tokens, np.dtype(dtype).newbyteorder("<"))


@dataclass(frozen=True)
class _Source:
    path: str
    weight: float
    manifest: dict

    @property
    def fingerprint(self) -> str:
        """Identifies the data, not where it lies: a resumed run may read a copy at another path."""
        return hashlib.sha256(json.dumps(self.manifest["shards"], sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Options:
    seed: int
    window_shards: int
    verify_checksums: bool
    skip_corrupt_shards: bool
    sample_tokens: int
    dtype: str
    loss_mask: bool  # each stored sample is its tokens followed by as many loss-mask values (prepare --chat)

    @property
    def sample_values(self) -> int:
        return values_per_sample(self.sample_tokens, self.loss_mask)


class _SourceStream:
    """One source's infinite stream of samples in the global order, read window by window."""

    def __init__(self, source: _Source, index: int, options: _Options, position: dict, skipped: set[str]) -> None:
        self.source = source
        self.index = index
        self.options = options
        self.epoch, self.window, self.offset = position["epoch"], position["window"], position["offset"]
        self.skipped = skipped
        self.shards = source.manifest["shards"]
        self._order_epoch = -1
        self._windows: list[np.ndarray] = []
        self._loaded_key: tuple[int, int] | None = None
        self._loaded: np.ndarray | None = None
        self._verified: set[str] = set()
        self._empty_windows_in_row = 0

    def position(self) -> dict:
        return {"epoch": self.epoch, "window": self.window, "offset": self.offset}

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.options.seed & (2**63 - 1), self.index, *keys])

    def _epoch_windows(self) -> list[np.ndarray]:
        if self._order_epoch != self.epoch:
            order = self._rng(self.epoch).permutation(len(self.shards))
            size = self.options.window_shards
            self._windows = [order[i:i + size] for i in range(0, len(order), size)]
            self._order_epoch = self.epoch
        return self._windows

    def _window_samples(self) -> np.ndarray:
        key = (self.epoch, self.window)
        if self._loaded_key != key:
            self._loaded = None  # free the previous window before reading the next
            loaded = (self._load_shard(int(i)) for i in self._epoch_windows()[self.window])
            arrays = [a for a in loaded if a is not None]
            empty = np.zeros((0, self.options.sample_values), self.options.dtype)
            samples = np.concatenate(arrays) if arrays else empty
            self._loaded = samples[self._rng(self.epoch, self.window, 1).permutation(len(samples))]
            self._loaded_key = key
        return self._loaded

    def _window_length(self) -> int:
        if self.options.skip_corrupt_shards:
            # A corrupt shard shrinks its window; only reading it tells, and every reader reads the same bytes.
            return len(self._window_samples())
        return sum(self.shards[int(i)]["samples"] for i in self._epoch_windows()[self.window])

    def _load_shard(self, i: int) -> np.ndarray | None:
        shard = self.shards[i]
        url = shard_url(self.source.path, shard["name"])
        try:
            # Checked on first open; a window read again in a later epoch was checked then.
            check = self.options.verify_checksums and url not in self._verified
            samples = read_shard(self.source.path, shard, self.options.sample_values, self.options.dtype, check)
            self._verified.add(url)
            return samples
        except DataError:
            if not self.options.skip_corrupt_shards:
                raise
            self.skipped.add(url)
            return None

    def _advance(self, count: int, keep: range) -> list[np.ndarray]:
        """Move `count` samples on; return those whose index among the `count` lies in `keep`."""
        pieces = []
        done = 0
        while done < count:
            length = self._window_length()
            available = length - self.offset
            if available <= 0:
                self._next_window(empty=length == 0)
                continue
            taken = min(available, count - done)
            low, high = max(keep.start, done), min(keep.stop, done + taken)
            if low < high:
                start = self.offset + low - done
                pieces.append(self._window_samples()[start:start + high - low])
            self.offset += taken
            done += taken
        return pieces

    def _next_window(self, empty: bool) -> None:
        self._empty_windows_in_row = self._empty_windows_in_row + 1 if empty else 0
        if self._empty_windows_in_row > len(self._epoch_windows()):
            raise DataError(f"every shard of {self.source.path} is corrupt or empty: re-prepare the data")
        self.offset = 0
        self.window += 1
        if self.window == len(self._epoch_windows()):
            self.window = 0
            self.epoch += 1

    def take(self, count: int, keep: range) -> np.ndarray:
        """Samples `keep` of the next `count`: a rank's slice of a global batch, without copying the rest."""
        return np.concatenate(self._advance(count, keep))

    def skip(self, count: int) -> None:
        self._advance(count, range(0))


def choose_source(seed: int, step: int, cumulative_weights: np.ndarray) -> int:
    """The source of global step `step`: a weighted draw that depends only on (seed, step)."""
    u = np.random.default_rng([seed & (2**63 - 1), 0x6D6978, step]).random()
    return int(np.searchsorted(cumulative_weights, u * cumulative_weights[-1], side="right"))


class _StepBatches(IterableDataset):
    """Yields (batch, loader state after that step, skipped shards, None) for this worker's share of the steps,
    or (None, None, None, message) of a DataError: DataLoader would re-raise it with a worker traceback in the
    message, and the user should see one line."""

    def __init__(self, sources: list[_Source], options: _Options, state: dict,
                 dp_rank: int, dp_size: int, micro_batch: int, chunk: slice) -> None:
        self.sources, self.options, self.state = sources, options, state
        self.dp_rank, self.dp_size, self.micro_batch, self.chunk = dp_rank, dp_size, micro_batch, chunk

    def __iter__(self) -> Iterator[tuple[dict | None, dict | None, list[str] | None, str | None]]:
        try:
            yield from self._steps()
        except DataError as e:
            yield None, None, None, str(e)

    def _steps(self) -> Iterator[tuple[dict, dict, list[str], None]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skipped: set[str] = set()
        streams = [_SourceStream(s, i, self.options, p, skipped)
                   for i, (s, p) in enumerate(zip(self.sources, self.state["sources"], strict=True))]
        cumulative = np.cumsum([s.weight for s in self.sources])
        global_batch = self.dp_size * self.micro_batch
        rank_slice = range(self.dp_rank * self.micro_batch, (self.dp_rank + 1) * self.micro_batch)
        step = self.state["step"]
        local = 0
        while True:
            stream = streams[choose_source(self.options.seed, step, cumulative) if len(streams) > 1 else 0]
            if local % workers == worker:
                samples = stream.take(global_batch, rank_slice)
                state = {"version": STATE_VERSION, "step": step + 1, "sources": [s.position() for s in streams]}
                yield _batch(samples, self.options, self.chunk), state, sorted(skipped), None
            else:
                stream.skip(global_batch)
            step += 1
            local += 1


def _batch(samples: np.ndarray, options: _Options, chunk: slice) -> dict:
    """{"tokens": [micro_batch, chunk length]} (the whole sample of seq_len + 1 tokens without context parallelism),
    with "loss_mask" (bool, the same shape) for masked data."""
    tokens = torch.from_numpy(samples[:, :options.sample_tokens][:, chunk].astype(np.int64))
    if not options.loss_mask:
        return {"tokens": tokens}
    return {"tokens": tokens, "loss_mask": torch.from_numpy(samples[:, options.sample_tokens:][:, chunk] != 0)}


def _ignore_stop_signals(_worker_id: int) -> None:
    """Slurm signals every process of a job (scancel, preemption): a worker that died of it would take its rank down
    before the rank could save. Workers leave stopping to their rank, which closes its `Batches` (or is gone: then
    DataLoader's watchdog ends the worker within seconds)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class Batches:
    """The batches of one pass over a TokenLoader, with their DataLoader workers; `close()` (or the end of a `with`
    block) ends the workers at once. An error while reading closes them too.

    Workers ignore stop signals, so they must never outlive their process's wish to exit: multiprocessing's exit
    handler SIGTERMs a live worker, which ignores it, and joins it forever. That happened wherever a `Batches` was
    still referenced when Python exited (DeepSpeed's pipeline engine keeps the last `data_iter` it was given; a test
    that stopped reading at an error). So every open `Batches` is also closed by an exit handler that runs before
    multiprocessing's.
    """

    def __init__(self, data_loader: DataLoader, on_batch) -> None:
        self._iterator = iter(data_loader)
        self._on_batch = on_batch
        _open_batches.add(self)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            raise StopIteration
        try:
            batch, state, skipped, error = next(self._iterator)
            if error is not None:
                raise DataError(error)
        except BaseException:
            self.close()
            raise
        self._on_batch(state, skipped)
        return batch

    def close(self) -> None:
        _open_batches.discard(self)
        iterator, self._iterator = self._iterator, None
        if iterator is None or not hasattr(iterator, "_shutdown_workers"):  # closed, or no workers
            return
        # DataLoader's own orderly shutdown (what its iterator's __del__ does): each worker is told to stop and
        # joined. A worker still busy after that gets SIGTERM from it, which ours ignore: SIGKILL ends it.
        iterator._shutdown_workers()
        for worker in iterator._workers:
            if worker.is_alive():
                worker.kill()
                worker.join()

    def __enter__(self) -> Batches:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


_open_batches: weakref.WeakSet[Batches] = weakref.WeakSet()


def _close_open_batches() -> None:
    for batches in list(_open_batches):
        batches.close()


# Exit handlers run last-registered first: multiprocessing.util registers its own (which joins the workers) when
# imported, above, so this one runs ahead of it.
atexit.register(_close_open_batches)


class TokenLoader:
    """Batches {"tokens": LongTensor[micro_batch, seq_len + 1]} for one data-parallel rank, forever; data prepared
    with --chat adds "loss_mask": BoolTensor[micro_batch, seq_len + 1] (True where a token is a target of the loss).
    With cp_size > 1 each holds context-parallel rank cp_rank's chunk: seq_len / cp_size + 1 tokens.

    Iterate it for batches (`Batches`: close them when done); `state_dict()` after consuming a batch describes the
    position after that batch (the same dict on every rank), and `load_state_dict()` before iterating resumes
    from it.
    """

    def __init__(
        self,
        sources: Sequence[tuple[str, float]],
        *,
        micro_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        cp_rank: int = 0,
        cp_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        window_shards: int = 4,
        verify_checksums: bool = True,
        skip_corrupt_shards: bool = False,
        vocab_size: int | None = None,
        tokenizer_sha256: str | None = None,
    ) -> None:
        if not sources:
            raise DataError("no data sources: list prepared directories in data.train")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        if not 0 <= cp_rank < cp_size:
            raise ValueError(f"cp_rank={cp_rank} must lie in [0, cp_size={cp_size})")
        if micro_batch < 1 or num_workers < 0 or window_shards < 1:
            raise ValueError("micro_batch and window_shards must be >= 1 and num_workers >= 0")
        self.sources = []
        for path, weight in sources:
            manifest = read_manifest(path)
            check_compatible(manifest, vocab_size, tokenizer_sha256, source=path)
            self.sources.append(_Source(path, float(weight), manifest))
        first = self.sources[0].manifest
        for source in self.sources[1:]:
            if (source.manifest["sample_tokens"], source.manifest["dtype"]) != (first["sample_tokens"], first["dtype"]):
                raise DataError(f"{source.path} has samples of {source.manifest['sample_tokens']} tokens, "
                                f"{self.sources[0].path} of {first['sample_tokens']}: prepare all sources "
                                "with the same --seq-len and tokenizer")
        masked = [bool(s.manifest.get("loss_mask")) for s in self.sources]
        if len(set(masked)) > 1:
            raise DataError(f"{self.sources[masked.index(True)].path} carries a loss mask (prepare --chat), "
                            f"{self.sources[masked.index(False)].path} does not: train on chat data and plain text "
                            "in separate runs, or prepare both with --chat")
        self.options = _Options(seed, window_shards, verify_checksums, skip_corrupt_shards,
                                first["sample_tokens"], first["dtype"], masked[0])
        self.dp_rank, self.dp_size, self.micro_batch, self.num_workers = dp_rank, dp_size, micro_batch, num_workers
        if self.seq_len % cp_size:
            raise DataError(f"{self.sources[0].path} holds sequences of {self.seq_len} tokens, which do not split into "
                            f"{cp_size} equal context-parallel chunks: prepare a seq_len divisible by {cp_size}")
        chunk_len = self.seq_len // cp_size
        self.chunk = slice(cp_rank * chunk_len, (cp_rank + 1) * chunk_len + 1)
        self._state = {"version": STATE_VERSION, "step": 0,
                       "sources": [{"epoch": 0, "window": 0, "offset": 0} for _ in self.sources]}
        self._skipped: set[str] = set()

    @property
    def seq_len(self) -> int:
        return self.options.sample_tokens - 1

    def __iter__(self) -> Batches:
        dataset = _StepBatches(self.sources, self.options, copy.deepcopy(self._state),
                               self.dp_rank, self.dp_size, self.micro_batch, self.chunk)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            prefetch_factor=4 if self.num_workers else None, pin_memory=torch.cuda.is_available(),
                            worker_init_fn=_ignore_stop_signals)
        return Batches(loader, self._consumed)

    def _consumed(self, state: dict, skipped: list[str]) -> None:
        self._state = state
        self._skipped.update(skipped)

    def state_dict(self) -> dict:
        return {**copy.deepcopy(self._state), "seed": self.options.seed, "window_shards": self.options.window_shards,
                "source_paths": [s.path for s in self.sources],
                "source_fingerprints": [s.fingerprint for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')} is not {STATE_VERSION}: "
                            "it was saved by another version of the data pipeline")
        # Positions count samples in each source's shuffled order: they mean the same only for the same data,
        # seed and window size (the paths may differ: a copy of the data at another place is the same data).
        paths = [s.path for s in self.sources]
        if state["source_fingerprints"] != [s.fingerprint for s in self.sources] \
                or state["seed"] != self.options.seed or state["window_shards"] != self.options.window_shards:
            raise DataError(
                f"loader state was saved for the data in {state['source_paths']} with seed {state['seed']} and "
                f"window_shards {state['window_shards']}, this loader reads other data or settings ({paths}, "
                f"seed {self.options.seed}, window_shards {self.options.window_shards}): resume with the same "
                "prepared data and data config, or start a new run"
            )
        self._state = {"version": STATE_VERSION, "step": int(state["step"]),
                       "sources": [dict(p) for p in state["sources"]]}

    def stats(self) -> dict:
        return {"step": self._state["step"], "corrupt_shards_skipped": len(self._skipped),
                "skipped_shards": sorted(self._skipped)}


def build_loader(data_cfg, *, dp_rank: int, dp_size: int, micro_batch: int, vocab_size: int | None = None,
                 split: str = "train", cp_rank: int = 0, cp_size: int = 1) -> TokenLoader:
    """The loader a trainer needs from its `DataConfig`: train mixes data.train by weight in data.num_workers worker
    processes; eval reads data.eval in the calling process.

    Evaluation reads a few batches now and then, and each pass over a loader with workers forks them anew: a fork
    of a rank is a copy of a process that runs other threads (gloo's, the hang watchdog, an asynchronous checkpoint
    writer), whose locks the copy finds as they were, and a worker that needed one held at that moment would wait
    forever."""
    from data_pipeline.tokenizer import Tokenizer

    workers = data_cfg.num_workers
    if split == "train":
        sources = [(s.path, s.weight) for s in data_cfg.train]
    elif split == "eval":
        if data_cfg.eval is None:
            raise DataError("data.eval is not set: prepare an eval split and set data.eval to its directory")
        sources = [(data_cfg.eval, 1.0)]
        workers = 0
    else:
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    tokenizer_sha = Tokenizer.load(data_cfg.tokenizer).sha256 if data_cfg.tokenizer else None
    loader = TokenLoader(sources, micro_batch=micro_batch, dp_rank=dp_rank, dp_size=dp_size,
                         cp_rank=cp_rank, cp_size=cp_size, num_workers=workers, seed=data_cfg.seed,
                         skip_corrupt_shards=data_cfg.skip_corrupt_shards,
                         vocab_size=vocab_size, tokenizer_sha256=tokenizer_sha)
    if loader.options.loss_mask != data_cfg.loss_mask:
        raise DataError(
            f"{sources[0][0]} {'carries a' if loader.options.loss_mask else 'carries no'} loss mask, data.loss_mask is "
            f"{str(data_cfg.loss_mask).lower()}: "
            + ("set data.loss_mask=true to train on chat data" if loader.options.loss_mask else
               "prepare the data with `pretrain data prepare --chat`, or set data.loss_mask=false"))
    if loader.seq_len != data_cfg.seq_len:
        raise DataError(f"{sources[0][0]} holds sequences of {loader.seq_len} tokens, data.seq_len is "
                        f"{data_cfg.seq_len}: re-prepare with --seq-len {data_cfg.seq_len} or change data.seq_len")
    return loader
