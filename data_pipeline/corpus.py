"""A corpus every machine with Python already has: the standard library's own .py sources.

Files are taken in sorted order, test suites, site-packages and IDLE are left out, and each file becomes one
JSON-lines document. The eval split is the files whose path hashes into a fixed 1-in-`eval_every` bucket, so
the split is the same on every machine with the same Python version. --max-mb caps the train split only (each
file, in sorted order, that still fits under the cap): the eval split is always all of its bucket (about
0.18 MB on Python 3.11), so it is never empty and does not change with the cap.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

_EXCLUDED_DIRS = {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages", "__pycache__"}


def stdlib_sources() -> Iterator[tuple[str, str]]:
    """(path relative to the stdlib, text) of every non-empty UTF-8 .py source outside tests, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            # A handful of stdlib files are deliberately in other encodings; they are not worth a special case.
            continue
        if text.strip():  # empty __init__.py files teach nothing
            yield rel.as_posix(), text


def write_builtin_corpus(out_dir: str | os.PathLike, max_mb: float | None = None, eval_every: int = 50) -> dict:
    """Write OUT/train/stdlib.jsonl (at most `max_mb` of text) and OUT/eval/stdlib.jsonl ({"text", "path"} per
    line); returns the documents and bytes of each."""
    out = Path(out_dir)
    limit = None if max_mb is None else int(max_mb * 1e6)
    counts = {"train": {"documents": 0, "bytes": 0}, "eval": {"documents": 0, "bytes": 0}}
    handles = {}
    try:
        for split in counts:
            (out / split).mkdir(parents=True, exist_ok=True)
            handles[split] = open(out / split / "stdlib.jsonl.tmp", "w", encoding="utf-8")
        for rel, text in stdlib_sources():
            size = len(text.encode("utf-8"))
            bucket = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "little") % eval_every
            split = "eval" if bucket == 0 else "train"
            if split == "train" and limit is not None and counts["train"]["bytes"] + size > limit:
                continue  # a smaller file further on may still fit under the cap
            handles[split].write(json.dumps({"text": text, "path": rel}, ensure_ascii=False) + "\n")
            counts[split]["documents"] += 1
            counts[split]["bytes"] += size
        for handle in handles.values():
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        for handle in handles.values():
            handle.close()
    for split in counts:
        os.replace(out / split / "stdlib.jsonl.tmp", out / split / "stdlib.jsonl")
    return counts
