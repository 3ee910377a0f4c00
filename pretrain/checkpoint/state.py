"""What a checkpoint holds, in a layout-independent form, and how a save and a load move it.

Every parameter is saved under its canonical name (the tp=1, pp=1 model's) as this tensor-parallel rank's shard:
its float32 master copy and Adam moments. A save communicates none of the model's tensors: each rank copies to host
memory what it already holds and writes it into its own file (`rank_fragments`). Under ZeRO (stages 1 to 3, and
DeepSpeed's BF16 optimizer, which partitions as stage 1 does) that is its partition of the float32 state: of each
parameter, the contiguous run of its flattened shard that falls into the partition (a *fragment*; the padding at the
end of ZeRO-3's last partition is left out). Where every data-parallel rank holds the parameters whole (float32 at
ZeRO stage 0), the ranks split them, each parameter to one rank, balanced by size (`rank_share`). Either way the
state of a (tp, pp) coordinate is written once, spread about evenly over its data-parallel ranks: a save's host
memory and write time per rank shrink as data parallelism grows, and its stall (what training waits for) is one copy
at memory speed, on GPUs into pinned host buffers allocated ahead of the first save (`allocate_staging`). Until
2026-12-07 every rank all-reduced the master and moments of its whole shard over data-parallel ranks (12 bytes a
parameter: 43 GB per rank for the 7B at tp=2) and kept its share, inside the stall.

A load (`ShardReader`) joins each shard's fragments from the data-parallel files of its (tp, pp) coordinate, merges
the tp shards and cuts the new rank's shard, so a checkpoint loads into any tp/pp/dp/ZeRO layout with the optimizer
state carried over; the same layout resumes bit-exactly. Checkpoints written before fragments (every parameter whole,
in one file) load as they are.

    model/tp00-pp00-dp0000.safetensors   this rank's part, float32 (no moments before the first optimizer step):
        param/<name>, exp_avg/<name>, exp_avg_sq/<name>        a whole shard, in its shape
        param/<name>@<offset>, exp_avg/<name>@<offset>, ...    a fragment: the flattened shard's elements from
                                                               <offset> on, flat
        shape/<name>                                           int64, the shape of a shard stored in fragments
    rng/rank00000.pt                     python, numpy, torch CPU and the rank's own CUDA generator states
    trainer.json                         step, tokens, scheduler, loader position, counters, the loss spikes
                                         skipped and the spike guard's window, config, code version
"""

from __future__ import annotations

import io
import json
import random
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_local_fp32_param,
    safe_get_local_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)
from safetensors import safe_open

from pretrain import parallel
from pretrain.checkpoint.store import CheckpointError, write_hashed
from pretrain.config import Config, ModelConfig
from pretrain.model.sharding import shard_parameter, unshard_parameter

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def code_version() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


_SHARD_FILE = re.compile(r"tp(\d+)-pp(\d+)-dp(\d+)\.safetensors")


def shard_file_name(tp_rank: int, pp_rank: int, dp_rank: int = 0) -> str:
    return f"model/tp{tp_rank:02d}-pp{pp_rank:02d}-dp{dp_rank:04d}.safetensors"


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _optimized_tensors(engine, optimizer: torch.optim.Optimizer) -> list[tuple[torch.Tensor, dict]]:
    """(tensor the optimizer updates, its parameter group). ZeRO-3 puts its flat float32 partitions into the
    groups only while it steps, so they are taken from DeepSpeed's optimizer there."""
    zero = engine.optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        return [(flat, optimizer.param_groups[zero.sub_group_to_group_id[index]])
                for index, flat in enumerate(zero.fp32_partitioned_groups_flat)]
    return [(flat, group) for group in optimizer.param_groups for flat in group["params"]]


