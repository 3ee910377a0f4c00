"""The Mistral decoder on megatron-core tensor-parallel layers.

    tokens -> Embedding -> N x DecoderLayer -> OutputHead -> logits (this rank's vocabulary shard)

    DecoderLayer:  h = x + Attention(RMSNorm(x))      rotary positions, grouped-query, sliding window
                   y = h + SwiGLU(RMSNorm(h))

Tensor parallelism (Megatron style): the fused QKV and gate/up projections are column-parallel and
the attention output and down projections row-parallel, so each layer costs one all-reduce per block
in the forward pass. Every rank holds whole query heads and whole kv groups; its slice of the fused
QKV weight is laid out [its q heads, its k heads, its v heads] (`FusedColumnParallelLinear`). The embedding and
the LM head are sharded over the vocabulary and the loss is megatron's vocab-parallel cross entropy. The choice of
layer class is the only statement of the layout: `sharding.py` reads it off these modules to shard, merge and
initialize parameters, and `state_dict_adapter.py` maps the parameters to transformers' names.

Sequence parallelism (`sequence_parallel=True`, tp > 1, megatron-core's own): between the tensor-parallel regions
(norms, residual adds) each rank holds 1/tp of the sequence, in megatron's sequence-first layout [S / tp, B, D].
The embedding reduce-scatters instead of all-reducing, the column-parallel projections all-gather the sequence
before their matmul, the row-parallel ones reduce-scatter after it, and the LM head gathers the whole sequence, so
the loss is computed as without it. The norms' gains see only this rank's tokens: their gradients are summed over
the tensor-parallel ranks in the backward pass. Parameters are the same as without it, and so are checkpoints.

`Embedding`, `DecoderLayer` and `OutputHead` are separate modules so a pipeline engine can place
them on stages. Weights are initialised from a seed independently of the tensor-parallel size.

Context parallelism (`ContextParallel`, cp > 1): each rank holds a contiguous chunk of every sequence (tokens,
labels, activations); its rotary positions start at the chunk's, and its attention gets the keys and values of the
window's reach before the chunk from the ranks before it (context_parallel.py). The loss is this rank's chunk's;
the caller reduces it over the group as over data-parallel ranks.

Inference: `forward(tokens, cache=RollingKVCache)` runs a chunk that continues where the cache stopped (rotary
positions offset, attention over the cached keys); training never passes a cache and computes as before.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Sequence
from typing import Literal

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    set_tensor_model_parallel_attributes,
    vocab_parallel_cross_entropy,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain import parallel
from pretrain.config import ConfigError, ModelConfig
from pretrain.model import traceable_megatron  # noqa: F401  (how compiled layers trace megatron-core)
from pretrain.model.attention import attention, document_ids
from pretrain.model.context_parallel import ContextParallel
from pretrain.model.kv_cache import LayerCache, RollingKVCache
from pretrain.model.sharding import full_shape, parameter_layout, shard_parameter
from pretrain.model.swiglu import swiglu

ActivationCheckpointing = Literal["none", "selective", "full"]
IGNORE_INDEX = -100


def megatron_layer_config(params_dtype: torch.dtype, sequence_parallel: bool = False) -> ModelParallelConfig:
    if sequence_parallel and not torch.cuda.is_available():
        # megatron-core's sequence-parallel gathers and scatters allocate on torch.cuda.current_device().
        raise ConfigError("parallel.sequence_parallel=true runs on CUDA GPUs only: megatron-core's sequence-parallel "
                         "communication allocates on the current CUDA device; set parallel.sequence_parallel=false")
    return ModelParallelConfig(
        tensor_model_parallel_size=parallel.tp_size(),
        sequence_parallel=sequence_parallel,
        # On CPU megatron must allocate on the host; on CUDA it allocates on the current device.
        use_cpu_initialization=not torch.cuda.is_available(),
        # `init_weights` sets every weight itself so that the result does not depend on tp.
        perform_initialization=False,
        params_dtype=params_dtype,
    )


def _set_by_init_weights(weight: torch.Tensor) -> None:
    """megatron requires an init_method; with perform_initialization=False it is never called."""


def parameter_device(layer_config: ModelParallelConfig) -> torch.device:
    """Where megatron puts the parameters; our own parameters (the norms) go there too."""
    if layer_config.use_cpu_initialization:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


class FusedColumnParallelLinear(ColumnParallelLinear):
    """A column-parallel projection whose output concatenates blocks ([q; k; v], [gate; up]) and returns them apart.

    Each block is split over the tensor-parallel ranks on its own, so a rank's weight rows are [its slice of block
    0; its slice of block 1; ...] and every rank holds whole heads. `block_sizes` are the full (tp=1) sizes.
    """

    def __init__(self, input_size: int, block_sizes: Sequence[int], *, config: ModelParallelConfig):
        super().__init__(input_size, sum(block_sizes), config=config, init_method=_set_by_init_weights, bias=False,
                         gather_output=False)
        self.block_sizes = tuple(block_sizes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tp = self.config.tensor_model_parallel_size
        return self.concatenated(x).split([size // tp for size in self.block_sizes], dim=-1)

    def concatenated(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's blocks side by side, as one tensor (..., sum of the block sizes / tp)."""
        out, _ = super().forward(x)
        return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, layer_config: ModelParallelConfig):
        super().__init__()
        self.eps = eps
        self.sequence_parallel = layer_config.sequence_parallel
        self.weight = nn.Parameter(
            torch.ones(dim, dtype=layer_config.params_dtype, device=parameter_device(layer_config))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the input dtype, as transformers' MistralRMSNorm does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # Sequence parallel: this rank's gradient covers its slice of the sequence; the identity's backward sums the
        # slices over the tensor-parallel ranks (as megatron's finalize_model_grads does), whatever the ZeRO stage.
        # The group is passed: without it megatron warns on rank 0 alone, which splits rank 0's compiled graph only.
        weight = (copy_to_tensor_model_parallel_region(self.weight, group=parallel.tp_group())
                  if self.sequence_parallel else self.weight)
        return weight * x32.to(x.dtype)


@functools.lru_cache(maxsize=8)
def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """float32 [S, head_dim] tables, computed exactly as transformers' default rotary embedding."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    positions = torch.arange(seq_len, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(device), angles.sin().to(device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, D]; cos, sin: [S, D]."""
    cos = cos.to(x.dtype)[None, :, None, :]
    sin = sin.to(x.dtype)[None, :, None, :]
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_config: ModelParallelConfig, recompute_core: bool,
                 context_parallel: ContextParallel | None = None):
        super().__init__()
        self.cfg = cfg
        self.recompute_core = recompute_core
        self.context_parallel = context_parallel
        self.sequence_first = layer_config.sequence_parallel
        q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.qkv_proj = FusedColumnParallelLinear(cfg.dim, [q_rows, kv_rows, kv_rows], config=layer_config)
        self.out_proj = RowParallelLinear(
            cfg.n_heads * cfg.head_dim,
            cfg.dim,
            config=layer_config,
            init_method=_set_by_init_weights,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
        )

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None, cache: LayerCache | None = None) -> torch.Tensor:
        """doc_ids: those of the keys ([B, S], or [B, halo + S] with context parallelism), or None."""
        head_dim = self.cfg.head_dim
        cp = self.context_parallel
        q, k, v = self.qkv_proj(x)  # [B, S, heads of this rank * D]; sequence parallel: [S, B, ...]
        if self.sequence_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        batch, seq_len, _ = q.shape
        q, k, v = (t.view(batch, seq_len, -1, head_dim) for t in (q, k, v))  # [B, S, heads of this rank, D]
        start = cache.start if cache is not None else cp.chunk_start(seq_len) if cp is not None else 0
        cos, sin = rotary_cos_sin(start + seq_len, head_dim, self.cfg.rope_theta, x.device)
        q, k = apply_rotary(q, cos[start:], sin[start:]), apply_rotary(k, cos[start:], sin[start:])
        if cache is not None:
            out, _ = self.out_proj(cache.attend(q, k, v).flatten(2))
            return out
        if cp is not None:
            k, v = cp.extend_keys(k, v, self.cfg.key_reach)  # [B, halo + S, heads of this rank, D]
        core_args = (q, k, v, self.cfg.sliding_window, self.cfg.attention_backend, doc_ids)
        if self.recompute_core and torch.is_grad_enabled():
            # Selective recomputation: the attention core's activations are large and cheap to redo.
            out = checkpoint(attention, *core_args, use_reentrant=False)
        else:
            out = attention(*core_args)
        out = out.flatten(2)  # [B, S, heads of this rank * D]
        out, _ = self.out_proj(out.transpose(0, 1).contiguous() if self.sequence_first else out)
        return out


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_config: ModelParallelConfig):
        super().__init__()
        self.gate_up_proj = FusedColumnParallelLinear(cfg.dim, [cfg.hidden_dim, cfg.hidden_dim], config=layer_config)
        self.down_proj = RowParallelLinear(
            cfg.hidden_dim,
            cfg.dim,
            config=layer_config,
            init_method=_set_by_init_weights,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.down_proj(swiglu(self.gate_up_proj.concatenated(x)))  # [gate | up] (..., 2F) -> (..., F)
        return out


class Embedding(nn.Module):
    """Token ids [B, S] -> hidden states [B, S, dim], the table sharded over the vocabulary.

    Sequence parallel: this rank's slice of the sequence, sequence first [S / tp, B, dim]."""

    def __init__(self, cfg: ModelConfig, layer_config: ModelParallelConfig):
        super().__init__()
        self.token_embedding = VocabParallelEmbedding(
            cfg.vocab_size, cfg.dim, init_method=_set_by_init_weights, config=layer_config,
            reduce_scatter_embeddings=layer_config.sequence_parallel,
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer_config: ModelParallelConfig,
        activation_checkpointing: ActivationCheckpointing = "none",
        context_parallel: ContextParallel | None = None,
    ):
        super().__init__()
        self.recompute_layer = activation_checkpointing == "full"
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, layer_config)
        self.attention = Attention(cfg, layer_config, recompute_core=activation_checkpointing == "selective",
                                   context_parallel=context_parallel)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, layer_config)
        self.mlp = SwiGLU(cfg, layer_config)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        if self.recompute_layer and torch.is_grad_enabled():
            return checkpoint(self._forward, x, doc_ids, cache, use_reentrant=False)
        return self._forward(x, doc_ids, cache)

    def _forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None, cache: LayerCache | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), doc_ids, cache)
        return h + self.mlp(self.mlp_norm(h))

    def compile_computation(self) -> None:
        """torch.compile the layer's computation but not its call: hooks on the layer (ZeRO-3 gathers and frees
        its parameters in them) stay eager, outside the graph, so they neither break it nor make it recompile.
        Every layer has the same shapes, so one compiled graph serves them all."""
        self._forward = torch.compile(self._forward)


