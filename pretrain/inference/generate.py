"""Text generation with our own model in one process (tp=1), from a checkpoint or an exported directory.

The prompt is pre-filled in chunks of the cache size (the sliding window W for windowed models, as the Mistral
paper describes), then tokens are decoded one at a time, each step attending over the rolling key/value cache
(pretrain.model.kv_cache). Greedy decoding, or temperature with nucleus (top-p) sampling from a seeded generator.
"""

from __future__ import annotations

import sys
import time

import torch

from pretrain import parallel
from pretrain.checkpoint.weights import Weights
from pretrain.config import ModelConfig
from pretrain.model.attention import resolve_backend
from pretrain.model.kv_cache import RollingKVCache
from pretrain.model.mistral import Mistral, megatron_layer_config, parameter_device
from pretrain.model.sharding import load_full_state

# What the GPU-only attention kernels a run may have trained with need, for the note when they cannot run here.
KERNEL_NEEDS = {"cudnn": "a CUDA GPU, float16 or bfloat16 and the nvidia-cudnn-frontend package",
                "flash": "a CUDA GPU and float16 or bfloat16"}


def runnable_attention(cfg: ModelConfig, dtype: torch.dtype) -> ModelConfig:
    """`cfg` with attention_backend `auto` when the run's backend cannot run on this device and dtype (a run trained
    with cudnn, evaluated on CPU or in float32): the backend is layout only, every kernel computes the same function."""
    device = parameter_device(megatron_layer_config(dtype))
    try:
        resolve_backend(cfg.attention_backend, device, dtype)
    except ValueError:
        kernel = resolve_backend("auto", device, dtype)
        print(f"note: the run trained with attention_backend={cfg.attention_backend}, which needs "
              f"{KERNEL_NEEDS[cfg.attention_backend]} (here {device.type}, {str(dtype).removeprefix('torch.')}); "
              f"using {kernel} here (the same attention)", file=sys.stderr)
        return cfg.model_copy(update={"attention_backend": "auto"})
    return cfg


def build_model(weights: Weights, dtype: torch.dtype, eos_id: int | None = None) -> Mistral:
    """Our Mistral holding `weights`, in eval mode, on the GPU when there is one (inside
    parallel.single_process_group), with an attention kernel that runs there."""
    cfg = runnable_attention(weights.model, dtype)
    if cfg.document_masking and eos_id is None:
        cfg = cfg.model_copy(update={"document_masking": False})
    model = Mistral(cfg, eos_id=eos_id, params_dtype=dtype)
    load_full_state(model, {name: t.to(dtype) for name, t in weights.full_state.items()}, cfg)
    return model.eval()


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy when temperature is 0; otherwise sample from the smallest set of tokens holding top_p of the mass."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the most likely token is always kept
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: Mistral, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, vocab_size: int | None = None,
             progress: bool = False) -> list[int]:
    """The new token ids after `prompt` (stops early at eos_id); vocab_size keeps padded embeddings out."""
    if not prompt:
        raise ValueError("the prompt is empty: encode it with a beginning-of-sequence token at least")
    device = next(model.parameters()).device
    cfg = model.cfg
    cache = RollingKVCache(cfg, local_kv_heads=cfg.n_kv_heads // parallel.tp_size(), batch=1,
                           max_positions=len(prompt) + max_new_tokens, dtype=next(model.parameters()).dtype,
                           device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    start = time.perf_counter()
    for chunk in torch.tensor([prompt], device=device).split(cache.size, dim=1):
        logits = model(chunk, cache=cache)
    prefilled = time.perf_counter()
    new: list[int] = []
    while len(new) < max_new_tokens:
        new.append(next_token(logits[0, -1, :vocab_size], temperature, top_p, generator))
        if new[-1] == eos_id or len(new) == max_new_tokens:
            break
        logits = model(torch.tensor([[new[-1]]], device=device), cache=cache)
    if progress:
        decode_s = time.perf_counter() - prefilled
        print(f"prefill {len(prompt)} tokens in {prefilled - start:.2f} s (chunks of {cache.size}), "
              f"{len(new)} new tokens in {decode_s:.2f} s ({len(new) / max(decode_s, 1e-9):.1f} tokens/s)",
              file=sys.stderr)
    return new
