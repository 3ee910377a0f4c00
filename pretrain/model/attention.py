"""Causal sliding-window attention with grouped-query heads, behind one function and four backends.

Window rule (transformers' `sliding_window`): query i sees key j when i - window < j <= i, that is the
`window` most recent positions including itself. With document ids, a query sees only keys of its own
document. Query head h reads kv head h // (Hq / Hkv), the grouping of transformers' `repeat_kv`.

Keys may reach further back than the queries (context parallelism: a chunk's queries against the keys of the
window's reach before the chunk, then its own): with Sq queries and Sk >= Sq keys, the queries are the last Sq
positions of the keys' sequence (the causal diagonal aligned at the bottom right), and document ids are the keys'.

Backends:
- `cudnn`: cuDNN's fused attention through cudnn-frontend's PyTorch ops (package `nvidia-cudnn-frontend`, the `gpu`
  extra): its own sliding window, grouped-query heads as they are, documents through its variable-length path, and
  the backward that cudnn-frontend registers for the op (so it also runs inside a compiled layer). CUDA,
  float16/bfloat16.
- `flash`: FlashAttention-2 with its own window and variable-length (document) support; the flash-attn package's
  kernels where it is installed, else the FlashAttention-2 kernels PyTorch ships. CUDA, float16/bfloat16.
- `flex`: FlexAttention with a sliding-window block mask, compiled on CUDA (forward only on CPU: torch has no CPU
  backward for it).
- `sdpa`: scaled_dot_product_attention, with an explicit mask when there is a window or documents: the reference,
  and the one that trains on CPU.
`auto` picks sdpa on CPU and, on CUDA, what measured fastest (see `resolve_backend`).
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

BACKENDS = ("auto", "cudnn", "flash", "flex", "sdpa")
HALF = (torch.float16, torch.bfloat16)


# The probes of what is installed and which GPU this is run once per compilation, their results taken as constants:
# dynamo cannot trace them (find_spec, imports, device queries), and on GPUs they split the compiled decoder layer
# around its attention (4 graph breaks, 6 graphs per layer on an H200 with cudnn).


@torch.compiler.assume_constant_result
@functools.cache
def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def cudnn_sdpa_installed() -> bool:
    """cudnn-frontend is installed and loads (its bindings need the cuDNN library that torch brings); importing its
    op module registers torch.ops.cudnn.sdpa_fwd / sdpa_bwd."""
    if importlib.util.find_spec("cudnn") is None:
        return False
    try:
        import cudnn.sdpa.fwd.torch_op  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


@torch.compiler.assume_constant_result
def cudnn_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in HALF and cudnn_sdpa_installed()


@torch.compiler.assume_constant_result
def hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9


@torch.compiler.assume_constant_result
def flash_available(device: torch.device, dtype: torch.dtype) -> bool:
    """FlashAttention-2 runs on CUDA in half precision: the flash-attn package's kernels where it is installed,
    else the ones PyTorch ships."""
    return (device.type == "cuda" and dtype in HALF
            and (flash_attn_installed() or torch.backends.cuda.is_flash_attention_available()))


def needs_mask(seq_len: int, window: int | None, documents: bool, key_len: int | None = None) -> bool:
    """Whether attention of `seq_len` queries over `key_len` keys (as many by default) is more than plain causal: a
    window inside the keys, documents, or keys that reach before the queries."""
    key_len = seq_len if key_len is None else key_len
    return documents or key_len != seq_len or (window is not None and window < key_len)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, masked: bool = True) -> str:
    """The concrete backend for `backend` on `device` and `dtype`; raises if an explicit choice cannot run there.

    `auto` on CUDA, as measured (benchmarks/RESULTS.md): plain causal attention (`masked` false: no window inside
    the sequence, no documents) goes to scaled_dot_product_attention's fused kernels, the fastest there; a window
    or documents go to cuDNN's sliding-window kernel on Hopper where cudnn-frontend is installed (at 32k with
    window 4096 on an H200: 14.7 ms forward+backward, compiled FlexAttention 19.8 ms), else to the flash-attn
    package where it is installed, else to compiled FlexAttention, which beat the FlashAttention-2 kernels PyTorch
    ships."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        if device.type != "cuda" or not masked:
            return "sdpa"
        if cudnn_available(device, dtype) and hopper(device):
            return "cudnn"
        return "flash" if flash_attn_installed() and flash_available(device, dtype) else "flex"
    if backend == "flash" and not flash_available(device, dtype):
        raise ValueError(
            f"attention backend 'flash' needs CUDA and float16 or bfloat16 (here {device.type}, {dtype}); "
            "use 'flex' or 'sdpa'"
        )
    if backend == "cudnn" and not cudnn_available(device, dtype):
        raise ValueError(
            f"attention backend 'cudnn' needs CUDA, float16 or bfloat16 (here {device.type}, {dtype}) and the "
            "nvidia-cudnn-frontend package, importable (pip install '.[gpu]'); use 'flex' or 'sdpa'"
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
    """Causal attention. q: [B, Sq, Hq, D]; k, v: [B, Sk, Hkv, D] with Sk >= Sq, the queries being the last Sq
    positions; doc_ids: the keys' [B, Sk], or None. Returns [B, Sq, Hq, D]."""
    if k.shape[1] < q.shape[1]:
        raise ValueError(f"{k.shape[1]} keys for {q.shape[1]} queries: the queries are the last keys' positions")
    masked = needs_mask(q.shape[1], window, doc_ids is not None, k.shape[1])
    backend = resolve_backend(backend, q.device, q.dtype, masked)
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    if backend == "cudnn":
        return _cudnn(q, k, v, window, doc_ids)
    if backend == "flash":
        return _flash(q, k, v, window, doc_ids)
    if backend == "flex":
        return _flex(q, k, v, window, doc_ids)
    return _sdpa(q, k, v, window, doc_ids)


# ------------------------------------------------------------------------------------------- sdpa


def _sdpa(q, k, v, window, doc_ids):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    seq_len, key_len = q.shape[2], k.shape[2]
    if not needs_mask(seq_len, window, doc_ids is not None, key_len):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        mask = _window_mask(seq_len, key_len, window, q.device)
        if doc_ids is not None:
            same_doc = doc_ids[:, None, key_len - seq_len:, None] == doc_ids[:, None, None, :]
            mask = mask & same_doc
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=16)
def _window_mask(seq_len: int, key_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[Sq, Sk] boolean, True where query (row) may attend key (column)."""
    query = torch.arange(key_len - seq_len, key_len, device=device)[:, None]
    key = torch.arange(key_len, device=device)[None, :]
    mask = key <= query
    if window is not None:
        mask &= key > query - window
    return mask


# ------------------------------------------------------------------------------------------- flex


def _sliding_causal(window: int | None, offset: int):
    """The mask of query q_idx, at position q_idx + offset of the keys' sequence."""
    def mask_mod(b, h, q_idx, kv_idx):
        causal = kv_idx <= q_idx + offset
        return causal if window is None else causal & (kv_idx > q_idx + offset - window)

    return mask_mod


@functools.lru_cache(maxsize=16)
def _cached_block_mask(seq_len: int, key_len: int, window: int | None, device: torch.device) -> BlockMask:
    return create_block_mask(
        _sliding_causal(window, key_len - seq_len),
        B=None,
        H=None,
        Q_LEN=seq_len,
        KV_LEN=key_len,
        device=device,
        # Uncompiled, create_block_mask materialises the whole [S, S] mask: 1 GB at 32k.
        _compile=device.type == "cuda",
    )


def _document_block_mask(seq_len: int, window: int | None, doc_ids: torch.Tensor) -> BlockMask:
    # Depends on the batch's contents, so it is built per call rather than cached.
    key_len = doc_ids.shape[1]
    offset = key_len - seq_len
    sliding_causal = _sliding_causal(window, offset)

    def mask_mod(b, h, q_idx, kv_idx):
        return sliding_causal(b, h, q_idx, kv_idx) & (doc_ids[b, q_idx + offset] == doc_ids[b, kv_idx])

    return create_block_mask(
        mask_mod,
        B=doc_ids.shape[0],
        H=None,
        Q_LEN=seq_len,
        KV_LEN=key_len,
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
        block_mask = _cached_block_mask(seq_len, k.shape[2], window, q.device)
    else:
        block_mask = _document_block_mask(seq_len, window, doc_ids)
    if q.is_cuda:
        out = _compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=True)
    else:
        out = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    return out.transpose(1, 2)


# ------------------------------------------------------------------------------------------ flash


def _flash(q, k, v, window, doc_ids):
    # flash-attn's window_size=(left, right) lets query i see keys i-left .. i+right, i.e. left+1 keys
    # behind and including itself when right=0. transformers' window W sees the W keys with j > i - W,
    # which are i-W+1 .. i: the same set for left = W - 1. (left = W would reach one key too far.)
    # With more keys than queries both kernels align the causal diagonal (and the window) at the bottom right of
    # each sequence.
    left = -1 if window is None else window - 1
    batch, seq_len, key_len = q.shape[0], q.shape[1], k.shape[1]
    # Always the variable-length entry point: packed documents are its sequences, and without documents each row
    # is one. max_seqlen is the row length (an upper bound for documents), which spares a device-to-host sync.
    cu_seqlens_q, cu_seqlens_k = _cu_seqlens(batch, seq_len, key_len, doc_ids, q.device)
    q, k, v = (t.flatten(0, 1) for t in (q, k, v))
    if flash_attn_installed():
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                     max_seqlen_q=seq_len, max_seqlen_k=key_len, causal=True, window_size=(left, 0))
    else:
        out = _BundledFlash.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, seq_len, key_len, left)
    return out.unflatten(0, (batch, seq_len))


