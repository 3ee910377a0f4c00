"""Conversion between our full state and transformers' `MistralForCausalLM` state dict and config.

A "full state" maps our parameter names (`Mistral.named_parameters()` at tp=1) to full tensors. The HF
layout keeps q/k/v and gate/up as separate matrices; ours fuses them ([q; k; v] and [gate; up]) so
that one column-parallel matmul computes each group; the blocks' sizes come from the tensor-parallel layout.
"""

from __future__ import annotations

import torch

from pretrain.config import ModelConfig
from pretrain.model.sharding import parameter_layout

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
# Our fused name (inside layers.{i}.) -> the HF names of its blocks, in order.
_FUSED_NAMES = {
    "attention.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


def _layer_count(state: dict[str, torch.Tensor], norm_suffix: str) -> int:
    return sum(1 for name in state if name.endswith(norm_suffix))


def to_hf(full_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full state (of the model `cfg` describes) in transformers' MistralForCausalLM names."""
    hf = {hf_name: full_state[ours] for ours, hf_name in _GLOBAL_NAMES.items()}
    for i in range(_layer_count(full_state, ".attention_norm.weight")):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        for our_name, hf_name in _LAYER_NAMES.items():
            hf[theirs + hf_name] = full_state[ours + our_name]
        for our_name, hf_names in _FUSED_NAMES.items():
            blocks = full_state[ours + our_name].split(parameter_layout(ours + our_name, cfg).blocks, dim=0)
            hf.update(zip((theirs + hf_name for hf_name in hf_names), blocks, strict=True))
    return {name: tensor.contiguous() for name, tensor in hf.items()}


def from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' MistralForCausalLM state dict as our full state (q/k/v and gate/up fused)."""
    full = {ours: hf_state[hf_name] for ours, hf_name in _GLOBAL_NAMES.items()}
    for i in range(_layer_count(hf_state, ".input_layernorm.weight")):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        for our_name, hf_name in _LAYER_NAMES.items():
            full[ours + our_name] = hf_state[theirs + hf_name]
        for our_name, hf_names in _FUSED_NAMES.items():
            full[ours + our_name] = torch.cat([hf_state[theirs + hf_name] for hf_name in hf_names], dim=0)
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
