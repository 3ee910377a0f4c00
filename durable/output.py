"""Durable, all-or-nothing output: the one way the project writes a file or a directory that readers take whole.

A directory (a dataset, a tokenizer, a corpus, an export) is written into a hidden temporary sibling, every file
and directory in it fsynced, then put in place with one atomic exchange of the two names (renameat2's
RENAME_EXCHANGE; where the file system lacks it, two renames, undone at the next start if a crash falls between
them). Whatever stops the writing (bad input, a full disk, SIGINT, SIGTERM or SIGKILL), the previous output stays
as it was, byte for byte, and no half-written directory carries its name; the next write clears what a killed one
left. Checkpoints (pretrain/checkpoint/store.py) are written by several ranks at once, so they keep their own
lifecycle on these same primitives.

Temporary names carry the writer's host and pid (`.OUT.tmp-HOST-PID`): writers on several hosts of one shared file
system may have the same pid, and only this host can tell whether a pid of its own still runs. A write clears only
this host's leftovers whose process is gone; another host's are left to that host's next write (clear_leftovers).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

WRITE_CHUNK = 64 << 20  # bytes per read or write: large, sequential


class OutputError(Exception):
    """An output that cannot be written or may not be replaced; the message names the problem and the fix, and the
    previous output is untouched."""


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file under `root`, then every directory, deepest first, so each name is durable after its content."""
    paths = sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True)
    for path in paths:
        if path.is_file():
            fsync_file(path)
    for directory in [p for p in paths if p.is_dir()] + [root]:
        fsync_dir(directory)


def sha256_file(path: Path) -> str:
    """The file's sha256 in one sequential pass: each chunk is hashed in a second thread while the next is read
    (both release the GIL), so verifying runs at the disk's read speed where hashing alone would be slower."""
    digest = hashlib.sha256()
    buffers = [bytearray(WRITE_CHUNK), bytearray(WRITE_CHUNK)]
    with ThreadPoolExecutor(1) as hasher, open(path, "rb", buffering=0) as f:
        hashed = None
        for index in itertools.count():
            buffer = buffers[index % 2]  # the other one may still be hashed
            size = f.readinto(buffer)
            if hashed is not None:
                hashed.result()
            if not size:
                break
            hashed = hasher.submit(digest.update, memoryview(buffer)[:size])
    return digest.hexdigest()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """`path` holds `data` or what it held before, never part of it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: dict) -> None:
    write_bytes_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode())


def append_line(path: Path, line: str) -> None:
    """`line` added at the end of `path` whole or not at all: one write in append mode, then fsync. A reader takes the
    lines that end with a newline (a crash inside the write can leave a last line without one)."""
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(errno.ENOSPC, f"a line of {len(data)} bytes was cut short", str(path))
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ whole directories


def output_taken(out: Path) -> bool:
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


def check_replaceable(out: Path, owned: Sequence[str], what: str) -> None:
    """Refuse, before anything is written, to replace `out` unless each entry in it matches one of the glob
    patterns `owned` (what a previous `what` holds): a directory that holds anything else is never deleted."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file, not a directory: choose another --out (nothing was written)")
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if not any(fnmatch.fnmatch(p.name, g) for g in owned))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise OutputError(f"{out} holds {foreign[0]!r}{more}, which is not part of {what}: choose a new or empty "
                          "--out (nothing was written)")


def _sibling(out: Path, kind: str) -> Path:
    """This process's `kind` ("tmp" or "old") of `out`, named by host and pid."""
    return out.parent / f".{out.name}.{kind}-{_host()}-{os.getpid()}"


def _host() -> str:
    """This host's name as it stands in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())


def clear_leftovers(out: Path) -> list[str]:
    """What writes of `out` on this host killed before they finished left beside it: a temporary directory is
    removed; a previous output set aside by the two-rename fallback goes back in place if the crash came before the
    new one took its name. Writes still running (their pid is alive on this host) are left alone, and so is all that
    writers on other hosts left: from here a pid of theirs cannot be checked, so it may be a write in progress. Those
    are named in the list returned (with what was cleared); their own host's next write of `out` clears them, or
    they may be removed by hand once no write of `out` runs there."""
    if not out.parent.is_dir():
        return []
    report, here = [], _host()
    for path in sorted(out.parent.glob(f".{_glob_escape(out.name)}.*-*")):
        kind, _, writer = path.name.removeprefix(f".{out.name}.").partition("-")
        host, _, pid = writer.rpartition("-")
        if kind not in ("tmp", "old") or not host or not pid.isdigit():
            continue
        if host != here:
            report.append(f"{path.name} left alone: written on host {host}, where it may still be being written")
            continue
        if _alive(int(pid)):
            continue
        if kind == "old" and not out.exists():
            path.rename(out)
            fsync_dir(out.parent)
            report.append(f"{path.name} put back as {out.name}")
        else:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            report.append(f"{path.name} removed")
    return report


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yields a fresh temporary directory beside `out`; when the block succeeds its tree is fsynced and it takes
    `out`'s place in one step. When the block fails, `out` is untouched and the temporary directory removed; a full
    disk is reported as an OutputError. Callers check first that `out` may be replaced (check_replaceable)."""
    out = Path(out)
    tmp = _sibling(out, "tmp")
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            clear_leftovers(out)
            # Inside the try whose finally removes it: a stop signal raised as the mkdir returns would otherwise
            # leave the new directory behind.
            tmp.mkdir()
        except OSError as e:
            raise OutputError(f"cannot create a directory beside {out} ({e.strerror}): check the permissions and "
                              "the file system of its parent, or choose another --out") from None
        try:
            yield tmp
            _readable_as_other_files(tmp)
            fsync_tree(tmp)
            _put_in_place(tmp, out)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutputError(f"no space left to write {out} ({e.strerror}): free space on its file system or "
                                  "choose another --out; the previous content (if any) is unchanged") from None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after an exchange, the previous output


def _readable_as_other_files(root: Path) -> None:
    """Files with the mode this process gives new files (some writers, safetensors' among them, create theirs 0600,
    unreadable to the others a release is for)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in root.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _put_in_place(tmp: Path, out: Path) -> None:
    if out.exists() and _exchange(tmp, out):
        fsync_dir(out.parent)
        return
    if out.exists():
        old = _sibling(out, "old")
        out.rename(old)  # a crash from here to the next rename: clear_leftovers puts `old` back
        tmp.rename(out)
        fsync_dir(out.parent)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(out)
        fsync_dir(out.parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two names atomically (Linux renameat2); False where the C library or the file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))
