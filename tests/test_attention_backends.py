"""The attention backends against an explicit reference, at the window's edge and across documents."""

import pytest
import torch

from pretrain.model.attention import attention, document_ids, resolve_backend

BATCH, SEQ_LEN, Q_HEADS, KV_HEADS, HEAD_DIM, WINDOW = 2, 48, 4, 2, 8, 16
CPU_BACKENDS = ["sdpa", "flex"]


def random_qkv(seed=0, device="cpu", dtype=torch.float32, head_dim=HEAD_DIM):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, SEQ_LEN, Q_HEADS, head_dim, generator=generator)
    k = torch.randn(BATCH, SEQ_LEN, KV_HEADS, head_dim, generator=generator)
    v = torch.randn(BATCH, SEQ_LEN, KV_HEADS, head_dim, generator=generator)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def reference_attention(q, k, v, window, doc_ids=None):
    """Softmax over an explicit mask, kv heads repeated as transformers' repeat_kv does (h -> h // group)."""
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    query = torch.arange(q.shape[1], device=q.device)[:, None]
    key = torch.arange(q.shape[1], device=q.device)[None, :]
    allowed = (key <= query) & (key > query - window if window is not None else True)
    allowed = allowed[None, None]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def packed_tokens(eos_id=0):
    # Documents of uneven lengths; row 1 has an eos as its last token and one right at the start.
    tokens = torch.randint(1, 50, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    tokens[0, [5, 30]] = eos_id
    tokens[1, [0, 20, SEQ_LEN - 1]] = eos_id
    return tokens


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("window", [WINDOW, None])
def test_forward_matches_reference(backend, window):
    q, k, v = random_qkv()
    out = attention(q, k, v, window, backend)
    assert torch.allclose(out, reference_attention(q, k, v, window), atol=1e-5, rtol=1e-5)


# Every backend at the window's and the documents' edges: CPU ones in float32, the CUDA kernels in bfloat16 (head
# dim 16: compiled flex needs at least that).
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
EDGE_CASES = ([pytest.param(b, "cpu", torch.float32, id=f"{b}-cpu") for b in CPU_BACKENDS]
              + [pytest.param(b, "cuda", torch.bfloat16, id=f"{b}-cuda", marks=[pytest.mark.gpu, needs_cuda])
                 for b in ("cudnn", "flash", "flex")])


def keys_seen(marked: int, backend: str, device: str, dtype: torch.dtype, doc_ids=None) -> list[int]:
    """The query positions whose output sees key `marked`: only that key carries a value (1000), so an output is
    non-zero iff its query attends it."""
    q, k, _ = random_qkv(device=device, dtype=dtype, head_dim=16)
    v = torch.zeros(BATCH, SEQ_LEN, KV_HEADS, 16, device=device, dtype=dtype)
    v[:, marked] = 1000.0
    out = attention(q, k, v, WINDOW, backend, doc_ids)
    return (out[:1].abs().amax(dim=(0, 2, 3)) > 0).nonzero().flatten().tolist()


@pytest.mark.parametrize(("backend", "device", "dtype"), EDGE_CASES)
def test_window_edge(backend, device, dtype):
    """Query i attends key i - W + 1 and not key i - W (transformers' rule kv > q - W), and no later key."""
    marked = 20
    assert keys_seen(marked, backend, device, dtype) == list(range(marked, marked + WINDOW))


@pytest.mark.parametrize(("backend", "device", "dtype"), EDGE_CASES)
def test_document_edge(backend, device, dtype):
    """Row 0 has an eos at 5 and 30: the eos ends its document, the next token starts one."""
    doc_ids = document_ids(packed_tokens(), eos_id=0).to(device)
    assert keys_seen(30, backend, device, dtype, doc_ids) == [30]
    assert keys_seen(31, backend, device, dtype, doc_ids) == list(range(31, 31 + WINDOW))


@pytest.mark.parametrize(("backend", "device", "dtype"), EDGE_CASES)
def test_gqa_grouping_matches_transformers(backend, device, dtype):
    """Query head h reads kv head h // (Hq / Hkv): mark kv head 1 and see which query heads change."""
    q, k, _ = random_qkv(device=device, dtype=dtype, head_dim=16)
    v = torch.zeros(BATCH, SEQ_LEN, KV_HEADS, 16, device=device, dtype=dtype)
    v[:, :, 1] = 1.0
    out = attention(q, k, v, WINDOW, backend)
    heads_reading = out.abs().amax(dim=(0, 1, 3)) > 0
    assert heads_reading.tolist() == [False, False, True, True]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("window", [WINDOW, None])
def test_document_masking(backend, window):
    q, k, v = random_qkv()
    doc_ids = document_ids(packed_tokens(), eos_id=0)
    out = attention(q, k, v, window, backend, doc_ids)
    assert torch.allclose(out, reference_attention(q, k, v, window, doc_ids), atol=1e-5, rtol=1e-5)
    # Masking must change something: the first position after an eos no longer sees the previous document.
    assert not torch.allclose(out[0, 6], attention(q, k, v, window, backend)[0, 6], atol=1e-3)


def test_document_ids():
    tokens = torch.tensor([[7, 0, 5, 6, 0, 0, 9], [0, 1, 2, 3, 4, 5, 0]])
    assert document_ids(tokens, eos_id=0).tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]


