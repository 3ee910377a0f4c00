"""Atomic, verified checkpoint directories.

A checkpoint is written into `.tmp-step_N/` by every rank; each rank hashes its files while writing them (one pass
over the bytes), fsyncs each once and drops a `.done-rank{r}` marker listing them (size and sha256), so the hashing
is spread over the ranks. Once every rank
has reported success, rank 0 merges the markers into `manifest.json` (written last), renames the directory to
`step_N/`, fsyncs the parent and only then points `latest` at it. A directory without a valid manifest is never
loaded; a failed save is removed whole; retention deletes only complete checkpoints older than the newest, each
first renamed away so that a half-deleted one never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from durable import WRITE_CHUNK, fsync_dir, fsync_file, write_json_atomic

MANIFEST = "manifest.json"
LATEST = "latest"
_DONE_PREFIX = ".done-rank"
# A complete marker's name only: durable writes each under a temporary name first (`.done-rank00001.tmp`), which a
# rank killed or out of space leaves half-written.
_DONE_MARKER = re.compile(r"^\.done-rank\d+$")
_CLAIM_PREFIX = ".finalizing-"  # held by the rank that finalizes a save after an error
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted; the message names it and the fix."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint that does not match its manifest (or has none): never loaded; an older one may be."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# Checkpoint files are hashed in blocks of HASH_BLOCK bytes, several at once: one sha256 stream runs at 1.3 GB/s on
# a core of the CI machine, no faster than a fast disk (on an H200 host, saving with one stream wrote at 69 % of
# dd's speed). Each block's sha256 is that of its byte range of the file.
HASH_BLOCK = 256 << 20
HASH_THREADS = min(4, os.cpu_count() or 1)


def _sha256(segments: Iterable[bytes | memoryview]) -> str:
    digest = hashlib.sha256()
    for segment in segments:
        digest.update(segment)
    return digest.hexdigest()


def write_hashed(path: Path, pieces: Iterable[bytes | memoryview]) -> list[str]:
    """Write `pieces` to a new file in large sequential writes and fsync once; returns the sha256 of each
    HASH_BLOCK-byte block of it (the last one shorter; one block for an empty file), hashed by other threads
    while the writing goes on (both release the GIL). One pass over the bytes: nothing is read back to hash it.
    The pieces must stay unchanged until it returns."""
    hashed, block, block_size = [], [], 0
    with ThreadPoolExecutor(HASH_THREADS) as hashers, open(path, "wb", buffering=0) as f:
        for piece in pieces:
            piece = memoryview(piece).cast("B")
            for start in range(0, len(piece), WRITE_CHUNK):
                chunk = piece[start:start + WRITE_CHUNK]
                written = 0
                while written < len(chunk):  # a raw write may write less than asked
                    written += f.write(chunk[written:])
                while len(chunk):
                    take = min(len(chunk), HASH_BLOCK - block_size)
                    block.append(chunk[:take])
                    block_size, chunk = block_size + take, chunk[take:]
                    if block_size == HASH_BLOCK:
                        hashed.append(hashers.submit(_sha256, block))
                        block, block_size = [], 0
        if block_size or not hashed:
            hashed.append(hashers.submit(_sha256, block))
        os.fsync(f.fileno())
        return [future.result() for future in hashed]


def sha256_range(path: Path, offset: int, length: int) -> str:
    """The sha256 of `length` bytes of a file from `offset` (of fewer where the file is shorter)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while length:
            data = f.read(min(WRITE_CHUNK, length))
            if not data:
                break  # the file shrank meanwhile: the digest will not match
            digest.update(data)
            length -= len(data)
    return digest.hexdigest()


def mark_rank_done(tmp_dir: Path, rank: int, files: dict[Path, list[str]]) -> None:
    """Called by each rank once `files` (path: block sha256s, from `write_hashed`) are written and synced: leave the
    marker rank 0 merges."""
    listing = {str(path.relative_to(tmp_dir)): {"size": path.stat().st_size, "sha256_blocks": blocks,
                                                "hash_block": HASH_BLOCK}
               for path, blocks in files.items()}
    write_json_atomic(tmp_dir / f"{_DONE_PREFIX}{rank:05d}", listing)


