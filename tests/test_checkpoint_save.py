"""A checkpoint save with real processes (2 ranks, gloo): each rank copies what its ZeRO partition (or, without
one, its share) holds and writes it, with no collective over the model's tensors; the ranks' fragments join into
the full state; a dp=2 ZeRO-1 checkpoint loads at dp=1 and at dp=2 ZeRO-3 with the same weights and moments.

The model is float32, narrow, and has parameters of odd size, so ZeRO-3 pads the last partition of each of those
(the padding must not reach the checkpoint) and ZeRO 1-2 split some parameters between the ranks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed
from tests.runs import ROOT

MODEL = ["model.dim=63", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
         "model.hidden_dim=101", "model.vocab_size=257"]
MICRO_BATCH, SEQ_LEN = 2, 32
STAGES = (0, 1, 2, 3)


def _engine(zero_stage: int):
    """The trainer's engine on this rank for the narrow model, at data parallelism = the world size."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch.distributed as dist

    from pretrain import parallel
    from pretrain.config import load_config, resolve_world
    from pretrain.training.engine import build_engine

    parallel.init_distributed(backend="gloo")
    world = dist.get_world_size()
    cfg = resolve_world(load_config(ROOT / "configs" / "tiny.yaml", [
        *MODEL, "train.dtype=float32", f"parallel.zero_stage={zero_stage}", f"parallel.micro_batch={MICRO_BATCH}",
        f"train.global_batch={MICRO_BATCH * world}", "data.tokenizer=null", "model.attention_backend=sdpa"]), world)
    return cfg, build_engine(cfg, eos_id=None)


def _full_state(engine, canonical: dict) -> dict[str, torch.Tensor]:
    """Every parameter's float32 master and Adam moments, whole, gathered by DeepSpeed (collectives: every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from pretrain.checkpoint.state import ADAM_MOMENTS, _inner_optimizer

    state = {}
    for name, param in sorted(((name, param) for param, name in canonical.items()), key=lambda item: item[0]):
        master = safe_get_full_fp32_param(param)
        if master is None:  # ZeRO stage 0 in float32: the parameter is its own master
            moments = _inner_optimizer(engine).state[param]
            state[f"param/{name}"] = param.detach().clone()
            state.update({f"{kind}/{name}": moments[kind].clone() for kind in ADAM_MOMENTS})
        else:
            state[f"param/{name}"] = master.clone()
            state.update({f"{kind}/{name}": safe_get_full_optimizer_state(param, kind).clone()
                          for kind in ADAM_MOMENTS})
    return state


def save_after_two_steps(zero_stage: int, ckpt: Path) -> dict:
    """Train two steps, snapshot this rank's part under the profiler and write it into `ckpt`; then check, against
    DeepSpeed's gathered state, what the ranks' files join into. Returns the collectives seen during the snapshot,
    this rank's stored keys, and (rank 0) the full state."""
    import torch.distributed as dist

    from pretrain import parallel
    from pretrain.checkpoint.state import (
        ADAM_MOMENTS,
        ShardReader,
        rank_fragments,
        snapshot_rank_state,
        write_rank_state,
    )

    cfg, built = _engine(zero_stage)
    engine = built.engine
    generator = torch.Generator().manual_seed(parallel.dp_rank())
    for _ in range(2):
        tokens = torch.randint(0, cfg.model.vocab_size, (MICRO_BATCH, SEQ_LEN + 1), generator=generator)
        engine.backward(engine(tokens[:, :-1], tokens[:, 1:]))
        engine.step()
    # Every collective of the process group shows in the profiler as a gloo:<name> event, whichever API issued it.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        snapshot = snapshot_rank_state(engine, built.canonical_names, {"step": 2}, cfg.model_dump(mode="json"),
                                       staging=None)
    collectives = sorted(event.name for event in profile.events() if event.name.startswith("gloo:"))
    write_rank_state(ckpt, dist.get_rank(), snapshot)
    (model_file,) = (key for key in snapshot if key.startswith("model/"))
    stored = snapshot[model_file]
    # The pinned staging buffers of an asynchronous save are allocated from rank_fragments: the same keys, shapes.
    fragments = rank_fragments(built.canonical_names, parallel.dp_rank(), parallel.dp_size())
    assert {key: value.shape for key, value in stored.items() if not key.startswith("shape/")} == {
        fragment.key(kind): fragment.stored_shape for fragment in fragments for kind in ("param", *ADAM_MOMENTS)}
    full = _full_state(engine, built.canonical_names)
    dist.barrier()  # every rank's file is written
    reader = ShardReader(ckpt, cfg.model)
    assert sorted(reader.index) == sorted(full)
    for key, value in full.items():
        assert torch.equal(reader.full(key), value), key
    return {"collectives": collectives, "stored": sorted(stored), "full": full if dist.get_rank() == 0 else None}


def load_into(zero_stage: int, ckpt: Path) -> dict[str, torch.Tensor] | None:
    """Load `ckpt` into a fresh engine at this world size and ZeRO stage; rank 0 returns the full state it holds."""
    import torch.distributed as dist

    from pretrain.checkpoint.state import ShardReader, load_model_and_optimizer, read_trainer_state

    cfg, built = _engine(zero_stage)
    load_model_and_optimizer(ShardReader(ckpt, cfg.model), built.engine, built.canonical_names,
                             read_trainer_state(ckpt))
    full = _full_state(built.engine, built.canonical_names)
    return full if dist.get_rank() == 0 else None


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """saved(stage): the checkpoint directory of a dp=2 save at that ZeRO stage and each rank's report."""
    done = {}

    def save(zero_stage: int) -> tuple[Path, list[dict]]:
        if zero_stage not in done:
            ckpt = tmp_path_factory.mktemp(f"zero{zero_stage}")
            done[zero_stage] = ckpt, run_distributed(save_after_two_steps, 2, zero_stage, ckpt)
        return done[zero_stage]

    return save


@pytest.mark.parametrize("zero_stage", STAGES)
def test_a_save_issues_no_collective_and_its_fragments_join_into_the_full_state(zero_stage, saved):
    """No collective while the ranks snapshot their parts (the save before this one all-reduced every parameter's
    master and moments); every value is stored once, in the file of the rank that holds it; ZeRO splits some
    parameters between the ranks (stored as fragments with their shard's shape)."""
    _, reports = saved(zero_stage)
    assert [report["collectives"] for report in reports] == [[], []]
    first, second = ({key for key in report["stored"] if not key.startswith("shape/")} for report in reports)
    assert first and second and not first & second
    fragments = {key for key in first | second if "@" in key}
    if zero_stage == 0:  # every rank holds every parameter whole: each writes its share, whole
        assert not fragments
    else:
        assert fragments
        for report in reports:
            split = {key.split("@")[0].split("/", 1)[1] for key in report["stored"] if "@" in key}
            assert {key.removeprefix("shape/") for key in report["stored"] if key.startswith("shape/")} == split


def test_a_dp2_zero1_checkpoint_loads_at_dp1_and_at_zero3(saved):
    """Resharded at load: one process (ZeRO-1) and two at ZeRO-3 hold the saved masters and moments, bit for bit."""
    ckpt, reports = saved(1)
    expected = reports[0]["full"]
    for world, zero_stage in ((1, 1), (2, 3)):
        loaded = run_distributed(load_into, world, zero_stage, ckpt)[0]
        assert sorted(loaded) == sorted(expected)
        for key, value in expected.items():
            assert torch.equal(loaded[key], value), (world, zero_stage, key)
