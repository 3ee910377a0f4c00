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
    if doc_ids is None and (window is None or window >= seq_len):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    elif doc_ids is None and (not q.is_cuda or q.dtype in (torch.float16, torch.bfloat16)):  # flash's dtypes
        group = q.shape[1] // k.shape[1]
        out = sliding_window_flash(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), window)
    else:
        mask = _window_mask(seq_len, window, q.device)
        if doc_ids is not None:
            same_doc = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
            mask = mask & same_doc
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


def sliding_window_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal attention over the `window` most recent keys, from PyTorch's causal flash kernel.

    q, k, v: [B, H, S, D] with as many kv heads as query heads. The sequence is cut into chunks of `window`
    (zero-padded at the end, which no real query can see). A query at offset a of chunk c sees the keys of its own
    chunk up to a (causal) and the keys of chunk c-1 after offset a; reversed in time, that second set is causal too.
    So each part is one batched causal flash call over all chunks, and the parts merge by their log-sum-exps.
    """
    seq_len = q.shape[2]
    padded = -(-seq_len // window) * window
    if padded != seq_len:
        q, k, v = (F.pad(t, (0, 0, 0, padded - seq_len)) for t in (q, k, v))
    return _SlidingWindowFlash.apply(q, k, v, window)[:, :, :seq_len]


def _flash_forward(q, k, v):
    """Causal flash attention: (output, log-sum-exp [B, H, S] in float32, what the backward needs besides)."""
    if q.is_cuda:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
    return out, lse, ()


def _flash_backward(grad_out, q, k, v, out, lse, extras):
    if q.is_cuda:
        cum_q, cum_k, max_q, max_k, seed, offset = extras
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(grad_out, q, k, v, out, lse, 0.0, True)


class _SlidingWindowFlash(torch.autograd.Function):
    """See `sliding_window_flash`. The backward runs the kernel's own backward on each part with the merged output
    and log-sum-exp: its probabilities exp(s - lse) and its rowsum(dO * O) then refer to the union of both key sets,
    which makes each part's gradients exact (the argument ring attention rests on)."""

    @staticmethod
    def forward(ctx, q, k, v, window):
        batch, heads, seq_len, dim = q.shape
        chunks = seq_len // window
        # [B, H, S, D] -> [B * chunks, H, W, D]: every chunk becomes one sequence of the batch.
        qc, kc, vc = (t.unflatten(2, (chunks, window)).transpose(1, 2).flatten(0, 1).contiguous()
                      for t in (q, k, v))
        out, lse, diag_extras = _flash_forward(qc, kc, vc)
        out, lse = out.float(), lse.float().contiguous()
        lag_inputs = lag_extras = None
        if chunks > 1:
            lag_inputs = _lag_inputs(qc, kc, vc, batch, chunks)
            lag_out, lag_lse, lag_extras = _flash_forward(*lag_inputs)
            # Back to forward time: rows 0 .. W-2 of chunks 1 .. n-1 (the last row of a chunk has no such keys).
            lag_out = _later_chunks(lag_out.flip(2), batch, chunks)
            lag_lse = _later_chunks(lag_lse.flip(2), batch, chunks)
            own_out, own_lse = _later_rows(out, batch, chunks), _later_rows(lse, batch, chunks)
            merged = torch.logaddexp(own_lse, lag_lse)
            own_out.copy_(own_out * (own_lse - merged).exp()[..., None] + lag_out * (lag_lse - merged).exp()[..., None])
            own_lse.copy_(merged)
        out = out.to(q.dtype)
        ctx.save_for_backward(qc, kc, vc, out, lse)
        ctx.shape, ctx.extras, ctx.lag_extras = (batch, heads, seq_len, dim, chunks), diag_extras, lag_extras
        return out.unflatten(0, (batch, chunks)).transpose(1, 2).flatten(2, 3)

    @staticmethod
    def backward(ctx, grad_out):
        qc, kc, vc, out, lse = ctx.saved_tensors
        batch, heads, seq_len, dim, chunks = ctx.shape
        window = seq_len // chunks
        grad_c = grad_out.unflatten(2, (chunks, window)).transpose(1, 2).flatten(0, 1).contiguous()
        dq, dk, dv = _flash_backward(grad_c, qc, kc, vc, out, lse, ctx.extras)
        if chunks > 1:
            lag_inputs = _lag_inputs(qc, kc, vc, batch, chunks)
            lag_grad, lag_out, lag_lse = (_later_rows(t, batch, chunks).flip(3).flatten(0, 1).contiguous()
                                          for t in (grad_c, out, lse))
            lag_dq, lag_dk, lag_dv = _flash_backward(lag_grad, *lag_inputs, lag_out, lag_lse, ctx.lag_extras)
            _later_rows(dq, batch, chunks).add_(_later_chunks(lag_dq.flip(2), batch, chunks))
            for grad, lag in ((dk, lag_dk), (dv, lag_dv)):
                grad.unflatten(0, (batch, chunks))[:, :-1, :, 1:].add_(lag.flip(2).unflatten(0, (batch, chunks - 1)))
        grads = (g.unflatten(0, (batch, chunks)).transpose(1, 2).flatten(2, 3) for g in (dq, dk, dv))
        return (*grads, None)


def _lag_inputs(qc, kc, vc, batch, chunks):
    """Time-reversed inputs of the lagged part: queries 0 .. W-2 of chunks 1 .. n-1 and keys 1 .. W-1 of chunks
    0 .. n-2. Query a sees key b when b > a; reversed, query row W-2-a sees key row W-1-b, which is causal."""
    q = qc.unflatten(0, (batch, chunks))[:, 1:, :, :-1]
    k, v = (t.unflatten(0, (batch, chunks))[:, :-1, :, 1:] for t in (kc, vc))
    return tuple(t.flip(3).flatten(0, 1).contiguous() for t in (q, k, v))


def _later_rows(t, batch, chunks):
    """View of rows 0 .. W-2 of chunks 1 .. n-1 of a [B * chunks, H, W, ...] tensor."""
    return t.unflatten(0, (batch, chunks))[:, 1:, :, :-1]


def _later_chunks(t, batch, chunks):
    """[B * (chunks - 1), H, W - 1, ...] -> [B, chunks - 1, H, W - 1, ...], matching `_later_rows`."""
    return t.unflatten(0, (batch, chunks - 1))


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



def _flex(q, k, v, window, doc_ids):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    seq_len = q.shape[2]
    if doc_ids is None:
        block_mask = _cached_block_mask(seq_len, window, q.device)
    else:
        block_mask = _document_block_mask(seq_len, window, doc_ids)
    if q.is_cuda:
        out = _compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=True)
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
