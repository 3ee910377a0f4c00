"""Durable, all-or-nothing output: the one way the project writes a file or a directory that readers take whole
(output.py says how).

This package imports nothing from the project: every floor (data_pipeline, pretrain, launch) may use it.
"""

from durable.output import (
    WRITE_CHUNK,
    OutputError,
    append_line,
    atomic_directory,
    check_replaceable,
    clear_leftovers,
    fsync_dir,
    fsync_file,
    fsync_tree,
    output_taken,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
)

__all__ = [
    "WRITE_CHUNK",
    "OutputError",
    "append_line",
    "atomic_directory",
    "check_replaceable",
    "clear_leftovers",
    "fsync_dir",
    "fsync_file",
    "fsync_tree",
    "output_taken",
    "sha256_file",
    "write_bytes_atomic",
    "write_json_atomic",
]
