"""Causal sliding-window attention with grouped-query heads, behind one function and three backends.

Window rule (transformers' `sliding_window`): query i sees key j when i - window < j <= i, that is the
`window` most recent positions including itself. With document ids, a query sees only keys of its own
document. Query head h reads kv head h // (Hq / Hkv), the grouping of transformers' `repeat_kv`.

Backends: `flash` (flash-attn, CUDA only), `flex` (FlexAttention; compiled on CUDA; forward only on CPU,
torch has no CPU backward for it) and `sdpa` (scaled_dot_product_attention with an explicit mask; the one
that trains on CPU). `auto` picks flash, then flex on CUDA, and sdpa on CPU.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

BACKENDS = ("auto", "flash", "flex", "sdpa")


@functools.cache
def flash_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for `backend` on `device`; raises if an explicit choice cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    on_cuda = device.type == "cuda"
    if backend == "auto":
        if on_cuda:
            return "flash" if flash_available() else "flex"
        return "sdpa"
    if backend == "flash" and not (on_cuda and flash_available()):
        raise ValueError(
            "attention backend 'flash' needs CUDA and the flash-attn package; use 'flex' or 'sdpa'"
        )
    return backend


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per-position document index inside each packed row: the token after an eos starts a new document."""
    is_eos = (tokens == eos_id).to(torch.int32)
    return torch.cumsum(is_eos, dim=-1) - is_eos


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    backend: str,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention. q: [B, S, Hq, D]; k, v: [B, S, Hkv, D]; doc_ids: [B, S] or None. Returns [B, S, Hq, D]."""
    backend = resolve_backend(backend, q.device)
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    if backend == "flash":
        return _flash(q, k, v, window, doc_ids)
    if backend == "flex":
        return _flex(q, k, v, window, doc_ids)
    return _sdpa(q, k, v, window, doc_ids)


# ------------------------------------------------------------------------------------------- sdpa


def _sdpa(q, k, v, window, doc_ids):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    seq_len = q.shape[2]
    if window is None and doc_ids is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        mask = _window_mask(seq_len, window, q.device)
        if doc_ids is not None:
            same_doc = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
            mask = mask & same_doc
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=16)
def _window_mask(seq_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[S, S] boolean, True where query (row) may attend key (column)."""
    query = torch.arange(seq_len, device=device)[:, None]
    key = torch.arange(seq_len, device=device)[None, :]
    mask = key <= query
    if window is not None:
        mask &= key > query - window
    return mask


# ------------------------------------------------------------------------------------------- flex


def _sliding_causal(window: int | None):
    def mask_mod(b, h, q_idx, kv_idx):
        causal = kv_idx <= q_idx
        return causal if window is None else causal & (kv_idx > q_idx - window)

    return mask_mod


@functools.lru_cache(maxsize=16)
def _cached_block_mask(seq_len: int, window: int | None, device: torch.device) -> BlockMask:
    return create_block_mask(
        _sliding_causal(window),
        B=None,
        H=None,
        Q_LEN=seq_len,
        KV_LEN=seq_len,
        device=device,
        # Uncompiled, create_block_mask materialises the whole [S, S] mask: 1 GB at 32k.
        _compile=device.type == "cuda",
    )


def _document_block_mask(seq_len: int, window: int | None, doc_ids: torch.Tensor) -> BlockMask:
    # Depends on the batch's contents, so it is built per call rather than cached.
    sliding_causal = _sliding_causal(window)

    def mask_mod(b, h, q_idx, kv_idx):
        return sliding_causal(b, h, q_idx, kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return create_block_mask(
        mask_mod,
        B=doc_ids.shape[0],
        H=None,
        Q_LEN=seq_len,
        KV_LEN=seq_len,
        device=doc_ids.device,
        _compile=doc_ids.is_cuda,
    )


@functools.cache
def _compiled_flex_attention():
    # Eager FlexAttention materialises the full score matrix; compiled, it is a fused Triton kernel.
    # Each (shape, requires_grad) pair compiles once; a benchmark sweep or train+eval needs more than dynamo's
    # default of 8 before it would silently fall back to the eager kernel.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


# Every causal row attends at least to itself, and a window's (or document's) blocks form one contiguous run
# per row: both let the kernel skip checks. Measured on an H100 at 32k, window 4096, fwd+bwd: 18.9 -> 17.8 ms.
_FLEX_KERNEL_OPTIONS = {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True}


def _flex(q, k, v, window, doc_ids):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    seq_len = q.shape[2]
    if doc_ids is None:
        block_mask = _cached_block_mask(seq_len, window, q.device)
    else:
        block_mask = _document_block_mask(seq_len, window, doc_ids)
    if q.is_cuda:
        out = _compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=True,
                                         kernel_options=_FLEX_KERNEL_OPTIONS)
    else:
        out = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    return out.transpose(1, 2)


# ------------------------------------------------------------------------------------------ flash


def _flash(q, k, v, window, doc_ids):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    # flash-attn's window_size=(left, right) lets query i see keys i-left .. i+right, i.e. left+1 keys
    # behind and including itself when right=0. transformers' window W sees the W keys with j > i - W,
    # which are i-W+1 .. i: the same set for left = W - 1. (left = W would reach one key too far.)
    window_size = (-1, -1) if window is None else (window - 1, 0)
    if doc_ids is None:
        return flash_attn_func(q, k, v, causal=True, window_size=window_size)
    batch, seq_len = doc_ids.shape
    starts_doc = torch.ones_like(doc_ids, dtype=torch.bool)
    starts_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = torch.nonzero(starts_doc.flatten()).flatten()
    total = torch.tensor([batch * seq_len], device=starts.device)
    cu_seqlens = torch.cat([starts, total]).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    out = flash_attn_varlen_func(
        q.flatten(0, 1),
        k.flatten(0, 1),
        v.flatten(0, 1),
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
        causal=True,
        window_size=window_size,
    )
    return out.unflatten(0, (batch, seq_len))
