"""Where torch.compile's caches go (launch.rank): in the run directory, unless its file system refuses file locks,
which both caches take; then on the node, said once in the rank's log. The file systems are real mounts: FUSE
servers (tests/lockless_fs.py) whose lock requests get ENOLCK, as on NFS mounted without its lock manager, or no
answer at all, or that leave locking to the kernel as a local disk does."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from launch.rank import compile_cache_environment

ROOT = Path(__file__).resolve().parents[1]
NOTE = "refuses file locks"


@pytest.fixture
def lockless(tmp_path):
    """`lockless(mode)` mounts tests/lockless_fs.py, whose lock requests get what `mode` says, and returns its mount
    point; unmounted after the test."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("a FUSE mount needs root and /dev/fuse")
    servers = []

    def mount(mode: str) -> Path:
        point = tmp_path / f"{mode}-fs"
        point.mkdir()
        server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "lockless_fs.py"), str(point), mode],
                                  stdout=subprocess.PIPE, text=True)
        servers.append((server, point))
        assert server.stdout.readline().strip() == "mounted"
        return point

    yield mount
    for server, point in servers:
        server.kill()  # ends every request still waiting for it
        server.wait()
        subprocess.run(["umount", "-l", str(point)], check=True)


def run_directory(mount: Path) -> Path:
    run_dir = mount / "run"
    run_dir.mkdir()
    return run_dir


def on_the_node(caches: dict[str, str], run_dir: Path) -> bool:
    """Both caches in a directory of their own under this node's temporary directory, none in the run directory."""
    paths = [Path(path) for path in caches.values()]
    return (len({path.parent for path in paths}) == 1 and paths[0].parent.parent == Path(tempfile.gettempdir())
            and not any(path.is_relative_to(run_dir) for path in paths))


def test_where_locks_are_refused_the_caches_stay_on_the_node(lockless, capfd):
    run_dir = run_directory(lockless("refuse"))
    with open(run_dir / "file", "w") as f, pytest.raises(OSError) as refused:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert refused.value.errno == errno.ENOLCK  # the file system refuses for real
    caches = compile_cache_environment(run_dir)
    assert on_the_node(caches, run_dir), caches
    said = capfd.readouterr().out
    assert said.count(NOTE) == 1 and "No locks available" in said, said
    assert compile_cache_environment(run_dir) == caches  # the run's next start on this node finds what it compiled


def test_a_lock_request_without_answer_does_not_hang_the_rank(lockless, capfd):
    run_dir = run_directory(lockless("hang"))
    start = time.monotonic()
    caches = compile_cache_environment(run_dir)
    assert time.monotonic() - start < 60
    assert on_the_node(caches, run_dir), caches
    assert "no answer" in capfd.readouterr().out


@pytest.mark.parametrize("file_system", ["fuse", "disk"])
def test_where_locks_work_the_caches_are_in_the_run_directory(lockless, tmp_path, capfd, file_system):
    run_dir = run_directory(lockless("local") if file_system == "fuse" else tmp_path)
    assert compile_cache_environment(run_dir) == {"TORCHINDUCTOR_CACHE_DIR": str(run_dir / "compile-cache/inductor"),
                                                  "TRITON_CACHE_DIR": str(run_dir / "compile-cache/triton")}
    assert NOTE not in capfd.readouterr().out
    assert not [p.name for p in (run_dir / "compile-cache").iterdir()]  # the lock probe cleaned up


def test_the_rank_log_says_where_the_caches_are_once(lockless, tmp_path):
    """A real rank (`python -m launch.rank`) of a run directory on the refusing file system: its log says once why
    the caches are on the node, in its temporary directory (then the run stops: it has no config)."""
    run_dir = run_directory(lockless("refuse"))
    node_tmp = tmp_path / "node-tmp"
    node_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "RANK")}
    env["TMPDIR"] = str(node_tmp)
    rank = subprocess.run([sys.executable, "-m", "launch.rank", str(run_dir)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert rank.returncode != 0 and "config" in rank.stderr, rank.stderr[-2000:]
    log = (run_dir / "logs" / "rank00000.log").read_text()
    assert log.count(NOTE) == 1 and f"caches are in {node_tmp}/pretrain-compile-cache-run-" in log, log
