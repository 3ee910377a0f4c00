"""DeepSpeed's just-in-time built ops, and the lock file that a killed build leaves behind.

DeepSpeed builds some of its ops at a rank's start through torch.utils.cpp_extension (on CPU the shared-memory
communication op, at deepspeed.init_distributed; on GPUs FusedAdam), each in TORCH_EXTENSIONS_DIR/<op>/. Every
process runs the build (ninja: a second when it is up to date) under a lock file there (torch's FileBaton): the file
exists while a process builds, the others wait until it is gone, and it records no holder. A build killed midway
(SIGKILL, a lost node) leaves it behind, and every later start waited for it forever (40 minutes, silently, were
seen). So `op_builds()`, around the part of a rank's start that builds:

* puts the builds in this environment's own directory (unless TORCH_EXTENSIONS_DIR is set): two environments with
  other torch or DeepSpeed versions, sharing torch's default, rebuilt each other's ops at every start;
* holds a shared flock on DIR/.builders meanwhile. A rank that can take it exclusively (no rank is building; the
  kernel drops a dead process's flock) first removes every lock file in DIR, all of which dead builds left, saying
  so on standard error.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path


def extensions_dir() -> Path:
    """Where this environment's ops are built: TORCH_EXTENSIONS_DIR if set, else a directory of its own."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    environment = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "torch_extensions" / f"env-{environment}"


@contextlib.contextmanager
def op_builds() -> Iterator[Path]:
    """Ops built in the block go to `extensions_dir()` (yielded), and no lock of a dead build holds them up."""
    directory = extensions_dir()
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["TORCH_EXTENSIONS_DIR"] = str(directory)
    builders = os.open(directory / ".builders", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(builders, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # ranks are building: the lock files are theirs
        else:
            for lock in sorted(directory.glob("*/lock")):
                lock.unlink(missing_ok=True)
                print(f"[pretrain] removed {lock}, which a killed build of that op left (no process was building)",
                      file=sys.stderr, flush=True)
        fcntl.flock(builders, fcntl.LOCK_SH)
        yield directory
    finally:
        os.close(builders)
