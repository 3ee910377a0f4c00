"""The checkpoint store on its own: atomic finalize, verification, retention, leftovers, unwritable directories."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from pretrain.checkpoint.store import (
    HASH_BLOCK,
    MANIFEST,
    CheckpointError,
    CheckpointStore,
    check_writable,
    complete_steps,
    mark_rank_done,
    newest_valid,
    sha256_range,
    step_dir_name,
    verify,
    write_hashed,
)


def save(store: CheckpointStore, step: int, world: int = 2, payload: bytes = b"weights") -> Path:
    """What the ranks do for one checkpoint: write their files, report them, then rank 0 finalizes."""
    tmp = store.prepare(step)
    for rank in range(world):
        path = tmp / "model" / f"rank{rank}.bin"
        path.parent.mkdir(exist_ok=True)
        mark_rank_done(tmp, rank, {path: write_hashed(path, [payload, bytes([rank, step % 256])])})
    return store.finalize(step, world, {"loss": 1.0 / step})


def test_finalize_writes_manifest_last_and_points_latest(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3, keep_every=0)
    final = save(store, 10)
    assert final.name == step_dir_name(10)
    manifest = json.loads((final / MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["model/rank0.bin", "model/rank1.bin"]
    assert not list(final.glob(".done-rank*"))
    assert (tmp_path / "latest").read_text().strip() == final.name
    assert verify(final).meta == {"loss": 0.1}


def test_finalize_refuses_when_a_rank_did_not_report(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3, keep_every=0)
    tmp = store.prepare(5)
    mark_rank_done(tmp, 0, {tmp / "a": write_hashed(tmp / "a", [b"x"])})
    with pytest.raises(CheckpointError, match="1 of 2 ranks"):
        store.finalize(5, 2, {})
    assert complete_steps(tmp_path) == []


def fill(mount: Path) -> None:
    """Leave no free space on the file system at `mount`."""
    stats = os.statvfs(mount)
    (mount / "filler").write_bytes(b"\0" * (stats.f_bavail * stats.f_frsize))


def test_a_half_written_marker_is_not_a_rank_done(mount_tmpfs):
    """Rank 1's disk fills up as it writes its marker: the marker's temporary file stays, empty. It is no rank's
    report: finalizing counts 1 of 2 ranks (it once counted 2 and failed parsing the empty file), and the save
    finalized after the error is removed."""
    disk = mount_tmpfs("1m")
    store = CheckpointStore(disk / "checkpoints", keep_last=3, keep_every=0)
    tmp = store.prepare(5)
    mark_rank_done(tmp, 0, {tmp / "a": write_hashed(tmp / "a", [b"x"])})
    fill(disk)
    with pytest.raises(OSError, match="No space left"):
        mark_rank_done(tmp, 1, {})
    assert sorted(p.name for p in tmp.glob(".done-rank*")) == [".done-rank00000", ".done-rank00001.tmp"]
    with pytest.raises(CheckpointError, match="1 of 2 ranks"):
        store.finalize(5, 2, {})
    with pytest.raises(CheckpointError, match="only 1 of 2 ranks"):
        store.finalize_when_written(5, 2, {}, wait_s=0.2)
    assert not tmp.exists() and complete_steps(store.root) == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_verify_names_the_damage_and_newest_valid_skips_it(tmp_path, damage):
    store = CheckpointStore(tmp_path, keep_last=5, keep_every=0)
    save(store, 1)
    broken = save(store, 2)
    target = broken / "model" / "rank1.bin"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[0] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-1])
    elif damage == "delete":
        target.unlink()
    else:
        (broken / MANIFEST).write_text("{not json")
    expected = {"flip": "sha256", "truncate": "bytes", "delete": "missing", "manifest": "unreadable"}[damage]
    with pytest.raises(CheckpointError, match=expected):
        verify(broken)
    if damage == "flip":  # the bytes of files under a deferred directory are left to the load that reads them
        assert verify(broken, deferred="model").step == 2
    found, skipped = newest_valid(tmp_path)
    assert found.step == 1
    assert len(skipped) == 1 and expected in skipped[0]


def test_a_directory_without_manifest_is_not_a_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=5, keep_every=0)
    save(store, 1)
    partial = tmp_path / step_dir_name(2)
    shutil.copytree(tmp_path / step_dir_name(1), partial)
    (partial / MANIFEST).unlink()
    assert complete_steps(tmp_path) == [1]
    with pytest.raises(CheckpointError, match="incomplete"):
        verify(partial)


def test_retention_keeps_last_k_and_every_m_and_renames_before_deleting(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2, keep_every=4)
    for step in range(1, 10):
        save(store, step)
    assert complete_steps(tmp_path) == [4, 8, 9]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", *(step_dir_name(s) for s in (4, 8, 9))]


def test_leftovers_of_interrupted_saves_are_removed_at_start(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2, keep_every=0)
    save(store, 1)
    store.prepare(2)  # a save that died before finalizing
    (tmp_path / (".deleting-" + step_dir_name(0))).mkdir()  # a retention that died mid-delete
    assert sorted(store.remove_incomplete()) == [".deleting-step_00000000", ".tmp-step_00000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", step_dir_name(1)]


def test_unwritable_directory_is_reported(mount_tmpfs):
    with pytest.raises(CheckpointError, match="not writable.*Read-only file system"):
        check_writable(mount_tmpfs("1m", read_only=True) / "checkpoints")


def test_write_hashed_hashes_what_it_wrote(tmp_path, monkeypatch):
    """Pieces of any size, written in chunks and hashed in blocks (both small here, neither aligned with the pieces):
    the file holds their bytes in order, and each returned sha256 is that of its block of the file."""
    import pretrain.checkpoint.store as store

    monkeypatch.setattr(store, "WRITE_CHUNK", 1000)
    monkeypatch.setattr(store, "HASH_BLOCK", 1536)
    pieces = [b"", bytes(range(256)) * 17, memoryview(b"tail"), bytes(2500)]
    blocks = write_hashed(tmp_path / "f", pieces)
    data = (tmp_path / "f").read_bytes()
    assert data == b"".join(bytes(p) for p in pieces)
    assert blocks == [hashlib.sha256(data[i:i + 1536]).hexdigest() for i in range(0, len(data), 1536)]
    assert [sha256_range(tmp_path / "f", offset, 1536) for offset in range(0, len(data), 1536)] == blocks
    assert write_hashed(tmp_path / "empty", [b""]) == [hashlib.sha256(b"").hexdigest()]


def test_a_changed_byte_in_any_block_is_found(tmp_path, monkeypatch):
    """Verification hashes every block (here the last of three), and still checks checkpoints written before
    block hashes, whose manifest holds each file's whole sha256."""
    import pretrain.checkpoint.store as store

    monkeypatch.setattr(store, "HASH_BLOCK", 100)
    store_ = CheckpointStore(tmp_path, keep_last=5, keep_every=0)
    tmp = store_.prepare(1)
    mark_rank_done(tmp, 0, {tmp / "a": write_hashed(tmp / "a", [bytes(range(250))])})
    final = store_.finalize(1, world_size=1, meta={})
    assert verify(final).step == 1
    manifest = json.loads((final / MANIFEST).read_text())
    assert len(manifest["files"]["a"]["sha256_blocks"]) == 3
    data = bytearray((final / "a").read_bytes())
    data[240] ^= 1
    (final / "a").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        verify(final)
    # Ranks that split the hashing (block k to rank k % world): only the one holding block 2 finds it.
    for rank in range(3):
        if rank == 2:
            with pytest.raises(CheckpointError, match="does not match its sha256"):
                verify(final, share=(rank, 3))
        else:
            verify(final, share=(rank, 3))
    manifest["files"]["a"] = {"size": len(data), "sha256": hashlib.sha256(bytes(data)).hexdigest()}
    (final / MANIFEST).write_text(json.dumps(manifest))
    assert verify(final).step == 1


def test_checkpoint_files_are_safetensors(tmp_path):
    """The rank files written by write_rank_state load with safetensors itself, tensors and dtypes as they were."""
    import torch
    from safetensors.torch import load_file

    from pretrain.checkpoint.state import write_rank_state

    tensors = {"param/b": torch.randn(3, 5), "param/a": torch.arange(7, dtype=torch.bfloat16),
               "exp_avg/c": torch.randn(4, 6).t(), "exp_avg/empty": torch.zeros(0, 3)}
    hashes = write_rank_state(tmp_path, 0, {"model/tp00-pp00-dp0000.safetensors": tensors})
    path = tmp_path / "model" / "tp00-pp00-dp0000.safetensors"
    size = path.stat().st_size
    assert hashes == {path: [sha256_range(path, offset, HASH_BLOCK) for offset in range(0, size, HASH_BLOCK)]}
    loaded = load_file(str(path))
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