def test_sdpa_backward_matches_reference():
    q, k, v = (t.requires_grad_() for t in random_qkv())
    doc_ids = document_ids(packed_tokens(), eos_id=0)
    grads = torch.autograd.grad(attention(q, k, v, WINDOW, "sdpa", doc_ids).square().sum(), (q, k, v))
    expected = torch.autograd.grad(reference_attention(q, k, v, WINDOW, doc_ids).square().sum(), (q, k, v))
    for grad, reference in zip(grads, expected, strict=True):
        assert torch.allclose(grad, reference, atol=1e-4, rtol=1e-4)


CUDA_CASES = [("flex", torch.float32), ("flex", torch.bfloat16), ("flash", torch.bfloat16), ("sdpa", torch.bfloat16),
              ("cudnn", torch.bfloat16)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("with_documents", [False, True])
@pytest.mark.parametrize(("backend", "dtype"), CUDA_CASES, ids=[f"{b}-{str(d)[6:]}" for b, d in CUDA_CASES])
def test_cuda_kernels_match_the_reference(backend, dtype, with_documents):
    """The compiled FlexAttention kernel, FlashAttention-2 and cuDNN's at a training-like shape (compiled flex needs
    head dim >= 16; 1000 is not a multiple of the window), forward and backward, against the explicit mask in
    float32."""
    seq_len, window, generator = 1000, 256, torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, seq_len, heads, 128, device="cuda", dtype=dtype, generator=generator).requires_grad_()
               for heads in (8, 2, 2))
    tokens = torch.randint(1, 50, (2, seq_len), device="cuda", generator=generator)
    tokens[0, [100, 600]] = 0
    tokens[1, [0, 300, seq_len - 1]] = 0
    doc_ids = document_ids(tokens, eos_id=0) if with_documents else None
    out = attention(q, k, v, window, backend, doc_ids)
    expected = reference_attention(*(t.float() for t in (q, k, v)), window, doc_ids)
    # float32: TF32 dots (about 3e-4 relative); bf16: about 3e-3. A wrong mask or a NaN is off by order 1.
    bound = 2e-3 if dtype == torch.float32 else 2e-2
    assert ((out.float() - expected).norm() / expected.norm()).item() < bound
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for grad, reference in zip(grads, expected_grads, strict=True):
        assert ((grad.float() - reference).norm() / reference.norm()).item() < bound


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("with_documents", [False, True])
@pytest.mark.parametrize(("backend", "dtype"), CUDA_CASES, ids=[f"{b}-{str(d)[6:]}" for b, d in CUDA_CASES])
def test_cuda_kernels_over_keys_that_start_before_the_queries(backend, dtype, with_documents):
    """Context parallelism's call: the last 600 of 1000 positions as queries against the window's reach before them
    (255 keys) and their own, the causal diagonal at the bottom right. The result and every gradient are those of
    attention over the whole sequence restricted to those queries, against the explicit mask in float32. With
    documents, row 1 has a document that lies wholly among the earlier keys (no query of its own)."""
    seq_len, window, queries, generator = 1000, 256, 600, torch.Generator(device="cuda").manual_seed(1)
    first_key = seq_len - queries - (window - 1)
    q, k, v = (torch.randn(2, seq_len, heads, 128, device="cuda", dtype=dtype, generator=generator).requires_grad_()
               for heads in (8, 2, 2))
    tokens = torch.randint(1, 50, (2, seq_len), device="cuda", generator=generator)
    tokens[0, [100, 600]] = 0
    tokens[1, [0, 200, 300, seq_len - 1]] = 0
    doc_ids = document_ids(tokens, eos_id=0) if with_documents else None
    out = attention(q[:, -queries:], k[:, first_key:], v[:, first_key:], window, backend,
                    None if doc_ids is None else doc_ids[:, first_key:])
    expected = reference_attention(*(t.float() for t in (q, k, v)), window, doc_ids)[:, -queries:]
    bound = 2e-3 if dtype == torch.float32 else 2e-2
    assert ((out.float() - expected).norm() / expected.norm()).item() < bound
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for grad, reference in zip(grads, expected_grads, strict=True):
        assert ((grad.float() - reference).norm() / reference.norm()).item() < bound


def test_backend_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, torch.float32) == "sdpa"
    assert resolve_backend("auto", cuda, torch.float32) == "flex"
    assert resolve_backend("auto", cuda, torch.bfloat16, masked=False) == "sdpa"
    with pytest.raises(ValueError, match="'flash' needs CUDA and float16 or bfloat16"):
        resolve_backend("flash", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="'cudnn' needs CUDA, float16 or bfloat16 .* nvidia-cudnn-frontend"):
        resolve_backend("cudnn", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="not one of"):
        resolve_backend("xformers", cpu, torch.float32)


@pytest.mark.gpu
@needs_cuda
def test_auto_picks_cudnn_on_hopper():
    """With the gpu extra installed (nvidia-cudnn-frontend), a window or documents go to cuDNN's kernel on Hopper."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs a Hopper GPU")
    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "cudnn"
    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16, masked=False) == "sdpa"


@pytest.mark.gpu
@needs_cuda
def test_compiled_attention_with_the_chosen_kernel_is_one_graph():
    """Choosing the kernel (which packages import, which GPU this is) happens at compile time: the compiled call of
    `auto` with a window has no graph break (fullgraph raises at one). With documents the kernels' offsets come from
    a nonzero, whose size dynamo cannot know: that call is not covered."""
    q, k, v = random_qkv(device="cuda", dtype=torch.bfloat16, head_dim=64)
    compiled = torch.compile(attention, backend="eager", fullgraph=True)
    expected = attention(q, k, v, WINDOW, "auto")
    torch.testing.assert_close(compiled(q, k, v, WINDOW, "auto"), expected, rtol=0, atol=0)