def _cu_seqlens(batch: int, seq_len: int, key_len: int, doc_ids: torch.Tensor | None,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 start offsets of the variable-length sequences in the flattened queries and keys, each followed by its
    total length: the documents of `doc_ids` (the keys'), or each row when there are none. A document's queries are
    those of its positions among the last `seq_len` of the row (none for a document that ends before them)."""
    if doc_ids is None:
        starts_q = torch.arange(0, batch * seq_len, seq_len, device=device)
        starts_k = torch.arange(0, batch * key_len, key_len, device=device)
    else:
        starts_doc = torch.ones_like(doc_ids, dtype=torch.bool)
        starts_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        row, position = torch.nonzero(starts_doc, as_tuple=True)
        starts_k = row * key_len + position
        starts_q = row * seq_len + (position - (key_len - seq_len)).clamp(min=0)
    total_q = torch.tensor([batch * seq_len], device=device)
    total_k = torch.tensor([batch * key_len], device=device)
    return torch.cat([starts_q, total_q]).to(torch.int32), torch.cat([starts_k, total_k]).to(torch.int32)


class _BundledFlash(torch.autograd.Function):
    """The FlashAttention-2 kernels PyTorch ships for scaled_dot_product_attention, called directly for their
    sliding window (window_size_left) and variable-length sequences, which scaled_dot_product_attention does not
    expose. q: [total_q, Hq, D]; k, v: [total_k, Hkv, D] (grouped-query heads natively)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, left):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, True, False,
            window_size_left=left, window_size_right=0)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng_state, unused)
        ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.left = max_seqlen_q, max_seqlen_k, left
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng_state, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, ctx.max_seqlen_q, ctx.max_seqlen_k,
            0.0, True, rng_state, unused, window_size_left=ctx.left, window_size_right=0)
        return dq, dk, dv, None, None, None, None, None


