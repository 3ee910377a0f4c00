"""`pretrain tokenizer ...` and `pretrain data ...` as a user runs them: real subprocesses, exit codes, output."""

import ast
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

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
