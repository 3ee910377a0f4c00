"""`prepare`: the exact packed token stream from JSONL, .txt and Parquet, byte-identical re-runs (also across
worker counts), the manifest, atomicity when a run fails or is killed, and --keep-documents."""

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_pipeline.prepare as prepare_module
from data_pipeline.loader import read_manifest
from data_pipeline.prepare import MANIFEST, prepare
from data_pipeline.tokenizer import Tokenizer
from tests.data_helpers import make_dataset, make_tokenizer, tar_samples, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 32


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("prepare"))


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory, tokenizer):
    """Three files of three types; sorted, they are read a.jsonl, b.txt, c.parquet."""
    corpus = [json.loads(line)["text"] for line in (tokenizer.parent / "corpus" / "train" / "stdlib.jsonl").open()]
    root = tmp_path_factory.mktemp("inputs")
    write_jsonl(root / "a.jsonl", corpus[:3] + ["", "short one"])
    (root / "b.txt").write_text(corpus[3])
    pq.write_table(pa.table({"text": corpus[4:7] + [None], "id": [4, 5, 6, 7]}), root / "c.parquet")
    documents = corpus[:3] + ["short one", corpus[3]] + corpus[4:7]  # empty texts and nulls are skipped
    return root, documents


def expected_stream(tokenizer_dir: Path, documents: list[str]) -> np.ndarray:
    tok = Tokenizer.load(tokenizer_dir)
    return np.concatenate([tok.encode(d, bos=True, eos=True) for d in documents])


def test_packs_jsonl_txt_and_parquet_in_order(tmp_path, tokenizer, mixed_inputs):
    inputs, documents = mixed_inputs
    manifest = make_dataset(tmp_path / "out", [str(inputs / "*")], tokenizer, seq_len=SEQ_LEN)
    manifest = read_manifest(str(tmp_path / "out"))
    stream = expected_stream(tokenizer, documents)
    whole = len(stream) // (SEQ_LEN + 1) * (SEQ_LEN + 1)
    samples = tar_samples(tmp_path / "out")
    assert np.array_equal(np.concatenate(samples), stream[:whole])
    assert all(len(s) == SEQ_LEN + 1 for s in samples)

    tok = Tokenizer.load(tokenizer)
    assert manifest["documents"] == len(documents) and manifest["tokens"] == len(stream)
    assert manifest["samples"] == len(samples) and manifest["dropped_tokens"] == len(stream) - whole
    assert (manifest["seq_len"], manifest["sample_tokens"], manifest["dtype"]) == (SEQ_LEN, SEQ_LEN + 1, "uint16")
    assert (manifest["vocab_size"], manifest["tokenizer_sha256"]) == (tok.vocab_size, tok.sha256)
    assert (manifest["bos_id"], manifest["eos_id"], manifest["keep_documents"]) == (1, 2, False)
    assert [s["path"] for s in manifest["sources"]] == [str(inputs / n) for n in ("a.jsonl", "b.txt", "c.parquet")]
    assert [s["bytes"] for s in manifest["sources"]] == [os.path.getsize(s["path"]) for s in manifest["sources"]]
    assert len(manifest["shards"]) > 3
    for i, shard in enumerate(manifest["shards"]):
        path = tmp_path / "out" / shard["name"]
        assert shard["name"] == f"shard-{i:06d}.tar"
        assert shard["bytes"] == path.stat().st_size
        assert shard["tokens"] == shard["samples"] * (SEQ_LEN + 1)
        assert shard["sha256"] == prepare_module.sha256_file(path)
        # A shard closes before a sample would take it over --shard-mb (members are 512-byte blocks).
        assert shard["samples"] * 1024 <= 0.01e6
    assert sum(s["samples"] for s in manifest["shards"]) == manifest["samples"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [MANIFEST] + [s["name"] for s in manifest["shards"]])


def test_reruns_are_byte_identical_whatever_the_worker_count(tmp_path, tokenizer, monkeypatch):
    # Small chunks so that two workers really split the input (about 25 chunks) and finish out of order.
    monkeypatch.setattr(prepare_module, "_CHUNK_BYTES", 16_000)
    inputs = [str(tokenizer.parent / "corpus" / "train" / "*.jsonl")]
    runs = [("one", 1), ("two", 2), ("two-again", 2)]
    for name, workers in runs:
        prepare(inputs, tokenizer, SEQ_LEN, tmp_path / name, shard_mb=0.2, workers=workers, progress=False)
    files = {name: {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()} for name, _ in runs}
    assert files["one"] == files["two"] == files["two-again"]
    assert len(files["one"]) > 3


def test_rerun_into_the_same_directory_replaces_it(tmp_path, tokenizer, mixed_inputs):
    inputs, _ = mixed_inputs
    first = prepare([str(inputs / "*")], tokenizer, SEQ_LEN, tmp_path, shard_mb=0.01, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    # A longer seq_len makes fewer shards: the old ones beyond must not survive.
    prepare([str(inputs / "*")], tokenizer, 4 * SEQ_LEN, tmp_path, shard_mb=0.01, workers=1, progress=False)
    assert len(list(tmp_path.glob("shard-*.tar"))) < len(first["shards"])
    prepare([str(inputs / "*")], tokenizer, SEQ_LEN, tmp_path, shard_mb=0.01, workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_keep_documents_keeps_boundaries(tmp_path, tokenizer, mixed_inputs):
    inputs, documents = mixed_inputs
    manifest = make_dataset(tmp_path, [str(inputs / "*")], tokenizer, seq_len=SEQ_LEN, keep_documents=True)
    manifest = read_manifest(str(tmp_path))
    tok = Tokenizer.load(tokenizer)
    expected, dropped = [], 0
    for doc in documents:
        ids = np.array(tok.encode(doc, bos=True, eos=True))
        whole = len(ids) // (SEQ_LEN + 1)
        expected += list(ids[:whole * (SEQ_LEN + 1)].reshape(whole, SEQ_LEN + 1))
        dropped += len(ids) - whole * (SEQ_LEN + 1)
    samples = tar_samples(tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(samples, expected, strict=True))
    # "short one" is shorter than a sample: dropped whole, as documented.
    assert manifest["keep_documents"] and manifest["dropped_tokens"] == dropped
    # No sample crosses a boundary: an eos can only be a sample's last token.
    assert all(tok.eos_id not in s[:-1] for s in samples)