def done_markers(tmp_dir: Path) -> list[Path]:
    """The complete markers in a checkpoint being written, one for each rank that has written its part."""
    return sorted(p for p in tmp_dir.glob(_DONE_PREFIX + "*") if _DONE_MARKER.match(p.name))


@dataclass(frozen=True)
class Verified:
    path: Path
    step: int
    meta: dict


def verify(path: Path, hash_files: bool = True, deferred: str | None = None,
           share: tuple[int, int] = (0, 1)) -> Verified:
    """Check a checkpoint directory against its manifest (every file there, of its size, and with `hash_files` of
    its sha256s); raise DamagedCheckpoint naming what is wrong. Files under the directory `deferred` are left
    unhashed (a load hashes them while reading them); `share=(rank, world)` hashes only every world-th block,
    from the rank-th on, so that ranks split the hashing of one checkpoint."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise DamagedCheckpoint(f"{path} has no {MANIFEST}: it is incomplete (interrupted save); use an earlier one")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise DamagedCheckpoint(f"{manifest_path} is unreadable ({e}): the checkpoint cannot be trusted") from None
    for rel, entry in files.items():
        file = path / rel
        if not file.is_file():
            raise DamagedCheckpoint(f"{file} listed in the manifest is missing: the checkpoint is damaged")
        if file.stat().st_size != entry["size"]:
            raise DamagedCheckpoint(
                f"{file} has {file.stat().st_size} bytes, the manifest says {entry['size']}: the checkpoint is damaged"
            )
    if hash_files:
        hashed = {rel: entry for rel, entry in files.items()
                  if deferred is None or not rel.startswith(deferred.rstrip("/") + "/")}
        _check_hashes(path, hashed, *share)
    return Verified(path, int(manifest["step"]), manifest.get("meta", {}))


def _check_hashes(path: Path, files: dict[str, dict], rank: int, world: int) -> None:
    """Hash the blocks of `files` (manifest entries) numbered rank, rank + world, ... on one pool (reading and
    hashing release the GIL). A checkpoint written before blocks holds the sha256 of each whole file: one block."""
    blocks = []  # (file, offset, length, sha256 in the manifest)
    for rel, entry in files.items():
        if "sha256_blocks" in entry:
            step, expected = entry["hash_block"], entry["sha256_blocks"]
            offsets = range(0, max(entry["size"], 1), step)
            if len(offsets) != len(expected):
                raise DamagedCheckpoint(f"{path / rel}: its manifest entry lists {len(expected)} block hashes for "
                                        f"{len(offsets)} blocks: the checkpoint cannot be trusted")
            blocks += [(rel, offset, step, digest) for offset, digest in zip(offsets, expected, strict=True)]
        else:
            blocks.append((rel, 0, entry["size"], entry["sha256"]))
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        mine = [(rel, expected, pool.submit(sha256_range, path / rel, offset, length))
                for rel, offset, length, expected in blocks[rank::world]]
        for rel, expected, digest in mine:
            if digest.result() != expected:
                pool.shutdown(cancel_futures=True)
                raise DamagedCheckpoint(f"{path / rel} does not match its sha256 in the manifest: the checkpoint "
                                        "is corrupt")


def complete_steps(root: Path) -> list[int]:
    """Steps under a checkpoints directory that have a manifest, oldest first (verification is separate: it may be
    expensive)."""
    if not root.is_dir():
        return []
    steps = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / MANIFEST).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def newest_valid(root: Path, hash_files: bool = True) -> tuple[Verified | None, list[str]]:
    """The newest checkpoint under `root` that verifies, and why each newer one was skipped (never loaded)."""
    skipped = []
    for step in reversed(complete_steps(root)):
        try:
            return verify(root / step_dir_name(step), hash_files), skipped
        except DamagedCheckpoint as e:
            skipped.append(str(e))
    return None, skipped


def check_writable(root: Path) -> None:
    """Create the directory and a file in it, so a read-only or missing file system is reported before training
    (permission bits alone do not stop root)."""
    probe = root / ".write-probe"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(
            f"checkpoint directory {root} is not writable ({e.strerror}): fix its permissions or mount, "
            "or choose another --run-dir"
        ) from None


class CheckpointStore:
    """The save lifecycle of one run's checkpoints directory: prepare, finalize or abandon, retention."""

    def __init__(self, root: Path, keep_last: int, keep_every: int):
        self.root = root
        self.keep_last = keep_last
        self.keep_every = keep_every

    def tmp_dir(self, step: int) -> Path:
        return self.root / f".tmp-{step_dir_name(step)}"

    def prepare(self, step: int) -> Path:
        """Rank 0, before any rank writes: a fresh temporary directory (a leftover from a crash is removed)."""
        check_writable(self.root)
        tmp = self.tmp_dir(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    def finalize(self, step: int, world_size: int, meta: dict) -> Path:
        """Rank 0, once every rank has written: the manifest last, rename into place, update `latest`."""
        tmp = self.tmp_dir(step)
        markers = done_markers(tmp)
        if len(markers) != world_size:
            raise CheckpointError(f"{tmp}: {len(markers)} of {world_size} ranks reported their files written")
        files = {}
        for marker in markers:
            files.update(json.loads(marker.read_text()))
            marker.unlink()
        for sub in sorted({p.parent for p in tmp.rglob("*")} | {tmp}):  # each rank synced its files
            fsync_dir(sub)
        write_json_atomic(tmp / MANIFEST, {"step": step, "files": files, "meta": meta})
        final = self.root / step_dir_name(step)
        if final.exists():
            # Re-saving a step (after a rollback): the new directory is complete, so the old one may go.
            self._delete(final)
        tmp.rename(final)
        fsync_dir(self.root)
        self._point_latest(final)
        self.apply_retention()
        return final

    def finalize_when_written(self, step: int, world_size: int, meta: dict, wait_s: float) -> Path | None:
        """Any rank, after an error: once every rank's marker is there (waiting up to `wait_s`), finalize as rank 0
        would; if they do not all come, remove the save. Several ranks may fail at once: one of them claims the save
        and does this; the others return None, as they do when the save is gone already (finished by another)."""
        tmp = self.tmp_dir(step)
        deadline = time.monotonic() + wait_s
        while tmp.is_dir() and len(done_markers(tmp)) < world_size and time.monotonic() < deadline:
            time.sleep(0.1)
        claim = self.root / f"{_CLAIM_PREFIX}{step_dir_name(step)}"
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return None
        try:
            if not tmp.is_dir():
                return None
            written = len(done_markers(tmp))
            if written < world_size:
                self.abandon(step)
                raise CheckpointError(f"{tmp}: only {written} of {world_size} ranks wrote their part within "
                                      f"{wait_s:.0f} s of the error: removed")
            return self.finalize(step, world_size, meta)
        finally:
            claim.unlink()

    def abandon(self, step: int) -> None:
        """Rank 0, after a failed save: remove what was written; earlier checkpoints are untouched."""
        shutil.rmtree(self.tmp_dir(step), ignore_errors=True)

    def remove_incomplete(self) -> list[str]:
        """Rank 0, before training starts (no save can be in flight): clear what interrupted saves left."""
        if not self.root.is_dir():
            return []
        leftovers = sorted(p for p in self.root.iterdir()
                           if p.name.startswith((".tmp-", ".deleting-", _CLAIM_PREFIX)))
        for path in leftovers:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return [p.name for p in leftovers]

    def _delete(self, path: Path) -> None:
        doomed = path.with_name(".deleting-" + path.name)
        path.rename(doomed)
        fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def _point_latest(self, final: Path) -> None:
        tmp = self.root / (LATEST + ".tmp")
        tmp.write_text(final.name + "\n")
        fsync_file(tmp)
        tmp.replace(self.root / LATEST)
        fsync_dir(self.root)

    def apply_retention(self) -> None:
        steps = complete_steps(self.root)
        keep = set(steps[-self.keep_last:])
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        for step in steps:
            if step not in keep:
                self._delete(self.root / step_dir_name(step))
