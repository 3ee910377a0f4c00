"""A corpus every machine with Python already has: the standard library's own .py sources.

Files are taken in sorted order, test suites, site-packages and IDLE are left out, and each file becomes one
JSON-lines document. The eval split is the files whose path hashes into a fixed 1-in-`eval_every` bucket, so
the split is the same on every machine with the same Python version. --max-mb caps the train split only (each
file, in sorted order, that still fits under the cap): the eval split is always all of its bucket (about
0.18 MB on Python 3.11), so it is never empty and does not change with the cap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from durable import atomic_directory, check_replaceable

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


def _split_of(rel: str, eval_every: int) -> str:
    """The split of a stdlib file: a fixed 1-in-`eval_every` bucket of its path's hash is eval."""
    bucket = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "little") % eval_every
    return "eval" if bucket == 0 else "train"


def _write_splits(out: Path, file_name: str, records: Iterator[tuple[str, dict, int]], limit: int | None) -> dict:
    """(split, record, size) items as OUT/{train,eval}/file_name JSON lines, replacing OUT as a whole once both are
    written (a previous corpus stays until then); the train split stops taking records at `limit` bytes of size.
    Returns the records and bytes of each split."""
    counts = {"train": {"documents": 0, "bytes": 0}, "eval": {"documents": 0, "bytes": 0}}
    check_replaceable(out, tuple(counts), "a corpus (train/ and eval/)")
    with atomic_directory(out) as tmp, contextlib.ExitStack() as files:
        handles = {}
        for split in counts:
            (tmp / split).mkdir()
            handles[split] = files.enter_context(open(tmp / split / file_name, "w", encoding="utf-8"))
        for split, record, size in records:
            if split == "train" and limit is not None and counts["train"]["bytes"] + size > limit:
                continue  # a smaller record further on may still fit under the cap
            handles[split].write(json.dumps(record, ensure_ascii=False) + "\n")
            counts[split]["documents"] += 1
            counts[split]["bytes"] += size
    return counts


def write_builtin_corpus(out_dir: str | os.PathLike, max_mb: float | None = None, eval_every: int = 50) -> dict:
    """Write OUT/train/stdlib.jsonl (at most `max_mb` of text) and OUT/eval/stdlib.jsonl ({"text", "path"} per
    line); returns the documents and bytes of each."""
    records = ((_split_of(rel, eval_every), {"text": text, "path": rel}, len(text.encode("utf-8")))
               for rel, text in stdlib_sources())
    return _write_splits(Path(out_dir), "stdlib.jsonl", records, None if max_mb is None else int(max_mb * 1e6))


# ------------------------------------------------------------------------------------ built-in instruction set

_MAX_ANSWER_CHARS = 400


def _documented_functions(rel: str, text: str) -> list[tuple[str, str]]:
    """(signature, first paragraph of its docstring) of each public function and method of a source with one."""
    import ast
    import inspect

    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    found = []

    def visit(body: list, owner: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef) and not owner:
                visit(node.body, node.name + ".")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                answer = inspect.cleandoc(doc).split("\n\n")[0].strip() if doc else ""
                if 20 <= len(answer) <= _MAX_ANSWER_CHARS:
                    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
                    found.append((f"def {owner}{node.name}({ast.unparse(node.args)}){returns}", answer))

    visit(tree.body, "")
    return found


def instruct_conversations(rel: str, text: str) -> Iterator[dict]:
    """Conversations about one stdlib source: a documented function's signature and a request to explain it,
    answered by its docstring's first paragraph; every third has a follow-up turn about the next function, and
    every fourth the guardrail system prompt (so that both shapes of the format are trained)."""
    from data_pipeline.chat import GUARDRAIL_PROMPT

    module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    functions = _documented_functions(rel, text)
    for i, (signature, answer) in enumerate(functions):
        messages = [{"role": "user", "content": f"Explain what this function of the Python module {module} "
                                                f"does:\n{signature}"},
                    {"role": "assistant", "content": answer}]
        if i % 3 == 2 and i + 1 < len(functions):
            follow_signature, follow_answer = functions[i + 1]
            messages += [{"role": "user", "content": f"And this one?\n{follow_signature}"},
                         {"role": "assistant", "content": follow_answer}]
        if i % 4 == 3:
            messages.insert(0, {"role": "system", "content": GUARDRAIL_PROMPT})
        yield {"messages": messages, "path": rel}


def write_builtin_instruct(out_dir: str | os.PathLike, max_mb: float | None = None, eval_every: int = 50) -> dict:
    """Write OUT/train/instruct.jsonl and OUT/eval/instruct.jsonl: `instruct_conversations` of every stdlib source,
    split by file as the corpus is (so the eval questions are about code the demo's base model never saw);
    `max_mb` caps the train split. Returns the conversations and bytes of each split."""
    def records():
        for rel, text in stdlib_sources():
            for conversation in instruct_conversations(rel, text):
                size = sum(len(m["content"].encode("utf-8")) for m in conversation["messages"])
                yield _split_of(rel, eval_every), conversation, size

    return _write_splits(Path(out_dir), "instruct.jsonl", records(), None if max_mb is None else int(max_mb * 1e6))
