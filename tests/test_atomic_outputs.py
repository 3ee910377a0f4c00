"""Whatever stops a command that writes a dataset, a tokenizer, a corpus or an export (bad input, SIGKILL, a full
disk, Ctrl-C), what was there before stays byte for byte and readable, and nothing half-written carries its name
(durable.atomic_directory). The commands run as users type them, in their own processes; the disks are real tmpfs
mounts and the kills real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from data_pipeline.loader import TokenLoader, read_manifest
from data_pipeline.prepare import prepare, prepare_chat
from data_pipeline.tokenizer import Tokenizer
from durable import atomic_directory, clear_leftovers
from tests.data_helpers import make_tokenizer, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def pretrain(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def started(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launch.cli", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `path` (hidden ones too) with its bytes and mode."""
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mode) for p in sorted(path.rglob("*"))
            if p.is_file()}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for word in words:
        assert word in result.stderr, result.stderr


def kill_when(process: subprocess.Popen, ready, timeout_s: float = 120) -> None:
    """SIGKILL `process` as soon as `ready()` holds (it must not finish first)."""
    deadline = time.monotonic() + timeout_s
    try:
        while not ready():
            assert process.poll() is None, "the command finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        process.kill()


def being_written(out: Path, pattern: str) -> bool:
    """A file matching `pattern` exists in a temporary directory beside `out`."""
    return any(any(tmp.glob(pattern)) for tmp in out.parent.glob(f".{out.name}.tmp-*"))


