"""`pretrain tokenizer ...` and `pretrain data ...` as a user runs them: real subprocesses, exit codes, output."""

import ast
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]


def pretrain(*args, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "launch.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == expect, (result.returncode, result.stdout, result.stderr)
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, command: str, *parts: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pretrain {command}: error: "), result.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """corpus -> tokenizer train -> data prepare, through the command line; the outputs of each step."""
    root = tmp_path_factory.mktemp("cli")
    corpus = pretrain("data", "corpus", "--out", root / "corpus", "--max-mb", "0.3")
    train = pretrain("tokenizer", "train", "--input", root / "corpus" / "train" / "*.jsonl", "--vocab-size", 500,
                     "--out", root / "tok", "--sample-mb", 0.2)
    prepared = pretrain("data", "prepare", "--input", root / "corpus" / "train" / "*.jsonl", "--tokenizer",
                        root / "tok", "--seq-len", 64, "--out", root / "data", "--shard-mb", 0.05, "--workers", 2)
    return root, corpus, train, prepared


def test_corpus(made):
    root, corpus, _, _ = made
    for split in ("train", "eval"):
        lines = (root / "corpus" / split / "stdlib.jsonl").read_text().splitlines()
        assert lines and all(json.loads(line)["text"] for line in lines)
        assert f"{split}: {len(lines)} documents" in corpus.stdout
    texts = [json.loads(line)["text"] for line in (root / "corpus" / "train" / "stdlib.jsonl").open()]
    assert 0.25e6 < sum(len(t.encode()) for t in texts) <= 0.3e6  # --max-mb caps the train split


def test_tokenizer_train_prints_sha256_and_where(made):
    root, _, train, _ = made
    digest = hashlib.sha256((root / "tok" / "tokenizer.model").read_bytes()).hexdigest()
    assert f"sha256 {digest}" in train.stdout
    assert f"wrote {root / 'tok' / 'tokenizer.model'} (vocab 500)" in train.stdout


def test_tokenizer_show(made):
    root = made[0]
    shown = pretrain("tokenizer", "show", root / "tok" / "tokenizer.model", "--text", "x = 42  # ✓").stdout
    digest = hashlib.sha256((root / "tok" / "tokenizer.model").read_bytes()).hexdigest()
    for expected in ("vocab size  500", f"sha256      {digest}", "unk 0 '<unk>', bos 1 '<s>', eos 2 '</s>', pad none",
                     "'4', '2'", "round trip exact"):
        assert expected in shown, (expected, shown)


def test_prepare_shows_progress_and_writes_a_manifest(made):
    root, _, _, prepared = made
    assert "M tokens/s" in prepared.stderr and "done in" in prepared.stderr
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    assert manifest["seq_len"] == 64 and len(manifest["shards"]) > 1
    assert f"{manifest['samples']:,} samples of 65 tokens in {len(manifest['shards'])} shard(s)" in prepared.stdout


def test_inspect_verifies_and_decodes(made):
    root = made[0]
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    out = pretrain("data", "inspect", root / "data", "--samples", 2).stdout
    assert f"verified    {len(manifest['shards'])}/{len(manifest['shards'])} shards" in out
    assert "sample 0" in out and "sample 1" in out and "sample 2" not in out
    # Sample 0 is the first 65 tokens of the first document: decoded, the start of its text.
    first_document = json.loads((root / "corpus" / "train" / "stdlib.jsonl").open().readline())["text"]
    shown = ast.literal_eval(out.split("sample 0    ")[1].split("\n")[0].removesuffix(" ..."))
    assert len(shown) > 50 and first_document.startswith(shown)


def test_inspect_show_special_writes_out_bos(made):
    root = made[0]
    out = pretrain("data", "inspect", root / "data", "--samples", 1, "--chars", 10_000, "--show-special").stdout
    assert "(<s> and </s> written out)" in out
    shown = ast.literal_eval(out.split("sample 0    ")[1].split("\n")[0])
    first_document = json.loads((root / "corpus" / "train" / "stdlib.jsonl").open().readline())["text"]
    assert shown.startswith("<s>") and len(shown) > 50 and first_document.startswith(shown.removeprefix("<s>"))


def test_inspect_names_a_corrupt_shard_and_exits_2(made, tmp_path):
    root = made[0]
    shutil.copytree(root / "data", tmp_path / "data")
    shard = tmp_path / "data" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = pretrain("data", "inspect", tmp_path / "data", expect=2)
    assert f"FAILED      shard {shard} fails its sha256 check" in result.stdout
    assert_one_line_error(result, "data", "1 of", "shard-000001.tar", "re-run `pretrain data prepare`")


def test_bad_input_exits_2_with_one_line(made, tmp_path):
    root = made[0]
    (tmp_path / "notes.csv").write_text("text\nhello\n")
    result = pretrain("data", "prepare", "--input", tmp_path / "notes.csv", "--tokenizer", root / "tok",
                      "--seq-len", 64, "--out", tmp_path / "out", expect=2)
    assert_one_line_error(result, "data", str(tmp_path / "notes.csv"), ".txt, .jsonl or .parquet")
    (tmp_path / "garbage.model").write_bytes(b"garbage")
    result = pretrain("tokenizer", "show", tmp_path / "garbage.model", expect=2)
    assert_one_line_error(result, "tokenizer", "garbage.model", "not a sentencepiece model")
    result = pretrain("data", "inspect", tmp_path, expect=2)
    assert_one_line_error(result, "data", "manifest.json not found")


# ---------------------------------------------------------------- prepare's workers: a run that fails or is stopped

WORKERS = 2


@pytest.fixture(scope="module")
def long_input(made) -> Path:
    """About 40 MB of documents: seconds of work for the workers even on a fast machine, so that a stop signal sent
    within half a second of their start comes while they work."""
    root = made[0]
    path = root / "long.jsonl"
    path.write_text((root / "corpus" / "train" / "stdlib.jsonl").read_text() * 140)
    return path


@pytest.fixture(scope="module")
def bad_inputs(made) -> dict[str, tuple[Path, str]]:
    """Each bad input with the one line it must end on: an empty file, and a bad JSON line or a lone surrogate (valid
    JSON, not text) after 3 MB of documents (the parent reads it with chunks in flight)."""
    root = made[0]
    empty = root / "empty.jsonl"
    empty.write_text("")
    documents = (root / "corpus" / "train" / "stdlib.jsonl").read_text() * 10
    late = root / "late-bad-line.jsonl"
    late.write_text(documents + "{not json\n")
    line = len(late.read_text().splitlines())
    surrogate = root / "late-lone-surrogate.jsonl"
    surrogate.write_text(documents + '{"text": "a pair \\ud83d\\ude00 is text, half of one \\ud83d is not"}\n')
    return {
        "empty": (empty, f"pretrain data: error: inputs {empty} hold no documents (empty files or empty texts): pass "
                         "files with text in them"),
        "bad line": (late, f"pretrain data: error: {late}:{line} is not valid JSON (Expecting property name enclosed "
                           "in double quotes): fix or remove the line"),
        "lone surrogate": (surrogate, f'pretrain data: error: {surrogate}:{line} has a lone surrogate in "text" '
                                      "(\\ud83d at character 30, half of a UTF-16 surrogate pair): fix or remove the "
                                      "line"),
    }


def started_prepare(made, path: Path, out: Path) -> subprocess.Popen:
    """`pretrain data prepare` with two workers, in a process group of its own as a shell starts a command, and with
    Ctrl-C's default (a suite started in the background inherits SIGINT ignored, and Python keeps ignoring it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "data", "prepare", "--input", str(path), "--tokenizer",
         str(made[0] / "tok"), "--seq-len", "64", "--out", str(out), "--workers", str(WORKERS)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def stderr_once_ended(process: subprocess.Popen, within_s: float) -> str:
    """All that the run wrote to stderr, once it and its workers have ended, which they must within `within_s`."""
    try:
        stderr = process.communicate(timeout=within_s)[1]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"hung: still running {within_s:g} s on; stderr: {process.communicate()[1][-3000:]}") \
            from None
    with pytest.raises(ProcessLookupError):  # nothing left of the run's process group: every worker reaped
        os.killpg(process.pid, 0)
    return stderr


