"""Conversion between our parameters and transformers' `MistralForCausalLM`, and tensor-parallel (un)sharding.

A "full state" maps our parameter names (`Mistral.named_parameters()` at tp=1) to full tensors. The HF
layout keeps q/k/v and gate/up as separate matrices; ours fuses them ([q; k; v] and [gate; up]) so
that one column-parallel matmul computes each group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pretrain import parallel
from pretrain.config import ModelConfig
from pretrain.model.mistral import shard_parameter, unshard_parameter

# Our name (inside layers.{i}.) -> HF name (inside model.layers.{i}.), for the unfused parameters.
_LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.out_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "embedding.token_embedding.weight": "model.embed_tokens.weight",
    "head.norm.weight": "model.norm.weight",
    "head.lm_head.weight": "lm_head.weight",
}
_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
_GATE_UP = ("mlp.gate_proj.weight", "mlp.up_proj.weight")


def _layer_count(state: dict[str, torch.Tensor], norm_suffix: str) -> int:
    return sum(1 for name in state if name.endswith(norm_suffix))


def to_hf(full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our full state in transformers' MistralForCausalLM names; sizes are read from the tensors."""
    hf = {hf_name: full_state[ours] for ours, hf_name in _GLOBAL_NAMES.items()}
    for i in range(_layer_count(full_state, ".attention_norm.weight")):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        for our_name, hf_name in _LAYER_NAMES.items():
            hf[theirs + hf_name] = full_state[ours + our_name]
        # The output projection's input width is the query width; k and v share the rest equally.
        q_rows = full_state[ours + "attention.out_proj.weight"].shape[1]
        qkv = full_state[ours + "attention.qkv_proj.weight"]
        kv_rows = (qkv.shape[0] - q_rows) // 2
        for hf_name, tensor in zip(_QKV, qkv.split([q_rows, kv_rows, kv_rows], dim=0), strict=True):
            hf[theirs + hf_name] = tensor
        gate_up = full_state[ours + "mlp.gate_up_proj.weight"]
        for hf_name, tensor in zip(_GATE_UP, gate_up.chunk(2, dim=0), strict=True):
            hf[theirs + hf_name] = tensor
    return {name: tensor.contiguous() for name, tensor in hf.items()}


def from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' MistralForCausalLM state dict as our full state (q/k/v and gate/up fused)."""
    full = {ours: hf_state[hf_name] for ours, hf_name in _GLOBAL_NAMES.items()}
    for i in range(_layer_count(hf_state, ".input_layernorm.weight")):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        for our_name, hf_name in _LAYER_NAMES.items():
            full[ours + our_name] = hf_state[theirs + hf_name]
        full[ours + "attention.qkv_proj.weight"] = torch.cat([hf_state[theirs + n] for n in _QKV], dim=0)
        full[ours + "mlp.gate_up_proj.weight"] = torch.cat([hf_state[theirs + n] for n in _GATE_UP], dim=0)
    return full


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


def hf_config(cfg: ModelConfig):
    """A transformers MistralConfig describing the same architecture (used for export)."""
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        sliding_window=cfg.sliding_window,
        tie_word_embeddings=False,
    )
