"""The CUDA generator in a checkpoint: each rank saves and restores its own device's, and rng files written when
every visible device's state was saved still load where the resume sees fewer GPUs (a traceback, and under Slurm
requeues, before)."""

import pytest
import torch

from pretrain.checkpoint.state import _rng_state, _set_rng_state, saved_cuda_state, write_rank_state

# Distinct fake states, one per device of a node of 8.
STATES = [torch.full((16,), device, dtype=torch.uint8) for device in range(8)]


def test_the_state_restored_is_the_rank_devices_in_new_and_old_checkpoints():
    assert saved_cuda_state(STATES[3], device=3) is STATES[3]
    # Old: saved seeing the whole node, resumed seeing two GPUs (CUDA_VISIBLE_DEVICES=0,1 or 2 nodes x 4 GPUs).
    assert saved_cuda_state(STATES, device=1) is STATES[1]
    # Old: saved with one GPU per Slurm task, resumed on a whole node.
    assert saved_cuda_state(STATES[:1], device=5) is STATES[0]
    # Old: saved seeing two GPUs, resumed on device 5: none of them is its own.
    assert saved_cuda_state(STATES[:2], device=5) is None


def test_an_old_checkpoint_without_the_devices_state_leaves_its_generator_seeded(monkeypatch, capsys):
    """One line, not an error; the other generators are restored."""
    saved = _rng_state() | {"cuda": STATES[:2]}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    expected = torch.rand(3)
    _set_rng_state(saved)
    assert torch.equal(torch.rand(3), expected) and restored == []
    assert capsys.readouterr().err.splitlines() == [
        "[pretrain] the checkpoint holds the CUDA generator states of 2 devices, none of them this rank's device 5: "
        "its CUDA generator starts from the seed"]
    _set_rng_state(saved | {"cuda": STATES})
    assert restored == [(STATES[5], 5)]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def written_and_read(tmp_path, state: dict) -> dict:
    """An rng file as a checkpoint writes and reads it (write_rank_state, torch.load with weights_only)."""
    write_rank_state(tmp_path, 0, {"rng": state})
    return torch.load(tmp_path / "rng" / "rank00000.pt", weights_only=True)


@pytest.mark.gpu
@needs_cuda
def test_an_old_checkpoint_of_eight_devices_restores_this_devices_generator(tmp_path):
    device = torch.cuda.current_device()
    old = []
    for seed in range(8):
        torch.cuda.manual_seed(seed)
        old.append(torch.cuda.get_rng_state(device))
    saved = written_and_read(tmp_path, _rng_state() | {"cuda": old})
    torch.cuda.manual_seed(100)
    _set_rng_state(saved)
    assert torch.equal(torch.cuda.get_rng_state(device), old[device])


@pytest.mark.gpu
@needs_cuda
def test_a_resume_continues_this_devices_generator(tmp_path):
    saved = written_and_read(tmp_path, _rng_state())
    assert isinstance(saved["cuda"], torch.Tensor)
    expected = torch.rand(3, device="cuda")
    torch.rand(100, device="cuda")
    _set_rng_state(saved)
    assert torch.equal(torch.rand(3, device="cuda"), expected)