def _relink_optimizer_state(engine) -> None:
    # DeepSpeed links each parameter to its optimizer-state fragments after the first step, but only for the
    # parameter groups that already had state then; relink so every group's fragments are reachable.
    zero = engine.optimizer
    if hasattr(zero, "_hp_optimizer_states_linked"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def unpartitioned_shape(param: torch.nn.Parameter) -> torch.Size:
    """The shape of this tensor-parallel rank's whole parameter: ZeRO-3 leaves each rank an empty `.shape` and
    keeps the whole one in `ds_shape`."""
    return torch.Size(getattr(param, "ds_shape", param.shape))


def _by_name(canonical: dict[torch.nn.Parameter, str]) -> list[tuple[str, torch.nn.Parameter]]:
    """The order every rank goes through the parameters in: the same on all, so that their collectives (at a load)
    pair up and their shares agree."""
    return sorted(((name, param) for param, name in canonical.items()), key=lambda item: item[0])


def rank_share(canonical: dict[torch.nn.Parameter, str], dp_rank: int,
               dp_size: int) -> list[tuple[str, torch.nn.Parameter]]:
    """The (canonical name, parameter) pairs whose checkpoint values data-parallel rank `dp_rank` writes, by name:
    each parameter goes to the rank least loaded so far, by size. Computed from shapes alone, so every rank gets
    the same shares without a collective (and it may run in a background thread)."""
    load = [0] * dp_size
    share = []
    for name, param in _by_name(canonical):
        owner = load.index(min(load))
        load[owner] += unpartitioned_shape(param).numel()
        if owner == dp_rank:
            share.append((name, param))
    return share


@dataclass(frozen=True, eq=False)
class Fragment:
    """What a rank writes of one parameter: `numel` elements from `offset` of its flattened tensor-parallel shard,
    whose shape is `shape`."""

    name: str
    param: torch.nn.Parameter
    offset: int
    numel: int
    shape: torch.Size

    @property
    def whole(self) -> bool:
        return self.numel == self.shape.numel()

    @property
    def stored_shape(self) -> torch.Size:
        """A whole shard is stored in its shape, a part of one flat."""
        return self.shape if self.whole else torch.Size([self.numel])

    def key(self, kind: str) -> str:
        """Its key in the rank's file, for `kind` ("param" or an Adam moment)."""
        return f"{kind}/{self.name}" if self.whole else f"{kind}/{self.name}@{self.offset}"


def _partition_range(param: torch.nn.Parameter) -> tuple[int, int] | None:
    """(offset, numel) of the run of the flattened shard whose float32 state this rank's ZeRO partition holds (numel
    0: none of it), from DeepSpeed's own bookkeeping; None where the parameter is not partitioned."""
    if hasattr(param, "ds_id"):  # ZeRO-3: equal slices, in partition-rank order, the last one padded
        size = param.partition_numel()
        start = size * param.ds_zero_partition_rank
        return start, max(0, min(size, param.ds_numel - start))
    if hasattr(param, "_hp_mapping"):  # ZeRO 1-2 and the BF16 optimizer
        if param._hp_mapping is None:  # its state lies in other ranks' partitions
            return 0, 0
        address = param._hp_mapping.lp_fragment_address
        return address.start, address.numel
    return None


def rank_fragments(canonical: dict[torch.nn.Parameter, str], dp_rank: int, dp_size: int) -> list[Fragment]:
    """What data-parallel rank `dp_rank` of `dp_size` writes at a save, in name order: of each parameter its ZeRO
    partition holds part of, that part; of the parameters every data-parallel rank holds whole, its `rank_share`.
    From DeepSpeed's partition bookkeeping and shapes alone: no collective, so it may run in a background thread."""
    fragments, unpartitioned = [], {}
    for name, param in _by_name(canonical):
        held = _partition_range(param)
        if held is None:
            unpartitioned[param] = name
        elif held[1] > 0:
            fragments.append(Fragment(name, param, *held, unpartitioned_shape(param)))
    fragments += [Fragment(name, param, 0, param.numel(), param.shape)
                  for name, param in rank_share(unpartitioned, dp_rank, dp_size)]
    return sorted(fragments, key=lambda fragment: fragment.name)


def _fragment_values(fragment: Fragment, optimizer: torch.optim.Optimizer, stepped: bool) -> dict[str, torch.Tensor]:
    """The float32 master weight and Adam moments of `fragment`, as this rank holds them (views, flat for a ZeRO
    partition): no copy and no collective. No moments before the first optimizer step (or while every one was
    skipped): there are none to save."""
    param = fragment.param
    kinds = ("param", *ADAM_MOMENTS) if stepped else ("param",)
    if hasattr(param, "ds_id"):  # the padding of the last partition comes after the parameter's last element
        return {kind: (safe_get_local_fp32_param(param) if kind == "param"
                       else safe_get_local_optimizer_state(param, kind)).narrow(0, 0, fragment.numel)
                for kind in kinds}
    if hasattr(param, "_hp_mapping"):
        return {kind: param._hp_mapping.get_hp_fragment(None if kind == "param" else kind) for kind in kinds}
    # No ZeRO and no mixed precision: the parameter is its own master copy.
    state = optimizer.state.get(param, {})
    return {"param": param.detach(), **{kind: state[kind] for kind in ADAM_MOMENTS if kind in state}}


def allocate_staging(fragments: list[Fragment], staging: dict[str, torch.Tensor]) -> int:
    """Fill `staging` with the pinned host buffers that `snapshot_rank_state` copies `fragments` into (their float32
    master and Adam moments); returns their bytes. Allocating pinned memory takes seconds per ten gigabytes, so it is
    done once, ahead of the first save."""
    size = 0
    for fragment in fragments:
        for kind in ("param", *ADAM_MOMENTS):
            buffer = staging[fragment.key(kind)] = _pinned(fragment.stored_shape)
            size += buffer.numel() * buffer.element_size()
    return size


def snapshot_rank_state(engine, canonical: dict[torch.nn.Parameter, str], trainer_state: dict,
                        config: dict, staging: dict[str, torch.Tensor] | None) -> dict[str, object]:
    """Every rank, at a step boundary: what it writes of the checkpoint (`rank_fragments`) copied to host memory,
    ready for `write_rank_state`. No collective: each rank copies what it holds.

    With `staging` (asynchronous saves from a GPU) the copies go into its pinned host buffers, kept from one save
    to the next (see `allocate_staging`), asynchronously with one synchronization at the end: pinned memory copies
    several times faster than pageable memory, and this copy is all the training loop waits for. The caller must
    not reuse `staging` while an earlier snapshot is still being written. Without it the copies go into fresh
    pageable memory: a synchronous save waits for the write anyway, and no host memory stays pinned."""
    optimizer = _inner_optimizer(engine)
    _relink_optimizer_state(engine)
    stepped = _adam_step(optimizer) > 0
    dp_rank = parallel.dp_cp_rank()  # context-parallel ranks are data-parallel ranks to ZeRO and to the writing
    tensors: dict[str, torch.Tensor] = {}
    for fragment in rank_fragments(canonical, dp_rank, parallel.dp_cp_size()):
        for kind, value in _fragment_values(fragment, optimizer, stepped).items():
            key = fragment.key(kind)
            tensors[key] = _to_host(key, value.detach().reshape(fragment.stored_shape), staging)
        if not fragment.whole:
            tensors[f"shape/{fragment.name}"] = torch.tensor(fragment.shape, dtype=torch.int64)
    if any(t.is_pinned() for t in tensors.values()):
        torch.cuda.synchronize()
    snapshot: dict[str, object] = {"rng": _rng_state()}
    if tensors:
        snapshot[shard_file_name(parallel.tp_rank(), parallel.pp_rank(), dp_rank)] = tensors
    if dist.get_rank() == 0:
        snapshot["trainer"] = {
            **trainer_state,
            "adam_step": _adam_step(optimizer),
            "scheduler": engine.lr_scheduler.state_dict(),
            "layout": {"tp": parallel.tp_size(), "pp": parallel.pp_size(), "dp": parallel.dp_size(),
                       "cp": parallel.cp_size(), "world": dist.get_world_size()},
            "config": config,
            "code_version": code_version(),
        }
    return snapshot


def _to_host(key: str, value: torch.Tensor, staging: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """A float32 host copy of `value`: into its pinned staging buffer, asynchronously, when staging a GPU tensor."""
    if staging is None or value.device.type != "cuda":
        return value.to("cpu", torch.float32, copy=True).contiguous()
    buffer = staging.get(key)
    if buffer is None or buffer.shape != value.shape:  # one that allocate_staging did not foresee
        buffer = staging[key] = _pinned(value.shape)
    buffer.copy_(value, non_blocking=True)
    return buffer


def _pinned(shape: torch.Size) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32, pin_memory=True)


def write_rank_state(tmp_dir: Path, rank: int, snapshot: dict[str, object]) -> dict[Path, str]:
    """Write a snapshot's files, each hashed while written and synced (safe to run in a background thread);
    returns their sha256s for `mark_rank_done`."""
    written = {}
    for key, value in snapshot.items():
        if key == "rng":
            path = tmp_dir / "rng" / f"rank{rank:05d}.pt"
            buffer = io.BytesIO()
            torch.save(value, buffer)
            pieces = [buffer.getbuffer()]
        elif key == "trainer":
            path = tmp_dir / "trainer.json"
            pieces = [json.dumps(value, indent=1, default=_jsonable).encode()]
        else:
            path = tmp_dir / key
            pieces = _safetensors_pieces(value)
        path.parent.mkdir(exist_ok=True)
        written[path] = write_hashed(path, pieces)
    return written


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


def _safetensors_pieces(tensors: dict[str, torch.Tensor]) -> Iterator[memoryview]:
    """A safetensors file as pieces to write: the header's length (8 bytes, little-endian), the JSON header (padded
    to 8 bytes), then each tensor's bytes, back to back. The tensors' host memory is written as it is: safetensors'
    own save_file first copies every tensor into a Python bytes object."""
    header, offset = {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    yield memoryview(struct.pack("<Q", len(encoded)) + encoded)
    for tensor in tensors.values():
        yield memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _adam_step(optimizer: torch.optim.Optimizer) -> float:
    for state in optimizer.state.values():
        if "step" in state:
            return float(state["step"])
    return 0.0


def _rng_state() -> dict:
    """Generator states as tensors only, so that `torch.load(weights_only=True)` reads them back."""
    _, python_state, python_gauss = random.getstate()
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    return {
        "python": torch.tensor(python_state, dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if python_gauss is None else python_gauss], dtype=torch.float64),
        "numpy": torch.from_numpy(numpy_keys.astype(np.int64)),
        "numpy_pos": torch.tensor([numpy_pos, numpy_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([numpy_gauss], dtype=torch.float64),
        "torch": torch.get_rng_state(),
        # Only the generator of the device this rank computes on: a resume may see fewer GPUs than the save did.
        "cuda": torch.cuda.get_rng_state(torch.cuda.current_device()) if torch.cuda.is_available() else [],
    }


def saved_cuda_state(saved: torch.Tensor | list[torch.Tensor], device: int) -> torch.Tensor | None:
    """The saved CUDA generator state to restore on `device` (this rank's), None where there is none for it.
    `saved` is the state of the rank's device, or, in checkpoints written before, the states of every device the
    rank saw, in order, of which it drew from the one of its local rank: the only one where it saw one device, else
    the current device's (its own when the resume keeps the local ranks; otherwise an unused, seeded one)."""
    if isinstance(saved, torch.Tensor):
        return saved
    if len(saved) == 1:
        return saved[0]
    return saved[device] if device < len(saved) else None


def _set_rng_state(state: dict) -> None:
    gauss = state["python_gauss"].item()
    random.setstate((3, tuple(state["python"].tolist()), None if gauss != gauss else gauss))
    pos, has_gauss = state["numpy_pos"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss,
                         state["numpy_gauss"].item()))
    torch.set_rng_state(state["torch"])
    saved = state["cuda"]
    if not torch.cuda.is_available() or (isinstance(saved, list) and not saved):  # saved without CUDA
        return
    device = torch.cuda.current_device()
    cuda_state = saved_cuda_state(saved, device)
    if cuda_state is None:
        print(f"[pretrain] the checkpoint holds the CUDA generator states of {len(saved)} devices, none of them "
              f"this rank's device {device}: its CUDA generator starts from the seed", file=sys.stderr, flush=True)
    else:
        torch.cuda.set_rng_state(cuda_state, device)


# ---------------------------------------------------------------------------------------------- loading


# Model keys that change only how the same function is computed; anything else makes weights incompatible.
LAYOUT_ONLY_MODEL_KEYS = {"attention_backend", "max_seq_len", "sliding_window", "document_masking"}


def check_compatible(saved_config: dict, cfg: Config, ckpt: Path) -> None:
    saved = saved_config.get("model", {})
    current = cfg.model.model_dump(mode="json")
    for key in sorted(current):
        if key not in LAYOUT_ONLY_MODEL_KEYS and saved.get(key) != current[key]:
            raise CheckpointError(
                f"checkpoint {ckpt} was saved with model.{key}={saved.get(key)!r}, this config has "
                f"{current[key]!r}: use the checkpoint's config or start a new run directory"
            )


def read_trainer_state(ckpt: Path) -> dict:
    path = ckpt / "trainer.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}): the checkpoint is damaged") from None


class ShardReader:
    """Reads a parameter (or moment) by canonical name from whichever (tp, pp) files hold it and returns the
    full tensor, joining the fragments of each tensor-parallel shard and merging the shards."""

    def __init__(self, ckpt: Path, model_cfg: ModelConfig):
        self.cfg = model_cfg
        # key ("param/<name>", ...) -> tp rank -> the pieces of its shard: (offset in the flattened shard, the open
        # file holding the piece, its key there); a shard stored whole is one piece at offset 0.
        self.index: dict[str, dict[int, list[tuple[int, object, str]]]] = {}
        self.shapes: dict[tuple[str, int], torch.Size] = {}  # (name, tp rank) -> shape of a shard in fragments
        tp_ranks = set()
        for path in sorted((ckpt / "model").glob("*.safetensors")):
            match = _SHARD_FILE.fullmatch(path.name)
            if match is None:
                raise CheckpointError(f"{path} is not a parameter shard (tpXX-ppYY-dpZZZZ.safetensors): the "
                                      "checkpoint was written by another program or damaged")
            tp = int(match.group(1))
            tp_ranks.add(tp)
            handle = safe_open(str(path), framework="pt")
            for stored in handle.keys():
                if stored.startswith("shape/"):
                    self.shapes[stored.removeprefix("shape/"), tp] = torch.Size(handle.get_tensor(stored).tolist())
                    continue
                key, _, offset = stored.partition("@")
                self.index.setdefault(key, {}).setdefault(tp, []).append((int(offset or 0), handle, stored))
        if not tp_ranks:
            raise CheckpointError(f"{ckpt}/model holds no parameter shards: the checkpoint is damaged")
        self.tp = 1 + max(tp_ranks)

    def has(self, key: str) -> bool:
        return key in self.index

    def full(self, key: str) -> torch.Tensor:
        holders = self.index.get(key)
        if holders is None or len(holders) != self.tp:
            raise CheckpointError(f"checkpoint lacks {key} (or some of its shards): it was saved by another model")
        name = key.split("/", 1)[1]
        return unshard_parameter(name, [self._tp_shard(key, t) for t in range(self.tp)], self.cfg)

    def shard(self, key: str) -> torch.Tensor:
        """This tensor-parallel rank's shard: read as it is when the checkpoint has the same tp size (a resume
        reads only its own shards), else cut from the merged full tensor."""
        holders = self.index.get(key, {})
        if self.tp == parallel.tp_size() and len(holders) == self.tp:
            return self._tp_shard(key, parallel.tp_rank())
        name = key.split("/", 1)[1]
        return shard_parameter(name, self.full(key), self.cfg, parallel.tp_rank(), parallel.tp_size())

    def _tp_shard(self, key: str, tp: int) -> torch.Tensor:
        """The shard of tensor-parallel rank `tp`: as stored when whole, else its fragments joined, which must
        cover it exactly."""
        pieces = sorted(self.index[key][tp], key=lambda piece: piece[0])
        _, handle, stored = pieces[0]
        if stored == key:
            return handle.get_tensor(stored)
        name = key.split("/", 1)[1]
        shape = self.shapes.get((name, tp))
        if shape is None:
            raise CheckpointError(f"checkpoint lacks shape/{name} beside the fragments of {key}: it is damaged")
        shard = torch.empty(shape.numel(), dtype=torch.float32)
        filled = 0
        for offset, handle, stored in pieces:
            piece = handle.get_tensor(stored)
            if offset != filled or filled + piece.numel() > shard.numel():
                break
            shard[offset:offset + piece.numel()] = piece
            filled += piece.numel()
        if filled != shard.numel():
            raise CheckpointError(f"the fragments of {key} (tp rank {tp}) do not cover its {shard.numel()} elements "
                                  f"exactly (offsets {[offset for offset, _, _ in pieces]}): the checkpoint is "
                                  "damaged or some of its data-parallel files are missing")
        return shard.view(shape)


@torch.no_grad()
def load_model_and_optimizer(reader: ShardReader, engine, canonical: dict[torch.nn.Parameter, str],
                             trainer_state: dict, weights_only: bool = False) -> None:
    """Into the DeepSpeed engine: every parameter (the model's copy in its dtype and the float32 master), the Adam
    moments (not with weights_only) and the learning-rate schedule. Collective over data-parallel ranks under
    ZeRO-3: all ranks call it."""
    optimizer = _inner_optimizer(engine)
    step = trainer_state.get("adam_step", 0.0)
    for flat, group in _optimized_tensors(engine, optimizer):
        if flat not in optimizer.state or "exp_avg" not in optimizer.state[flat]:
            on_device = group.get("fused") or group.get("capturable")
            optimizer.state[flat] = {
                "step": torch.tensor(step, dtype=torch.float32, device=flat.device if on_device else "cpu"),
                "exp_avg": torch.zeros_like(flat, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(flat, memory_format=torch.preserve_format),
            }
        else:
            optimizer.state[flat]["step"].fill_(step)
    _relink_optimizer_state(engine)
    for name, param in _by_name(canonical):
        master = reader.shard(f"param/{name}").to(param.device)
        wanted = tuple(unpartitioned_shape(param))
        if tuple(master.shape) != wanted:
            raise CheckpointError(
                f"checkpoint parameter {name} has shape {tuple(master.shape)} for this rank, the model wants "
                f"{wanted}: the checkpoint was saved with another model config"
            )
        _set_weight(param, master)
        _set_master_state(param, optimizer, "param", master)
        for kind in ADAM_MOMENTS:
            if not weights_only and reader.has(f"{kind}/{name}"):
                _set_master_state(param, optimizer, kind, reader.shard(f"{kind}/{name}").to(param.device))
    if "scheduler" not in trainer_state:  # a checkpoint made by `pretrain import` starts the schedule fresh
        return
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(trainer_state["scheduler"])
    # load_state_dict restores the schedule's position but not the rate the optimizer uses for its next step.
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr


def _set_weight(param: torch.nn.Parameter, master: torch.Tensor) -> None:
    """The model's copy of a parameter, in its dtype. DeepSpeed refreshes it from the float32 master only after an
    optimizer step, so it is set beside the master."""
    if hasattr(param, "ds_id"):  # ZeRO-3: each rank holds a slice; set the whole and let DeepSpeed slice it again
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.copy_(master.to(param.dtype))
    else:
        param.copy_(master.to(param.dtype))


def _set_master_state(param: torch.nn.Parameter, optimizer: torch.optim.Optimizer, kind: str,
                      value: torch.Tensor) -> None:
    """This rank's float32 master (kind "param") or Adam moment of a parameter, from the shard's whole `value`: the
    part its ZeRO partition holds. ZeRO-3's own setter of the whole reads past the end of the value in the last,
    padded partition of a parameter whose size the data-parallel size does not divide; the padding is set to 0."""
    if hasattr(param, "ds_id"):
        offset, numel = _partition_range(param)
        local = torch.zeros(param.partition_numel(), dtype=torch.float32, device=value.device)
        local[:numel] = value.flatten()[offset:offset + numel]
        if kind == "param":
            safe_set_local_fp32_param(param, local)
        else:
            safe_set_local_optimizer_state(param, local, kind)
    elif hasattr(param, "_hp_mapping"):
        if kind == "param":
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, kind)
    elif kind != "param":  # no ZeRO and no mixed precision: the parameter, set already, is its own master
        optimizer.state[param][kind].copy_(value)


def load_rng_state(ckpt: Path, saved_layout: dict) -> bool:
    """This rank's generators, when the layout is the one saved (otherwise ranks do not correspond and the
    generators start from the seed). Returns whether they were restored."""
    current = {"tp": parallel.tp_size(), "pp": parallel.pp_size(), "cp": parallel.cp_size(),
               "world": dist.get_world_size()}
    # Checkpoints from before context parallelism have no "cp": they were saved at cp = 1.
    if any(saved_layout.get(key, 1 if key == "cp" else None) != value for key, value in current.items()):
        return False
    path = ckpt / "rng" / f"rank{dist.get_rank():05d}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing although {ckpt} was saved in this layout: without it the resume "
                              "is not exact; resume from another checkpoint or in another layout")
    _set_rng_state(torch.load(path, weights_only=True))
    return True