class OutputHead(nn.Module):
    """Final RMSNorm and the untied LM head; returns this rank's logits shard [B, S, vocab / tp].

    Sequence parallel: the head gathers the whole sequence, sequence first: [S, B, vocab / tp]."""

    def __init__(self, cfg: ModelConfig, layer_config: ModelParallelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, layer_config)
        self.lm_head = ColumnParallelLinear(
            cfg.dim,
            cfg.vocab_size,
            config=layer_config,
            init_method=_set_by_init_weights,
            bias=False,
            gather_output=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.lm_head(self.norm(x))
        return logits

    def compile_computation(self) -> None:
        """torch.compile the norm's computation (its hooks stay eager, as a layer's). Eager, the norm is some ten
        passes over float32 copies of the hidden states per micro-batch, several by PyTorch's non-vectorized
        broadcast kernel; the LM head is one matmul either way."""
        self.norm.forward = torch.compile(self.norm.forward)


def inputs_and_labels(batch: dict[str, torch.Tensor],
                      device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch of samples of seq_len + 1 tokens -> inputs and next-token labels (on `device`); labels that
    the loss mask leaves out (chat data: everything but the assistant's answers) are IGNORE_INDEX. The batch goes to
    the device whole and is sliced there: the loader's tensors are pinned, so the copy runs asynchronously, where
    slices of them would first be copied into pageable memory, and from there synchronously."""
    if device is not None:
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    tokens = batch["tokens"]
    labels = tokens[:, 1:]
    if "loss_mask" in batch:
        labels = labels.masked_fill(~batch["loss_mask"][:, 1:], IGNORE_INDEX)
    return tokens[:, :-1].contiguous(), labels.contiguous()


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 cross entropy summed over positions whose label is not IGNORE_INDEX, their count).

    logits: [B, S, vocab / tp], this rank's shard; labels: [B, S], already shifted (label s is the token that
    follows position s); sequence first ([S, B, vocab / tp] and [S, B]) gives the same sums. Eager, megatron's
    softmax overwrites its float32 copy of the logits in place to save a logits-sized buffer."""
    valid = labels != IGNORE_INDEX
    per_token = vocab_parallel_cross_entropy(logits.float(), labels.masked_fill(~valid, 0))
    return (per_token * valid).sum(), valid.sum()


class VocabParallelLoss:
    """loss(logits, labels, divisor=None): `summed_cross_entropy`'s sum divided by `divisor`, or by the count when
    it is None (the mean; 0 when there are none).

    `compile()` compiles the cross entropy: eager, megatron's float32 softmax over the vocabulary makes about ten
    passes over a logits-sized float32 buffer per micro-batch (1 GB at seq 8192); compiled, they are fused
    (measured on one H200, 8 layers: 17 ms less per 1.5 s step, but 2 GiB more peak memory, see RESULTS.md). The
    division stays eager, so a divisor that changes from step to step does not recompile."""

    def __init__(self):
        self.summed_cross_entropy = summed_cross_entropy

    def compile(self) -> None:
        self.summed_cross_entropy = torch.compile(summed_cross_entropy)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, divisor: float | None = None) -> torch.Tensor:
        total, count = self.summed_cross_entropy(logits, labels)
        return total / (count.clamp(min=1) if divisor is None else divisor)


class Mistral(nn.Module):
    """forward(tokens [B, S], labels [B, S] | None) -> logits shard [B, S, vocab / tp], or the mean loss.

    With context parallelism (parallel.cp > 1) S is this rank's chunk of the sequence.
    With `cache`, tokens are the next chunk of a sequence whose earlier positions the cache holds (inference)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        eos_id: int | None = None,
        activation_checkpointing: ActivationCheckpointing = "none",
        sequence_parallel: bool = False,
        seed: int = 0,
        params_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if cfg.document_masking and eos_id is None:
            raise ValueError(
                "model.document_masking needs the tokenizer's eos_id passed to Mistral(eos_id=...)"
            )
        self.cfg = cfg
        self.eos_id = eos_id
        self.sequence_first = sequence_parallel
        self.context_parallel = ContextParallel.of_current_group()
        layer_config = megatron_layer_config(params_dtype, sequence_parallel)
        self.embedding = Embedding(cfg, layer_config)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, layer_config, activation_checkpointing, self.context_parallel)
            for _ in range(cfg.n_layers)
        )
        self.head = OutputHead(cfg, layer_config)
        self.loss = VocabParallelLoss()
        init_weights(dict(self.named_parameters()), cfg, seed)

    def document_ids(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The document ids of the attention's keys: of `tokens`, after those of the context-parallel halo."""
        if not self.cfg.document_masking:
            return None
        if self.context_parallel is not None:
            tokens = self.context_parallel.extend_tokens(tokens, self.cfg.key_reach)
        return document_ids(tokens, self.eos_id)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                cache: RollingKVCache | None = None, loss_divisor: float | None = None) -> torch.Tensor:
        # Decoding continues one document, so the cache path has no document masking.
        doc_ids = self.document_ids(tokens) if cache is None else None
        h = self.embedding(tokens)
        for index, layer in enumerate(self.layers):
            h = layer(h, doc_ids, None if cache is None else cache.layer(index))
        if cache is not None:
            cache.advance(tokens.shape[1])
        logits = self.head(h)
        if self.sequence_first:  # [S, B, vocab / tp]: the labels are turned rather than the larger logits
            if labels is None:
                return logits.transpose(0, 1)
            return self.loss(logits, labels.t().contiguous(), loss_divisor)
        return logits if labels is None else self.loss(logits, labels, loss_divisor)


@torch.no_grad()
def init_weights(named_parameters: dict[str, nn.Parameter], cfg: ModelConfig, seed: int) -> None:
    """Normal(0, init_std) weights, output projections scaled by 1/sqrt(2 n_layers), norms 1.

    Parameters are named as in the tp=1, pp=1 `Mistral` (a pipeline stage passes its own under those names).
    Each full tensor comes from a generator seeded by (seed, parameter name) on the parameter's device, and this
    rank copies its shard in: the same model for every tp and pp size (on one kind of device: CPU and CUDA
    generators draw different numbers), and no dependence on megatron's RNG state. Drawing on the GPU matters at
    scale: a CPU thread takes about a minute for the 7B, which every rank would spend before its first step.
    Sharded parameters are also marked as megatron's own initialization would mark them: DeepSpeed's
    gradient norm counts a parameter without the mark on tensor-parallel rank 0 only.
    """
    rank, size = parallel.tp_rank(), parallel.tp_size()
    output_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, param in named_parameters.items():
        split_dim = parameter_layout(name, cfg).partition_dim
        if split_dim is None:  # the RMSNorm gains, the only replicated parameters
            param.fill_(1.0)
            continue
        set_tensor_model_parallel_attributes(param, is_parallel=True, dim=split_dim, stride=1)
        # The row-parallel layers are the output projections of the residual branches (attention out, MLP down).
        std = output_std if split_dim == 1 else cfg.init_std
        # The CPU generator keeps 32 bits of its seed, so seed and name are hashed together into 32 bits.
        generator = torch.Generator(param.device).manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        full = torch.empty(full_shape(name, param.shape, cfg, size), device=param.device)
        full.normal_(0.0, std, generator=generator)
        param.copy_(shard_parameter(name, full, cfg, rank, size))
