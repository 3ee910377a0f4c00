"""Bad data: each case raises DataError with one line naming the file and the fix; skip_corrupt_shards skips
and counts."""

import json
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.errors import DataError
from data_pipeline.loader import TokenLoader
from data_pipeline.prepare import prepare
from data_pipeline.tokenizer import Tokenizer, train_tokenizer
from tests.data_helpers import make_dataset, make_tokenizer, tar_samples, write_jsonl


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A tokenizer and a finished dataset of ~10 shards, to copy and damage."""
    root = tmp_path_factory.mktemp("errors")
    tokenizer = make_tokenizer(root, max_mb=0.1)
    dataset = make_dataset(root / "data", [str(root / "corpus" / "train" / "*.jsonl")], tokenizer, shard_mb=0.1)
    assert len(json.loads((dataset / "manifest.json").read_text())["shards"]) > 5
    return tokenizer, dataset


def one_line(error: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)


def damaged_copy(good, tmp_path, damage) -> tuple[str, str]:
    """A copy of the dataset with shard-000003.tar damaged by `damage(path)`."""
    copy = tmp_path / "copy"
    shutil.copytree(good[1], copy)
    damage(copy / "shard-000003.tar")
    return str(copy), str(copy / "shard-000003.tar")


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01  # inside a sample's tokens: only the checksum can tell
    path.write_bytes(bytes(data))


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:-3000])


def read_epoch(loader: TokenLoader, samples: int) -> list[bytes]:
    rows = []
    for batch in loader:
        rows += [row.numpy().tobytes() for row in batch["tokens"]]
        if len(rows) >= samples:
            return rows[:samples]


# ---------------------------------------------------------------- reading prepared data


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError) as error:
        TokenLoader([(str(tmp_path), 1.0)], micro_batch=1)
    one_line(error, str(tmp_path / "manifest.json"), "not found", "run prepare again")


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_shard_fails_its_checksum(good, tmp_path, workers):
    # Children this process had before (multiprocessing's resource tracker, once an earlier test spawned processes).
    before = set(psutil.Process().children())
    copy, shard = damaged_copy(good, tmp_path, flip_a_byte)
    with pytest.raises(DataError) as error:
        read_epoch(TokenLoader([(copy, 1.0)], micro_batch=4, num_workers=workers), 10_000)
    one_line(error, shard, "sha256", "re-copy or re-prepare", "skip_corrupt_shards")
    # The error ended the data workers: they ignore stop signals, and would keep this process from exiting.
    assert set(psutil.Process().children()) - before == set()


def test_a_process_with_unclosed_batches_exits(good):
    """Batches still open and referenced at exit (as DeepSpeed's pipeline engine keeps them) do not hold the process:
    multiprocessing's exit handler would SIGTERM their workers, which ignore it, and join them forever."""
    script = textwrap.dedent(f"""
        from data_pipeline.loader import TokenLoader
        batches = iter(TokenLoader([({str(good[1])!r}, 1.0)], micro_batch=4, num_workers=2))
        next(batches)
        print("read a batch", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and "read a batch" in done.stdout, done.stderr[-2000:]


def test_truncated_shard(good, tmp_path):
    copy, shard = damaged_copy(good, tmp_path, truncate)
    with pytest.raises(DataError) as error:
        read_epoch(TokenLoader([(copy, 1.0)], micro_batch=4), 10_000)
    one_line(error, shard, "truncated", "re-copy or re-prepare")


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_corrupt_shards_skips_and_counts(good, tmp_path, workers):
    copy, shard = damaged_copy(good, tmp_path, flip_a_byte)
    manifest = json.loads((good[1] / "manifest.json").read_text())
    lost = Counter(s.astype(np.int64).tobytes() for s in tar_samples(good[1])[sum(
        s["samples"] for s in manifest["shards"][:3]):][:manifest["shards"][3]["samples"]])
    kept = Counter(s.astype(np.int64).tobytes() for s in tar_samples(good[1])) - lost
    loader = TokenLoader([(copy, 1.0)], micro_batch=4, num_workers=workers, skip_corrupt_shards=True)
    rows = read_epoch(loader, sum(kept.values()))
    assert Counter(rows) == kept
    assert loader.stats()["corrupt_shards_skipped"] == 1 and loader.stats()["skipped_shards"] == [shard]


def test_vocab_mismatch(good):
    with pytest.raises(DataError) as error:
        TokenLoader([(str(good[1]), 1.0)], micro_batch=1, vocab_size=32000)
    one_line(error, str(good[1]), "vocab_size 1000", "32000", "re-run `pretrain data prepare`")


def test_tokenizer_mismatch(good, tmp_path):
    other = train_tokenizer([str(good[0].parent / "corpus" / "train" / "*.jsonl")], tmp_path / "other",
                            vocab_size=900)
    with pytest.raises(DataError) as error:
        TokenLoader([(str(good[1]), 1.0)], micro_batch=1, tokenizer_sha256=other.sha256)
    one_line(error, str(good[1]), other.sha256[:12], "re-run `pretrain data prepare --tokenizer`")


def test_resume_refuses_other_data(good, tmp_path):
    loader = TokenLoader([(str(good[1]), 1.0)], micro_batch=1)
    state = loader.state_dict()
    prepare([str(good[0].parent / "corpus" / "train" / "*.jsonl")], good[0], 16, tmp_path / "other",
            workers=1, progress=False)
    with pytest.raises(DataError) as error:
        TokenLoader([(str(tmp_path / "other"), 1.0)], micro_batch=1).load_state_dict(state)
    one_line(error, str(good[1]), str(tmp_path / "other"), "resume with the same prepared data")
    # The same data elsewhere is the same data.
    shutil.copytree(good[1], tmp_path / "moved")
    TokenLoader([(str(tmp_path / "moved"), 1.0)], micro_batch=1).load_state_dict(state)


# ---------------------------------------------------------------- preparing data


def prepare_error(tmp_path, good, *inputs: str) -> pytest.ExceptionInfo:
    with pytest.raises(DataError) as error:
        prepare(list(inputs), good[0], 16, tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    return error


def test_non_utf8_text(good, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    one_line(prepare_error(tmp_path, good, str(tmp_path / "latin1.txt")), "latin1.txt", "not UTF-8", "iconv")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    one_line(prepare_error(tmp_path, good, str(tmp_path / "bad.jsonl")), "bad.jsonl:2", "not UTF-8", "re-encode")


def test_chat_line_not_utf8_names_the_byte(good, tmp_path):
    from data_pipeline.prepare import prepare_chat

    line = '{"messages": [{"role": "user", "content": "café"}]}\n'.encode("latin-1")
    (tmp_path / "chat.jsonl").write_bytes(line)
    with pytest.raises(DataError) as error:
        prepare_chat([str(tmp_path / "chat.jsonl")], good[0], 16, tmp_path / "out", progress=False)
    one_line(error, "chat.jsonl:1", f"not UTF-8 (byte {line.index(0xE9)}: b'\\xe9')", "iconv", "--skip-bad")


def test_lone_surrogate_in_jsonl(good, tmp_path):
    """Valid JSON, but no text: UTF-8 cannot encode half of a surrogate pair (the encode and sentencepiece raised)."""
    (tmp_path / "a.jsonl").write_text('{"text": "a pair \\ud83d\\ude00 and an escaped \\\\ud800 are fine"}\n'
                                      '{"text": "fine"}\n{"text": "abc \\ud800 def"}\n')
    one_line(prepare_error(tmp_path, good, str(tmp_path / "a.jsonl")), "a.jsonl:3", 'lone surrogate in "text"',
             "\\ud800 at character 4", "fix or remove the line")
    with pytest.raises(DataError) as error:
        train_tokenizer([str(tmp_path / "a.jsonl")], tmp_path / "tok", vocab_size=300)
    one_line(error, "a.jsonl:3", "lone surrogate")
    (tmp_path / "a.jsonl").write_text('{"text": "a pair \\ud83d\\ude00 and an escaped \\\\ud800 are fine"}\n' * 40)
    prepare([str(tmp_path / "a.jsonl")], good[0], 16, tmp_path / "out", workers=1, progress=False)


def test_chat_line_with_lone_surrogate(good, tmp_path):
    from data_pipeline.prepare import prepare_chat

    answer = {"role": "assistant", "content": "Hello there, how can I help you today with your code?"}
    lines = [{"messages": [{"role": "user", "content": "Hi \ud83d"}, answer]},
             {"messages": [{"role": "user", "content": "Hi \U0001f600"}, answer]}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(DataError) as error:
        prepare_chat([str(tmp_path / "chat.jsonl")], good[0], 64, tmp_path / "out", progress=False)
    one_line(error, "chat.jsonl:1", 'lone surrogate in messages[0]["content"]', "\\ud83d at character 3",
             "--skip-bad")
    manifest = prepare_chat([str(tmp_path / "chat.jsonl")], good[0], 64, tmp_path / "out", skip_bad=True,
                            progress=False)
    assert manifest["bad_lines"] == 1 and manifest["documents"] == 1


def test_parquet_text_not_utf8(good, tmp_path):
    """pyarrow reads a string column without checking it; its strings are then decoded, and one that is not UTF-8
    raised UnicodeDecodeError. The error names the row, past the first batch of 1024."""
    texts = [b"some text"] * 1500
    texts[1300] = b"caf\xe9"
    pq.write_table(pa.table({"text": pa.array(texts, pa.binary()).view(pa.string())}), tmp_path / "a.parquet")
    one_line(prepare_error(tmp_path, good, str(tmp_path / "a.parquet")), "a.parquet row 1300 (counting from 0)",
             "not UTF-8 (byte 3 of its text: b'\\xe9')", "re-export")


def test_plain_prepare_of_chat_data_suggests_chat(good, tmp_path):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": conversation}) + "\n")
    one_line(prepare_error(tmp_path, good, str(tmp_path / "chat.jsonl")), "chat.jsonl:1", "is a conversation",
             "prepare chat data with --chat")


def test_jsonl_line_without_text(good, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n\n{"content": "elsewhere"}\n')
    one_line(prepare_error(tmp_path, good, str(tmp_path / "a.jsonl")), "a.jsonl:3", '"text"', "each line needs")
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\nnot json\n')
    one_line(prepare_error(tmp_path, good, str(tmp_path / "b.jsonl")), "b.jsonl:2", "not valid JSON", "fix or remove")


def test_parquet_without_a_text_column(good, tmp_path):
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "a.parquet")
    one_line(prepare_error(tmp_path, good, str(tmp_path / "a.parquet")), "a.parquet", "no 'text' column", "rename")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "b.parquet")
    one_line(prepare_error(tmp_path, good, str(tmp_path / "b.parquet")), "b.parquet", "not strings")
    (tmp_path / "c.parquet").write_bytes(b"not parquet at all")
    one_line(prepare_error(tmp_path, good, str(tmp_path / "c.parquet")), "c.parquet", "not a readable Parquet")


def test_empty_input(good, tmp_path):
    write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    (tmp_path / "empty.txt").write_text("")
    error = prepare_error(tmp_path, good, str(tmp_path / "empty.*"))
    one_line(error, "empty.jsonl", "empty.txt", "hold no documents", "pass files with text")
    (tmp_path / "tiny").mkdir()
    write_jsonl(tmp_path / "tiny" / "one.jsonl", ["hi"])
    one_line(prepare_error(tmp_path, good, str(tmp_path / "tiny" / "one.jsonl")), "one.jsonl",
             "fewer than one sample", "lower --seq-len")
    one_line(prepare_error(tmp_path, good, str(tmp_path / "nothing-*.jsonl")), "nothing-*.jsonl", "matches no file")
    with pytest.raises(DataError) as error:
        train_tokenizer([str(tmp_path / "empty.*")], tmp_path / "tok", vocab_size=300)
    one_line(error, "empty.jsonl", "no text to train on")


def test_unknown_file_type(good, tmp_path):
    (tmp_path / "table.csv").write_text("text\nhello\n")
    one_line(prepare_error(tmp_path, good, str(tmp_path / "*")), "table.csv", "unsupported type",
             ".txt, .jsonl or .parquet")
    one_line(prepare_error(tmp_path, good, str(tmp_path)), str(tmp_path), "is a directory", "/*.jsonl")


def test_unusable_tokenizer(good, tmp_path):
    with pytest.raises(DataError) as error:
        Tokenizer.load(tmp_path / "missing")
    one_line(error, "missing", "not found", "pretrain tokenizer train")
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(DataError) as error:
        Tokenizer.load(tmp_path)
    one_line(error, str(tmp_path / "tokenizer.model"), "not a sentencepiece model")