def only_line(stderr: str) -> str:
    """The one line of `stderr`, beside blank lines and progress lines (one every 10 s, if a run lasts that long)."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("prepare: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def workers_started(process: subprocess.Popen) -> list[int]:
    """The process ids of the run's workers, once it has them all."""
    deadline = time.monotonic() + 60
    while process.poll() is None and len(psutil.Process(process.pid).children()) < WORKERS:
        assert time.monotonic() < deadline, "no workers after 60 s"
        time.sleep(0.002)
    assert process.poll() is None, "prepare ended before its workers started"
    return [child.pid for child in psutil.Process(process.pid).children()]


@pytest.mark.parametrize("bad", ["empty", "bad line", "lone surrogate"])
def test_prepare_with_workers_fails_on_bad_input_with_its_one_line_and_nothing_else(made, bad_inputs, tmp_path, bad):
    path, error = bad_inputs[bad]
    process = started_prepare(made, path, tmp_path / "out")
    assert only_line(stderr_once_ended(process, 60)) == error
    assert process.returncode == 2 and list(tmp_path.iterdir()) == []


def test_text_that_utf8_cannot_carry_ends_prepare_on_its_one_line(made, bad_inputs, tmp_path):
    """A lone surrogate (JSON can write one, UTF-8 cannot encode it) ends prepare without workers (with them: above),
    prepare --chat (unless --skip-bad) and tokenizer train on its file:line, as a bad JSON line does; a Parquet string
    that is not UTF-8 ends prepare on its row. Each printed a traceback (UnicodeEncodeError, sentencepiece's
    RuntimeError, UnicodeDecodeError) and exited 1. Nothing is left beside the inputs."""
    root, inputs = made[0], tmp_path / "in"
    inputs.mkdir()
    surrogate, error = bad_inputs["lone surrogate"]
    result = pretrain("data", "prepare", "--input", surrogate, "--tokenizer", root / "tok", "--seq-len", 64,
                      "--out", tmp_path / "out", "--workers", 1, expect=2)
    assert only_line(result.stderr) == error
    result = pretrain("tokenizer", "train", "--input", surrogate, "--vocab-size", 500, "--out", tmp_path / "tok",
                      expect=2)
    assert result.stderr.splitlines()[1:] == [error.replace("pretrain data", "pretrain tokenizer")], result.stderr

    chat = inputs / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "Hi \\ud800"}, {"role": "assistant", "content": '
                    '"Hello"}]}\n')
    result = pretrain("data", "prepare", "--chat", "--input", chat, "--tokenizer", root / "tok", "--seq-len", 64,
                      "--out", tmp_path / "out", expect=2)
    assert_one_line_error(result, "data", f'{chat}:1: has a lone surrogate in messages[0]["content"] (\\ud800 at '
                                          "character 3", "--skip-bad")

    table = inputs / "text.parquet"
    pq.write_table(pa.table({"text": pa.array([b"some text", b"caf\xe9"], pa.binary()).view(pa.string())}), table)
    result = pretrain("data", "prepare", "--input", table, "--tokenizer", root / "tok", "--seq-len", 64, "--out",
                      tmp_path / "out", "--workers", 2, expect=2)
    assert_one_line_error(result, "data", f"{table} row 1 (counting from 0) is not UTF-8 (byte 3 of its text: "
                                          "b'\\xe9')", "re-export")
    assert list(tmp_path.iterdir()) == [inputs]


