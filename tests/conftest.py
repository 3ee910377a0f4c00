import fcntl
import os
import shutil
import subprocess

import pytest

# The longest files (minutes each on 2 cores), started first: tests/run.sh gives each file to one of two workers
# (pytest-xdist's loadfile), and none should be left with a long one at the end.
LONGEST_FIRST = ["test_training.py", "test_slurm.py", "test_faults.py", "test_hangs.py", "test_main_job.py"]


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        return LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its order


@pytest.fixture(scope="session")
def single_process_group():
    """A world of one gloo process with megatron's groups at tp=1, for single-process model tests."""
    from pretrain import parallel

    with parallel.single_process_group(backend="gloo"):
        yield


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The built-in corpus (1.5 MB of the standard library), a 4096-piece tokenizer and 128-token shards:
    `data.*` overrides for configs/tiny.yaml."""
    from data_pipeline.corpus import write_builtin_corpus
    from data_pipeline.prepare import prepare
    from data_pipeline.tokenizer import train_tokenizer

    # One copy for the whole run: xdist's workers share their base directory's parent and take turns under a lock.
    shared = tmp_path_factory.getbasetemp()
    root = (shared.parent if "PYTEST_XDIST_WORKER" in os.environ else shared) / "tiny_data"
    with open(f"{root}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            shutil.rmtree(root, ignore_errors=True)
            write_builtin_corpus(root / "corpus", max_mb=1.5)
            tokenizer = root / "tokenizer"
            train_tokenizer([str(root / "corpus" / "train" / "*.jsonl")], tokenizer, vocab_size=4096,
                            sample_bytes=1_500_000)
            for split in ("train", "eval"):
                prepare([str(root / "corpus" / split / "*.jsonl")], tokenizer, 128, root / split, progress=False)
            (root / "done").touch()
    tokenizer = root / "tokenizer"
    return [
        f"data.train=[{{path: {root / 'train'}}}]",
        f"data.eval={root / 'eval'}",
        f"data.tokenizer={tokenizer}",
        "data.seq_len=128",
    ]


@pytest.fixture
def mount_tmpfs(tmp_path):
    """`mount_tmpfs(size, read_only=False)` mounts a real tmpfs and returns its path; unmounted after the test.
    A real full or read-only file system, not a simulated one (permission bits alone do not stop root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(size: str, read_only: bool = False):
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)