def fill(mount: Path, leave_bytes: int) -> None:
    """Take the free space of the file system at `mount` down to about `leave_bytes`."""
    stats = os.statvfs(mount)
    (mount / "filler").write_bytes(b"\0" * max(stats.f_bavail * stats.f_frsize - leave_bytes, 0))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The built-in corpus (0.4 MB) and a tokenizer of 1000 pieces."""
    root = tmp_path_factory.mktemp("atomic")
    make_tokenizer(root)
    return root


def corpus(root: Path) -> str:
    return str(root / "corpus" / "train" / "*.jsonl")


def small_input(path: Path) -> Path:
    return write_jsonl(path, [f"a short document number {i}, with a few words in it." for i in range(40)])


def assert_dataset_intact(out: Path, before: dict) -> None:
    assert snapshot(out) == before
    assert leftovers(out) == [] or all(name.startswith(f".{out.name}.tmp-") for name in leftovers(out))
    read_manifest(str(out))
    TokenLoader([(str(out), 1.0)], micro_batch=1)


# ------------------------------------------------------------------------------------------ prepare


def test_a_bad_line_late_in_the_input_leaves_the_dataset_in_out_as_it_was(root, tmp_path):
    out = tmp_path / "data"
    prepare([str(small_input(tmp_path / "small.jsonl"))], root / "tokenizer", 8, out, progress=False)
    before = snapshot(out)
    late = write_jsonl(tmp_path / "zz.jsonl", ["fine"])  # sorts after the corpus: its shards are written first
    with open(late, "a") as f:
        f.write('{"txt": "no text field"}\n')
    result = pretrain("data", "prepare", "--input", corpus(root), late, "--tokenizer", root / "tokenizer",
                      "--seq-len", 8, "--out", out, "--shard-mb", 0.01, "--workers", 1)
    one_line_error(result, "zz.jsonl:2")
    assert_dataset_intact(out, before)
    assert leftovers(out) == []


def test_a_bad_chat_line_leaves_the_chat_dataset_in_out_as_it_was(root, tmp_path):
    conversation = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(conversation) + "\n")
    out = tmp_path / "chat"
    prepare_chat([str(good)], root / "tokenizer", 64, out, progress=False)
    before = snapshot(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(conversation) + "\n" + '{"messages": [{"role": "tool", "content": "x"}]}\n')
    result = pretrain("data", "prepare", "--chat", "--input", bad, "--tokenizer", root / "tokenizer", "--seq-len", 64,
                      "--out", out)
    one_line_error(result, "bad.jsonl:2")
    assert_dataset_intact(out, before)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_a_killed_or_interrupted_prepare_leaves_the_dataset(root, tmp_path, sig):
    out = tmp_path / "data"
    prepare([str(small_input(tmp_path / "small.jsonl"))], root / "tokenizer", 8, out, progress=False)
    before = snapshot(out)
    process = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "data", "prepare", "--input", corpus(root), "--tokenizer",
         str(root / "tokenizer"), "--seq-len", "8", "--out", str(out), "--shard-mb", "0.001", "--workers", "1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # Ctrl-C's default: a shell starts background commands with SIGINT ignored, which they inherit (and
        # Python then keeps ignoring it), so a suite started with `&` would otherwise signal a deaf process.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not being_written(out, "shard-000003.tar"):
        assert process.poll() is None and time.monotonic() < deadline, "prepare finished before the signal"
        time.sleep(0.005)
    process.send_signal(sig)
    try:
        stderr = process.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:  # killed, so that it does not outlive the test (later tests count children)
        process.kill()
        raise AssertionError(f"prepare still ran 60 s after {sig!r}; stderr: {process.communicate()[1][-3000:]}") \
            from None
    assert_dataset_intact(out, before)
    if sig != signal.SIGKILL:  # Ctrl-C, or Slurm's time limit: one line, the temporary directory removed on the way out
        last = {signal.SIGINT: "pretrain data: interrupted", signal.SIGTERM: "pretrain data: terminated (SIGTERM)"}
        assert process.returncode == 128 + sig and stderr.strip().splitlines()[-1] == last[sig], stderr
        assert "Traceback" not in stderr and leftovers(out) == []
        return
    assert len(leftovers(out)) == 1  # the killed run's temporary directory, hidden, holding no manifest
    result = pretrain("data", "prepare", "--input", corpus(root), "--tokenizer", root / "tokenizer", "--seq-len", 64,
                      "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert leftovers(out) == [] and read_manifest(str(out))["seq_len"] == 64


def test_a_full_disk_during_prepare_is_one_line_and_leaves_the_dataset(root, tmp_path, mount_tmpfs):
    disk = mount_tmpfs("4m")
    out = disk / "data"
    prepare([str(small_input(tmp_path / "small.jsonl"))], root / "tokenizer", 8, out, progress=False)
    before = snapshot(out)
    fill(disk, 256 << 10)
    result = pretrain("data", "prepare", "--input", corpus(root), "--tokenizer", root / "tokenizer", "--seq-len", 8,
                      "--out", out, "--workers", 1)
    one_line_error(result, f"no space left to write {out}", "free space", "the previous content (if any) is unchanged")
    assert_dataset_intact(out, before)
    assert leftovers(out) == []


def test_prepare_never_replaces_a_directory_that_is_not_a_dataset(root, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not a dataset")
    (out / "shard-000000.tar").write_bytes(b"")
    result = pretrain("data", "prepare", "--input", small_input(tmp_path / "small.jsonl"), "--tokenizer",
                      root / "tokenizer", "--seq-len", 8, "--out", out)
    one_line_error(result, f"{out} holds 'notes.txt', which is not part of a prepared dataset", "choose a new or empty")
    assert snapshot(out) == {"notes.txt": ((out / "notes.txt").read_bytes(), (out / "notes.txt").stat().st_mode),
                             "shard-000000.tar": (b"", (out / "shard-000000.tar").stat().st_mode)}
    assert leftovers(out) == []


# ------------------------------------------------------------------------------------------ tokenizer, corpus


def test_tokenizer_train_over_a_tokenizer_keeps_it_on_bad_input_and_a_full_disk(root, tmp_path, mount_tmpfs):
    disk = mount_tmpfs("4m")
    out = disk / "tokenizer"
    shutil.copytree(root / "tokenizer", out)
    before = snapshot(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    one_line_error(pretrain("tokenizer", "train", "--input", bad, "--vocab-size", 300, "--out", out), "bad.jsonl:2")
    assert snapshot(out) == before and leftovers(out) == []
    fill(disk, 16 << 10)  # less than a tokenizer of 2000 pieces
    result = pretrain("tokenizer", "train", "--input", corpus(root), "--vocab-size", 2000, "--out", out)
    one_line_error(result, "no space left to write")
    assert snapshot(out) == before and leftovers(out) == []
    assert Tokenizer.load(out).vocab_size == 1000


def test_corpus_is_replaced_whole_or_not_at_all(tmp_path, mount_tmpfs):
    disk = mount_tmpfs("2m")
    out = disk / "corpus"
    result = pretrain("data", "corpus", "--out", out, "--max-mb", 0.2)
    assert result.returncode == 0, result.stderr
    before = snapshot(out)
    fill(disk, 64 << 10)
    one_line_error(pretrain("data", "corpus", "--out", out, "--max-mb", 1), "no space left to write")
    assert snapshot(out) == before and leftovers(out) == []
    (disk / "filler").unlink()
    (out / "mine.txt").write_text("kept")
    one_line_error(pretrain("data", "instruct", "--out", out), "holds 'mine.txt', which is not part of a corpus")


# ------------------------------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def run(root, tmp_path_factory) -> Path:
    """A random model of this tokenizer's vocabulary, imported as a run directory (its step-0 checkpoint)."""
    from transformers import MistralConfig, MistralForCausalLM

    where = tmp_path_factory.mktemp("run")
    MistralForCausalLM(MistralConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=32, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)).save_pretrained(where / "hf")
    shutil.copyfile(root / "tokenizer" / "tokenizer.model", where / "hf" / "tokenizer.model")
    result = pretrain("import", where / "hf", "--out", where / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    return where / "run"


def test_exported_files_are_readable_as_the_other_files_are(run, tmp_path):
    out = tmp_path / "export"
    assert pretrain("export", run, "--out", out).returncode == 0
    modes = {name: mode & 0o777 for name, (_, mode) in snapshot(out).items()}
    assert set(modes.values()) == {0o666 & ~_umask()}, modes
    assert any(name.endswith(".safetensors") for name in modes)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_export_force_keeps_the_previous_export_when_killed_or_the_disk_fills(run, tmp_path, mount_tmpfs):
    disk = mount_tmpfs("16m")
    out = disk / "export"
    assert pretrain("export", run, "--out", out).returncode == 0
    before = snapshot(out)
    one_line_error(pretrain("export", run, "--out", out), "exists and is not empty", "--force")
    process = started("export", run, "--out", out, "--force", "--dtype", "bfloat16")
    kill_when(process, lambda: being_written(out, "*.safetensors"))
    assert snapshot(out) == before
    fill(disk, 128 << 10)
    result = pretrain("export", run, "--out", out, "--force", "--format", "mistral")
    one_line_error(result, f"no space left to write {out}")
    assert snapshot(out) == before and leftovers(out) == []  # the killed export's leftover went too
    (disk / "filler").unlink()
    assert pretrain("export", run, "--out", out, "--force", "--format", "mistral").returncode == 0
    assert (out / "consolidated.safetensors").is_file() and leftovers(out) == []


# ------------------------------------------------------------------------------------------ the mechanism


def test_ctrl_c_inside_leaves_the_previous_output_and_nothing_beside_it(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_directory(out) as tmp:
        (tmp / "config.json").write_text("new")
        raise KeyboardInterrupt
    assert snapshot(out) == {"config.json": (b"old", (out / "config.json").stat().st_mode)}
    assert leftovers(out) == []


class Stopped(Exception):
    """What the stop-signal handler of the next test raises, as `pretrain`'s raises Terminated on SIGTERM."""


def test_a_stop_signal_as_the_temporary_directory_is_made_leaves_nothing(tmp_path, monkeypatch):
    """A real SIGTERM, sent as the temporary directory's mkdir returns: its handler raises there (a run signalled
    just after it started), which once left the new, empty directory behind."""
    out = tmp_path / "data"
    make_directory = Path.mkdir

    def mkdir_then_signal(self, *args, **kwargs):
        make_directory(self, *args, **kwargs)
        if self.name.startswith(f".{out.name}.tmp-"):
            os.kill(os.getpid(), signal.SIGTERM)

    def stop(signum, frame):
        raise Stopped

    monkeypatch.setattr(Path, "mkdir", mkdir_then_signal)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stopped), atomic_directory(out):
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == []


KILLED_CHILD = """
import os, signal, sys
from pathlib import Path
import durable

out = Path(sys.argv[1])
if sys.argv[2] == "between-renames":  # a file system without RENAME_EXCHANGE, killed between its two renames
    durable.output._exchange = lambda a, b: False
    rename = Path.rename
    def rename_then_die(self, target):
        rename(self, target)
        if Path(target).name.startswith(f".{out.name}.old-"):
            os.kill(os.getpid(), signal.SIGKILL)
    Path.rename = rename_then_die
with durable.atomic_directory(out) as tmp:
    (tmp / "data").write_text("new")
    if sys.argv[2] == "inside":
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("when", ["inside", "between-renames"])
def test_a_process_killed_at_any_point_leaves_the_previous_output(tmp_path, when):
    out = tmp_path / "out"
    out.mkdir()
    (out / "data").write_text("old")
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_CHILD), str(out), when], cwd=ROOT)
    assert child.returncode == -signal.SIGKILL
    if when == "between-renames":
        assert not out.exists() and len(leftovers(out)) == 2  # the old output set aside, the new one complete
    cleared = clear_leftovers(out)  # what the next write of `out` does first
    assert (out / "data").read_text() == "old" and leftovers(out) == [], cleared
    with atomic_directory(out) as tmp:
        (tmp / "data").write_text("newer")
    assert (out / "data").read_text() == "newer" and leftovers(out) == []


# A writer on a host of its own: its own host name (UTS namespace) and its own process ids (PID namespace), where it
# is process 1 as every such writer is, over the same directory, as two nodes over a shared file system. Writing
# "inside", it waits in the middle of its write until `go` exists beside `out`.
ON_ANOTHER_HOST = """
import socket, sys, time
from pathlib import Path

socket.sethostname(sys.argv[1])
import durable

out = Path(sys.argv[2])
with durable.atomic_directory(out) as tmp:
    (tmp / "data").write_text(sys.argv[1])
    if sys.argv[3] == "inside":
        (out.parent / "ready").write_text(tmp.name)
        while not (out.parent / "go").exists():
            time.sleep(0.01)
"""


def on_host(host: str, out: Path, wait_inside: bool = False) -> list[str]:
    # --kill-child: the writer dies with the unshare process that the test holds
    return ["unshare", "--uts", "--pid", "--fork", "--kill-child", sys.executable, "-c", ON_ANOTHER_HOST, host,
            str(out), "inside" if wait_inside else "to-the-end"]


def writing_on_host(host: str, out: Path) -> tuple[subprocess.Popen, Path]:
    """A writer of `out` on `host`, stopped in the middle of its write, and its temporary directory."""
    writer = subprocess.Popen(on_host(host, out, wait_inside=True), cwd=ROOT)
    deadline = time.monotonic() + 60
    while not (out.parent / "ready").exists():
        assert writer.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    return writer, out.parent / (out.parent / "ready").read_text()


@pytest.fixture
def hosts():
    """Skips unless this process may make UTS and PID namespaces (root, and a kernel that allows them)."""
    if os.geteuid() != 0 or subprocess.run(["unshare", "--uts", "--pid", "--fork", "true"]).returncode != 0:
        pytest.skip("hosts of their own need UTS and PID namespaces (root)")


def test_writers_on_two_hosts_never_remove_each_others_work(tmp_path, hosts):
    """Process 1 of node-b writes `out` while process 1 of node-a is writing it: each keeps its own temporary
    directory (a pid alone named both the same, and node-b removed node-a's as its own leftover), and the last to
    finish holds `out`."""
    out = tmp_path / "out"
    a, a_tmp = writing_on_host("node-a", out)
    try:
        assert subprocess.run(on_host("node-b", out), cwd=ROOT, timeout=60).returncode == 0
        assert (out / "data").read_text() == "node-b"
        assert (a_tmp / "data").read_text() == "node-a"
        (tmp_path / "go").touch()
        assert a.wait(timeout=60) == 0
    finally:
        a.kill()
    assert (out / "data").read_text() == "node-a" and leftovers(out) == []


def test_leftovers_of_another_host_are_left_to_it(tmp_path, hosts):
    """A writer of node-a killed inside: this host cannot tell whether it still runs, so its temporary directory is
    left alone (and named) when this host writes `out`; node-a's next write removes it."""
    out = tmp_path / "out"
    a, a_tmp = writing_on_host("node-a", out)
    a.kill()
    a.wait()
    assert any(a_tmp.name in line and "node-a" in line for line in clear_leftovers(out))
    with atomic_directory(out) as tmp:
        (tmp / "data").write_text("here")
    assert leftovers(out) == [a_tmp.name]
    assert subprocess.run(on_host("node-a", out), cwd=ROOT, timeout=60).returncode == 0
    assert (out / "data").read_text() == "node-a" and leftovers(out) == []
