"""The tensor-parallel layout of the model's parameters, and moving between full tensors and rank shards.

A "full" tensor is the parameter as a tp=1 model holds it; a shard is what one rank of tp holds. Which dimension
a parameter is split along is read off the layer that owns it, in the model's own stage modules built on the meta
device: megatron-core's VocabParallelEmbedding and ColumnParallelLinear split their weight's rows, RowParallelLinear
its columns (the `partition_dim` megatron's initialization would mark; ours is off), and the RMSNorm gains are
replicated. A fused column-parallel weight ([q; k; v], [gate; up]) is split block by block, with the blocks its
`FusedColumnParallelLinear` declares. A name outside the layout is an error, never a replicated tensor.

A "full state" maps canonical names (`Mistral.named_parameters()` at tp=1, pp=1) to full tensors;
`shard_full_state`, `load_full_state` and `gather_full_state` move whole models between the two forms.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn

from pretrain import parallel
from pretrain.config import ModelConfig


@dataclass(frozen=True)
class ParameterLayout:
    partition_dim: int | None  # the dimension split over tensor-parallel ranks; None: every rank holds it whole
    blocks: tuple[int, ...] = ()  # a fused weight's full block sizes along partition_dim, each split on its own


# Checked in this order, so that a subclass (FusedColumnParallelLinear) finds its megatron base class.
_PARTITION_DIMS = ((VocabParallelEmbedding, 0), (ColumnParallelLinear, 0), (RowParallelLinear, 1))


def parameter_layout(name: str, cfg: ModelConfig) -> ParameterLayout:
    """The layout of the parameter with canonical name `name`; ValueError for a name the model does not have."""
    layouts = _model_layout(cfg.model_dump_json())
    if name not in layouts:
        raise ValueError(f"{name} is not a parameter of a {cfg.n_layers}-layer Mistral, so it has no "
                         "tensor-parallel layout: pass the model's own parameter names")
    return layouts[name]


@functools.lru_cache(maxsize=8)
def _model_layout(cfg_json: str) -> dict[str, ParameterLayout]:
    """Every canonical parameter name and its layout, from the model's stage modules built on the meta device."""
    # Imported here because mistral.py initializes its weights with this module's functions.
    from pretrain.model.mistral import DecoderLayer, Embedding, FusedColumnParallelLinear, OutputHead, RMSNorm

    cfg = ModelConfig.model_validate_json(cfg_json)
    # Host allocation, so that the meta device applies; nothing is initialized. Megatron sizes its layers by the
    # tensor-parallel group when one exists, so the shapes may be shards: only the layout is read here.
    layer_config = ModelParallelConfig(use_cpu_initialization=True, perform_initialization=False)
    with torch.device("meta"):
        stages = {"embedding": Embedding(cfg, layer_config)}
        stages.update({f"layers.{i}": DecoderLayer(cfg, layer_config) for i in range(cfg.n_layers)})
        stages["head"] = OutputHead(cfg, layer_config)
    layouts = {}
    for prefix, stage in stages.items():
        for name, _ in stage.named_parameters():
            owner_name, _, param_name = name.rpartition(".")
            owner = stage.get_submodule(owner_name)
            if isinstance(owner, RMSNorm):
                layouts[f"{prefix}.{name}"] = ParameterLayout(None)
                continue
            split_dim = next((dim for cls, dim in _PARTITION_DIMS if isinstance(owner, cls)), None)
            if split_dim is None or param_name != "weight":
                raise TypeError(f"{prefix}.{name} ({type(owner).__name__}.{param_name}) has no tensor-parallel "
                                "layout: add a rule for it to pretrain/model/sharding.py")
            blocks = owner.block_sizes if isinstance(owner, FusedColumnParallelLinear) else ()
            layouts[f"{prefix}.{name}"] = ParameterLayout(split_dim, blocks)
    return layouts


def shard_parameter(name: str, full: torch.Tensor, cfg: ModelConfig, rank: int, size: int) -> torch.Tensor:
    """The slice of the full parameter `name` that tensor-parallel rank `rank` of `size` holds."""
    layout = parameter_layout(name, cfg)
    dim = layout.partition_dim
    if dim is None:
        return full
    if not layout.blocks:
        return full.chunk(size, dim=dim)[rank]
    return torch.cat([block.chunk(size, dim=dim)[rank] for block in full.split(layout.blocks, dim=dim)], dim=dim)


def unshard_parameter(name: str, shards: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """The full parameter from the shards of every rank, in rank order (inverse of shard_parameter)."""
    layout = parameter_layout(name, cfg)
    dim = layout.partition_dim
    if dim is None:
        return shards[0]
    if not layout.blocks:
        return torch.cat(shards, dim=dim)
    per_rank = [block // len(shards) for block in layout.blocks]
    pieces = [shard.split(per_rank, dim=dim) for shard in shards]  # rank -> its slice of each block
    return torch.cat([piece for block in zip(*pieces, strict=True) for piece in block], dim=dim)


def full_shape(name: str, shard_shape: torch.Size, cfg: ModelConfig, tp: int) -> torch.Size:
    """The full parameter's shape, from the shape of one rank's shard of tp."""
    dim = parameter_layout(name, cfg).partition_dim
    if dim is None:
        return shard_shape
    shape = list(shard_shape)
    shape[dim] *= tp
    return torch.Size(shape)


def shard_full_state(
    full_state: dict[str, torch.Tensor], cfg: ModelConfig, tp_rank: int, tp_size: int
) -> dict[str, torch.Tensor]:
    """What tensor-parallel rank `tp_rank` of `tp_size` holds of each full parameter."""
    return {name: shard_parameter(name, full, cfg, tp_rank, tp_size) for name, full in full_state.items()}


@torch.no_grad()
def load_full_state(model: nn.Module, full_state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Copy this rank's shard of every full parameter into `model`; every parameter must be given."""
    rank, size = parallel.tp_rank(), parallel.tp_size()
    params = dict(model.named_parameters())
    if params.keys() != full_state.keys():
        missing, unexpected = params.keys() - full_state.keys(), full_state.keys() - params.keys()
        raise KeyError(
            f"full state does not match the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    for name, param in params.items():
        param.copy_(shard_parameter(name, full_state[name], cfg, rank, size))


@torch.no_grad()
def gather_full_state(model: nn.Module, cfg: ModelConfig, grads: bool = False) -> dict[str, torch.Tensor]:
    """The full parameters (or their gradients, with grads=True) on every rank, all-gathered over tp.

    Replicated parameters (the norms) are identical on every tp rank, so the local copy is used.
    """
    size, group = parallel.tp_size(), parallel.tp_group()
    full = {}
    for name, param in model.named_parameters():
        local = param.grad if grads else param
        if local is None:
            raise ValueError(f"{name} has no gradient: run backward before gathering gradients")
        local = local.detach().contiguous()
        if size == 1:
            full[name] = local.clone()
            continue
        shards = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(shards, local, group=group)
        full[name] = unshard_parameter(name, shards, cfg)
    return full
