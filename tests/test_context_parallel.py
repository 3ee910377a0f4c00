"""Context parallelism in real processes (gloo): cp ranks, each holding a contiguous chunk of every sequence and
receiving the window's edge from the ranks before it, must compute what one rank computes over whole sequences.

Tolerance: 1e-6 in float32 (max absolute difference over the largest value). Splitting the sequence changes only
which keys a softmax sums over in which order (the masked ones contribute exact zeros either way); a wrong halo, a
rotary position off by one chunk or a gradient not returned to its sender gives errors of order 1e-2 or more.
"""

import pytest
import torch
import torch.distributed as dist

from pretrain import parallel
from pretrain.model import mistral
from pretrain.model.attention import attention
from pretrain.model.mistral import Mistral
from pretrain.model.sharding import gather_full_state, load_full_state
from tests.distributed import run_distributed
from tests.test_tensor_parallel import CFG, EOS_ID, reference_full_state

SEQ_LEN = 48


def batch(seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two packed rows with documents ending just before, at and across the chunk edges of cp = 2, 3 and 4."""
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(1, CFG.vocab_size, (2, seq_len), generator=generator)
    labels = torch.randint(0, CFG.vocab_size, (2, seq_len), generator=generator)
    tokens[0, [5, 11, 23, 30]] = EOS_ID
    tokens[1, [12, 35]] = EOS_ID
    labels[1, 40:] = mistral.IGNORE_INDEX
    return tokens, labels


def cp_worker(cp: int, tp: int, window: int | None, document_masking: bool = True, compile: bool = False) -> dict:
    """Forward and backward of `batch` at context-parallel size `cp`: the whole sequence's logits, the loss and
    every gradient (averaged over the group, as the trainer and DeepSpeed average them over its ranks)."""
    parallel.init_distributed(tp=tp, pp=1, cp=cp)
    cfg = CFG.model_copy(update={"sliding_window": window, "max_seq_len": SEQ_LEN,
                                 "document_masking": document_masking})
    with torch.no_grad():
        weights = reference_full_state(cfg)
    model = Mistral(cfg, eos_id=EOS_ID)
    load_full_state(model, weights, cfg)
    if compile:
        for layer in model.layers:
            layer.compile_computation()
    tokens, labels = batch(SEQ_LEN)
    chunk_len = SEQ_LEN // cp
    mine = slice(parallel.cp_rank() * chunk_len, (parallel.cp_rank() + 1) * chunk_len)
    # Each chunk's summed loss over the trained tokens of the whole batch, per rank: the trainer's loss divisor.
    divisor = (labels != mistral.IGNORE_INDEX).sum().item() / cp
    logits = model(tokens[:, mine])
    loss = model(tokens[:, mine], labels[:, mine], loss_divisor=divisor)
    loss.backward()
    loss = loss.detach()
    dist.all_reduce(loss, group=parallel.cp_group())
    loss /= cp
    chunks = [torch.empty_like(logits) for _ in range(cp)]
    dist.all_gather(chunks, logits.detach().contiguous(), group=parallel.cp_group())
    logits = torch.cat(chunks, dim=1)
    shards = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(shards, logits, group=parallel.tp_group())
    grads = gather_full_state(model, cfg, grads=True)
    for grad in grads.values():
        dist.all_reduce(grad, group=parallel.cp_group())
        grad /= cp
    return {"logits": torch.cat(shards, dim=-1), "loss": loss.item(), "grads": grads}


def error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def assert_same(ours: dict, reference: dict) -> None:
    assert ours["logits"].shape == reference["logits"].shape == (2, SEQ_LEN, CFG.vocab_size)
    assert error(ours["logits"], reference["logits"]) < 1e-6
    assert abs(ours["loss"] - reference["loss"]) < 1e-6 * reference["loss"]
    assert ours["grads"].keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        assert error(ours["grads"][name], grad) < 1e-6, (name, error(ours["grads"][name], grad))


@pytest.fixture(scope="module")
def whole():
    """cp = 1 results, by (window, document masking)."""
    cache = {}

    def get(window: int | None, document_masking: bool = True) -> dict:
        if (window, document_masking) not in cache:
            cache[window, document_masking] = run_distributed(cp_worker, 1, 1, 1, window, document_masking)[0]
        return cache[window, document_masking]

    return get


@pytest.mark.parametrize(("cp", "window"), [
    (2, 8),      # the window inside a chunk of 24: one neighbour
    (4, 16),     # chunks of 12 < W - 1 = 15: two neighbours
    (3, None),   # no window: every rank before
], ids=["cp2-window-in-chunk", "cp4-window-over-two-chunks", "cp3-full-causal"])
def test_context_parallel_equals_whole_sequences(cp, window, whole):
    results = run_distributed(cp_worker, cp, cp, 1, window)
    for result in results:  # every rank ends with the same gathered logits and averaged gradients
        assert_same(result, whole(window))


def test_context_parallel_without_documents_and_compiled(whole):
    assert_same(run_distributed(cp_worker, 2, 2, 1, 8, False, True)[0], whole(8, False))


def test_context_parallel_with_tensor_parallel(whole):
    """cp = 2 x tp = 2 on 4 ranks: megatron's order puts the tensor-parallel ranks fastest."""
    assert_same(run_distributed(cp_worker, 4, 2, 2, 16)[0], whole(16))


@pytest.mark.parametrize("window", [None, 5, 12])
@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_attention_over_longer_keys_is_the_tail_of_the_whole(backend, documents, window):
    """Queries against keys that start before them (a chunk against [halo; chunk]): the last rows of attention over
    the whole sequence. flex runs its forward pass only on CPU."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 20, 4, 16, generator=generator)
    k, v = (torch.randn(2, 20, 2, 16, generator=generator) for _ in range(2))
    doc_ids = torch.tensor([[0] * 7 + [1] * 9 + [2] * 4, [0] * 15 + [1] * 5]) if documents else None
    whole_out = attention(q, k, v, window, "sdpa", doc_ids)
    reach = 8 if window is None else min(window - 1, 8)  # the keys before position 8 that its queries see
    for halo in sorted({reach, 8}):  # exactly the reach (as context parallelism passes), and more
        keys = slice(8 - halo, 20)
        out = attention(q[:, 8:], k[:, keys], v[:, keys], window, backend,
                        None if doc_ids is None else doc_ids[:, keys])
        torch.testing.assert_close(out, whole_out[:, 8:], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_context_parallel_over_nccl_equals_one_gpu(whole):
    """cp = 2 on 2 GPUs (the exchange over NCCL), compiled, against one GPU (float32, the same kernels)."""
    assert_same(run_distributed(cp_worker, 2, 2, 1, 16, True, True)[0], whole(16))
