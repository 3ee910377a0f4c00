"""Atomic, verified checkpoint directories.

A checkpoint is written into `.tmp-step_N/` by every rank, each rank dropping a `.done-rank{r}` marker when its
files are fsynced. Rank 0 then hashes every file, writes `manifest.json` (sizes and sha256) last, renames the
directory to `step_N/`, fsyncs the parent and only then points `latest` at it. A directory without a valid
manifest is never loaded; retention deletes only complete checkpoints older than the newest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or trusted; the message names it and the fix."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def mark_rank_done(tmp_dir: Path, rank: int, files: list[Path]) -> None:
    """Called by each rank after writing `files`: fsync them, then leave a marker for rank 0."""
    for path in files:
        fsync_file(path)
    marker = tmp_dir / f".done-rank{rank:05d}"
    marker.write_text("")
    fsync_file(marker)


@dataclass(frozen=True)
class Verified:
    path: Path
    step: int
    meta: dict


def verify(path: Path, hash_files: bool = True) -> Verified:
    """Check a checkpoint directory against its manifest; raise CheckpointError naming what is wrong."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST}: it is incomplete (interrupted save); use an earlier one")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{manifest_path} is unreadable ({e}): the checkpoint cannot be trusted") from None
    for rel, entry in files.items():
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{file} listed in the manifest is missing: the checkpoint is damaged")
        if file.stat().st_size != entry["size"]:
            raise CheckpointError(
                f"{file} has {file.stat().st_size} bytes, the manifest says {entry['size']}: the checkpoint is damaged"
            )
        if hash_files and sha256_file(file) != entry["sha256"]:
            raise CheckpointError(f"{file} does not match its sha256 in the manifest: the checkpoint is corrupt")
    return Verified(path, int(manifest["step"]), manifest.get("meta", {}))


class CheckpointStore:
    def __init__(self, root: Path, keep_last: int, keep_every: int):
        self.root = root
        self.keep_last = keep_last
        self.keep_every = keep_every

    def tmp_dir(self, step: int) -> Path:
        return self.root / f".tmp-{step_dir_name(step)}"

    def prepare(self, step: int) -> Path:
        """Rank 0, before any rank writes: a fresh temporary directory (a leftover from a crash is removed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise CheckpointError(f"checkpoint directory {self.root} is not writable: fix its permissions")
        tmp = self.tmp_dir(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    def finalize(self, step: int, world_size: int, meta: dict, timeout_s: float = 3600.0) -> Path:
        """Rank 0: wait for every rank's marker, write the manifest last, rename into place, update `latest`."""
        tmp = self.tmp_dir(step)
        deadline = time.monotonic() + timeout_s
        while len(list(tmp.glob(".done-rank*"))) < world_size:
            if time.monotonic() > deadline:
                raise CheckpointError(f"{tmp}: not every rank finished writing within {timeout_s:.0f} s")
            time.sleep(0.05)
        for marker in tmp.glob(".done-rank*"):
            marker.unlink()
        files = {}
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            fsync_file(file)
            files[str(file.relative_to(tmp))] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
        for sub in sorted({p.parent for p in tmp.rglob("*")} | {tmp}):
            fsync_dir(sub)
        write_json_atomic(tmp / MANIFEST, {"step": step, "files": files, "meta": meta})
        final = self.root / step_dir_name(step)
        if final.exists():
            # Re-saving a step (after a rollback): the new directory is complete, so the old one may go.
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(self.root)
        self._point_latest(final)
        self.apply_retention()
        return final

    def _point_latest(self, final: Path) -> None:
        tmp = self.root / (LATEST + ".tmp")
        tmp.write_text(final.name + "\n")
        fsync_file(tmp)
        tmp.replace(self.root / LATEST)
        fsync_dir(self.root)

    def complete_steps(self) -> list[int]:
        """Steps with a manifest, oldest first (verification is separate: it may be expensive)."""
        if not self.root.is_dir():
            return []
        steps = []
        for path in self.root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / MANIFEST).is_file():
                steps.append(int(match.group(1)))
        return sorted(steps)

    def newest_valid(self, hash_files: bool = True) -> Verified | None:
        """The newest checkpoint that verifies; broken ones are skipped, never loaded."""
        for step in reversed(self.complete_steps()):
            try:
                return verify(self.root / step_dir_name(step), hash_files)
            except CheckpointError:
                continue
        return None

    def apply_retention(self) -> None:
        steps = self.complete_steps()
        keep = set(steps[-self.keep_last:])
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        for step in steps:
            if step not in keep:
                shutil.rmtree(self.root / step_dir_name(step), ignore_errors=True)