# ------------------------------------------------------------------------------------------ cudnn


def _cudnn(q, k, v, window, doc_ids):
    # cuDNN's window_left=W lets query i see the W most recent keys including its own, i - W + 1 .. i: transformers'
    # window as it is (checked against the explicit mask; flash's left counts one fewer). The op's autograd formula
    # (registered by cudnn-frontend) calls sdpa_bwd with the forward's log-sum-exp.
    # With more keys than queries, causal_bottom_right aligns the diagonal and the window at the bottom right.
    left = -1 if window is None else window
    scale = q.shape[-1] ** -0.5
    batch, seq_len, key_len = q.shape[0], q.shape[1], k.shape[1]
    bottom_right = key_len != seq_len
    if doc_ids is None:
        # BHSD views of the BSHD tensors: the op honours strides, and its output takes q's layout.
        out, _ = torch.ops.cudnn.sdpa_fwd(*(t.transpose(1, 2) for t in (q, k, v)), scale, is_causal=True,
                                          causal_bottom_right=bottom_right, window_left=left, return_lse=True)
        return out.transpose(1, 2)
    cu_seqlens_q, cu_seqlens_k = _cu_seqlens(batch, seq_len, key_len, doc_ids, q.device)
    out, _ = torch.ops.cudnn.sdpa_fwd(*(t.flatten(0, 1) for t in (q, k, v)), scale, is_causal=True,
                                      causal_bottom_right=bottom_right, window_left=left,
                                      cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_k,
                                      max_seqlen_q=seq_len, max_seqlen_kv=key_len, return_lse=True)
    return out.unflatten(0, (batch, seq_len))