def test_prepare_stopped_or_failing_under_load_ends_at_once_with_its_one_line(made, long_input, bad_inputs, tmp_path):
    """24 runs beside a process that keeps a core busy: stopped at a random moment once their workers exist (Ctrl-C
    to the process group, SIGTERM to the command or, as Slurm sends it, to its group), a worker killed (as the
    out-of-memory killer does), or failing on bad input. Each ends within the bound on its one line, and leaves
    nothing in --out and no worker behind. (multiprocessing.Pool's workers ran the command's stop handlers and
    printed tracebacks, and a run could hang for ever in the pool's shutdown, or on a killed worker's lost task.)"""
    stopped = {signal.SIGINT: (128 + signal.SIGINT, "pretrain data: interrupted"),
               signal.SIGTERM: (128 + signal.SIGTERM, "pretrain data: terminated (SIGTERM)")}
    runs = [(signal.SIGINT, "its group"), (signal.SIGTERM, "it"), (signal.SIGTERM, "its group"),
            (signal.SIGKILL, "a worker"), "empty", "bad line"] * 4
    moments = random.Random(47)
    busy_core = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for i, run in enumerate(runs):
            out = tmp_path / f"out{i}"
            if run in bad_inputs:
                path, error = bad_inputs[run]
                process = started_prepare(made, path, out)
                stderr, expected = stderr_once_ended(process, 60), (2, error)
            else:
                sig, whom = run
                process = started_prepare(made, long_input, out)
                worker = workers_started(process)[0]
                time.sleep(moments.uniform(0, 0.5))
                if whom == "a worker":
                    os.kill(worker, sig)
                    expected = (2, f"pretrain data: error: tokenizing process {worker} ended mid-run with exit code -9 "
                                   "(-9: killed, as by the out-of-memory killer): run again with fewer --workers")
                else:
                    (os.killpg if whom == "its group" else os.kill)(process.pid, sig)
                    expected = stopped[sig]
                stderr = stderr_once_ended(process, 20)
            assert (process.returncode, only_line(stderr)) == expected, (i, run, stderr)
            assert list(tmp_path.iterdir()) == [], (i, run)
    finally:
        busy_core.kill()
        busy_core.wait()
