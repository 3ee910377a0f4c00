"""Tensor parallelism in real processes: tp=2 must compute what tp=1 computes on the same weights, without and (on 2
GPUs) with sequence parallelism.

Tolerance: 1e-5 relative. tp changes only the order of float32 sums (row-parallel partial products are
all-reduced, the vocab-parallel softmax reduces max and sum across ranks), which moves results by a few
ulps (~1e-7 relative) per operation; 1e-5 leaves room for that to accumulate over the layers while any
layout mistake (a wrong head or vocab slice) gives errors of order 1.
"""

import re

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pretrain import parallel
from pretrain.config import ConfigError, ModelConfig
from pretrain.model import mistral
from pretrain.model.mistral import Mistral
from pretrain.model.sharding import (
    gather_full_state,
    load_full_state,
    shard_full_state,
    shard_parameter,
    unshard_parameter,
)
from tests.distributed import run_distributed

EOS_ID = 0
CFG = ModelConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    hidden_dim=96,
    vocab_size=128,
    sliding_window=16,
    max_seq_len=64,
    attention_backend="sdpa",
    document_masking=True,
)


def reference_full_state(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Fixed weights, including non-unit norms, built the same way in every process."""
    model = Mistral(cfg, eos_id=EOS_ID, seed=11)
    generator = torch.Generator().manual_seed(2)
    full = gather_full_state(model, cfg)
    for name, tensor in full.items():
        if name.endswith("norm.weight"):
            full[name] = 1.0 + 0.2 * torch.randn(tensor.shape, generator=generator)
    return full


def tp_worker(tp: int, activation_checkpointing: str, sequence_parallel: bool = False,
              compile: bool = False) -> dict | None:
    """On CPU with gloo, on GPUs with NCCL (one per rank); results come back on the host. `compile`: the decoder
    layers and the loss compiled as the trainer compiles them."""
    parallel.init_distributed(tp=tp, pp=1)
    init = gather_full_state(Mistral(CFG, eos_id=EOS_ID, seed=3), CFG)

    with torch.no_grad():
        weights = reference_full_state(CFG)
    model = Mistral(CFG, eos_id=EOS_ID, activation_checkpointing=activation_checkpointing,
                    sequence_parallel=sequence_parallel)
    load_full_state(model, weights, CFG)
    if compile:
        for layer in model.layers:
            layer.compile_computation()
        model.head.compile_computation()
        model.loss.compile()

    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, CFG.vocab_size, (2, 40), generator=generator)
    labels = torch.randint(0, CFG.vocab_size, (2, 40), generator=generator)
    tokens[0, 12] = tokens[1, [3, 25]] = EOS_ID  # packed documents, so document masking is exercised
    labels[1, 30:] = mistral.IGNORE_INDEX  # positions left out of the loss (sequence parallel turns the labels)
    device = model.head.norm.weight.device
    tokens, labels = tokens.to(device), labels.to(device)
    result = {"init": {name: tensor.cpu() for name, tensor in init.items()}, **one_batch(model, tokens, labels)}
    return result if parallel.tp_rank() == 0 else None


def one_batch(model: Mistral, tokens: torch.Tensor, labels: torch.Tensor) -> dict:
    """Forward and backward of one batch: the full logits, this rank's logits shape, the loss and the full
    gradients, in float32 on the host."""
    logits_shard = model(tokens)
    loss = model(tokens, labels)
    loss.backward()
    shards = [torch.empty_like(logits_shard) for _ in range(parallel.tp_size())]
    dist.all_gather(shards, logits_shard.detach().contiguous(), group=parallel.tp_group())
    return {
        "logits": torch.cat(shards, dim=-1).float().cpu(),
        "logits_shard_shape": tuple(logits_shard.shape),
        "loss": loss.item(),
        "grads": {name: grad.float().cpu() for name, grad in gather_full_state(model, CFG, grads=True).items()},
    }


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def one_rank():
    return run_distributed(tp_worker, 1, 1, "none")[0]


def assert_tp2_equals_tp1(two_ranks: dict, one_rank: dict) -> None:
    assert two_ranks["logits_shard_shape"] == (2, 40, CFG.vocab_size // 2)
    assert relative_error(two_ranks["logits"], one_rank["logits"]) < 1e-5
    assert abs(two_ranks["loss"] - one_rank["loss"]) / one_rank["loss"] < 1e-5
    assert two_ranks["grads"].keys() == one_rank["grads"].keys()
    for name, grad in one_rank["grads"].items():
        assert relative_error(two_ranks["grads"][name], grad) < 1e-5, name
    # The seeded initialisation does not depend on the tensor-parallel size.
    for name, tensor in one_rank["init"].items():
        assert torch.equal(two_ranks["init"][name], tensor), name


@pytest.mark.parametrize(("activation_checkpointing", "compile"), [("none", False), ("full", False), ("none", True)])
def test_tp2_equals_tp1(one_rank, activation_checkpointing, compile):
    assert_tp2_equals_tp1(run_distributed(tp_worker, 2, 2, activation_checkpointing, False, compile)[0], one_rank)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize(("activation_checkpointing", "compile"),
                         [("none", False), ("selective", False), ("full", False), ("none", True)])
def test_tp2_sequence_parallel_equals_tp1(one_rank, activation_checkpointing, compile):
    """Sequence parallelism runs on GPUs only (megatron-core allocates its gathers on the current CUDA device).
    Compiled, the layers' collectives are traced (pretrain/model/traceable_megatron.py): on torch 2.11 they once
    compiled to a backward pass that lost every gradient through the layers' branches."""
    assert_tp2_equals_tp1(run_distributed(tp_worker, 2, 2, activation_checkpointing, True, compile)[0], one_rank)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_sequence_parallel_without_cuda_is_refused_with_the_reason(single_process_group):
    with pytest.raises(ConfigError, match=r"^parallel.sequence_parallel=true runs on CUDA GPUs only: megatron-core"):
        Mistral(CFG, eos_id=EOS_ID, sequence_parallel=True)


def test_fused_qkv_shard_holds_whole_heads_of_this_rank():
    head_rows = CFG.head_dim
    # Row r of the full weight holds the value r, so a shard's rows tell which full rows it took.
    full = torch.arange((CFG.n_heads + 2 * CFG.n_kv_heads) * head_rows, dtype=torch.float32)[:, None]
    q_rows, kv_rows = CFG.n_heads * head_rows, CFG.n_kv_heads * head_rows
    shard = shard_parameter("layers.0.attention.qkv_proj.weight", full, CFG, rank=1, size=2)
    expected_q = range(q_rows // 2, q_rows)  # query heads 2 and 3
    expected_k = range(q_rows + kv_rows // 2, q_rows + kv_rows)  # kv group 1
    expected_v = range(q_rows + kv_rows + kv_rows // 2, q_rows + 2 * kv_rows)
    assert shard.flatten().long().tolist() == [*expected_q, *expected_k, *expected_v]
    shards = [shard_parameter("layers.0.attention.qkv_proj.weight", full, CFG, rank, 2) for rank in range(2)]
    assert torch.equal(unshard_parameter("layers.0.attention.qkv_proj.weight", shards, CFG), full)


def test_shard_full_state_round_trips(single_process_group):
    full = reference_full_state(CFG)
    shards = [shard_full_state(full, CFG, rank, 2) for rank in range(2)]
    assert shards[0]["head.lm_head.weight"].shape == (CFG.vocab_size // 2, CFG.dim)
    assert shards[1]["layers.0.mlp.down_proj.weight"].shape == (CFG.dim, CFG.hidden_dim // 2)
    for name, tensor in full.items():
        assert torch.equal(unshard_parameter(name, [shard[name] for shard in shards], CFG), tensor), name


@pytest.mark.parametrize("name", ["layers.0.attention.q_proj.weight", f"layers.{CFG.n_layers}.mlp_norm.weight",
                                  "lm_head.weight"])
def test_unknown_parameter_name_is_refused_not_replicated(name):
    full = torch.zeros(8, 8)
    with pytest.raises(ValueError, match=re.escape(name)):
        shard_parameter(name, full, CFG, rank=0, size=2)
    with pytest.raises(ValueError, match=re.escape(name)):
        unshard_parameter(name, [full, full], CFG)


def test_layer_without_a_tensor_parallel_rule_is_refused(monkeypatch):
    class PlainMLP(nn.Module):  # a layer kind the layout has no rule for
        def __init__(self, cfg: ModelConfig, layer_config):
            super().__init__()
            self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    monkeypatch.setattr(mistral, "SwiGLU", PlainMLP)
    cfg = CFG.model_copy(update={"init_std": 0.01})  # not in the layout cache
    with pytest.raises(TypeError, match=r"layers\.0\.mlp\.proj\.weight \(Linear\.weight\) has no tensor-parallel"):
        shard_parameter("layers.0.mlp.proj.weight", torch.zeros(CFG.dim, CFG.dim), cfg, rank=0, size=2)


def compiled_layer_graphs_worker() -> tuple[int, int]:
    """(graph breaks, graphs) of a tp=2 decoder layer's computation as dynamo traces it, forward and backward twice
    (dynamo alone: where graphs break does not depend on the backend that compiles them)."""
    from torch._dynamo.utils import counters

    parallel.init_distributed(tp=2, pp=1)
    layer = mistral.DecoderLayer(CFG, mistral.megatron_layer_config(torch.float32))
    layer._forward = torch.compile(layer._forward, backend="eager")
    x = torch.randn(2, 40, CFG.dim, requires_grad=True)
    for _ in range(2):
        layer(x).sum().backward()
    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def test_compiled_tensor_parallel_layer_is_one_graph_on_every_rank():
    """Nothing in megatron-core's layers splits the compiled layer: not its rank-0-only warning when a layer passes
    no group (RowParallelLinear does), not the async collectives of its linear backward, not its one-time advice."""
    assert run_distributed(compiled_layer_graphs_worker, 2) == [(0, 1), (0, 1)]


def compiled_loss_graphs_worker() -> tuple[int, int]:
    """(graph breaks, graphs) of the tp=2 cross entropy as the trainer compiles it, forward and backward twice."""
    from torch._dynamo.utils import counters

    parallel.init_distributed(tp=2, pp=1)
    loss = mistral.VocabParallelLoss()
    loss.summed_cross_entropy = torch.compile(mistral.summed_cross_entropy, backend="eager")
    logits = torch.randn(2, 40, CFG.vocab_size // 2, requires_grad=True)
    labels = torch.randint(0, CFG.vocab_size, (2, 40))
    labels[0, :5] = mistral.IGNORE_INDEX
    for divisor in (None, 3.0):  # a divisor that changes does not recompile
        loss(logits, labels, divisor).backward()
    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def test_compiled_vocab_parallel_loss_is_one_graph_on_every_rank():
    """megatron's cross entropy, its three all-reduces over the tensor-parallel group included, compiles whole."""
    assert run_distributed(compiled_loss_graphs_worker, 2) == [(0, 1), (0, 1)]
