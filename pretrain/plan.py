"""Closed-form sizing of a run: parameters, training FLOPs per token, memory per GPU, implied throughput.

Conventions (stated in `pretrain plan` output too):
- FLOPs per token = 6 * (matmul parameters) + 12 * n_layers * n_heads * head_dim * (mean attended keys per query).
  Matmul parameters are every linear layer including the LM head; the input embedding (a lookup) and the norm
  weights are excluded. Attended keys are counted exactly for causal attention: query i (0-based) sees
  min(i + 1, W) keys, so full causal averages (S + 1) / 2, not the S some reports use.
- MFU divides by the peak of one GPU: --peak-tflops, else logging.peak_tflops, else the H100 SXM's datasheet
  figure in the training dtype (pretrain.hardware holds the table), named as such in the output.
- Memory follows the ZeRO paper's accounting with mixed precision: 2 bytes of bf16 weights and 2 of gradients
  per parameter, 12 of optimizer state (float32 master, Adam m and v); float32 training holds 4 + 4 + 8.
- A checkpoint save: each rank copies the float32 master and Adam moments (12 bytes a parameter) of its part of the
  largest stage's shard (1 / (dp x cp) of it) to host memory and communicates none of them
  (pretrain/checkpoint/state.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import Config, ModelConfig
from pretrain.hardware import concrete_dtype, datasheet_peak_tflops

# The GPU a plan assumes when neither --peak-tflops nor logging.peak_tflops gives a peak (the name torch reports).
PLAN_DEFAULT_GPU = "NVIDIA H100 80GB HBM3"


def count_parameters(m: ModelConfig) -> dict[str, int]:
    q = m.dim * m.n_heads * m.head_dim
    kv = 2 * m.dim * m.n_kv_heads * m.head_dim
    o = m.n_heads * m.head_dim * m.dim
    mlp = 3 * m.dim * m.hidden_dim
    layer_norms = 2 * m.dim
    per_layer = q + kv + o + mlp + layer_norms
    counts = {
        "embedding": m.vocab_size * m.dim,
        "per_layer": per_layer,
        "layers": per_layer * m.n_layers,
        "layer_norms": layer_norms * m.n_layers,
        "final_norm": m.dim,
        "lm_head": m.vocab_size * m.dim,
    }
    counts["total"] = counts["embedding"] + counts["layers"] + counts["final_norm"] + counts["lm_head"]
    counts["matmul"] = counts["total"] - counts["embedding"] - counts["layer_norms"] - counts["final_norm"]
    return counts


def mean_attended_keys(seq_len: int, window: int | None) -> float:
    """Mean over queries of the keys a causal (optionally windowed) query attends to, itself included."""
    w = seq_len if window is None else min(window, seq_len)
    # Queries 0..w-1 see 1..w keys; the remaining seq_len - w see w each.
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def flops_per_token(m: ModelConfig, seq_len: int) -> dict[str, float]:
    dense = 6.0 * count_parameters(m)["matmul"]
    # QK^T and PV: 2 matmuls * 2 FLOPs per multiply-add * 3 (forward + backward) = 12 per head dim per key.
    attention = 12.0 * m.n_layers * m.n_heads * m.head_dim * mean_attended_keys(seq_len, m.sliding_window)
    return {"dense": dense, "attention": attention, "total": dense + attention}


def parameters_per_rank(m: ModelConfig, tp: int, pp: int) -> int:
    """The largest shard any rank holds: the first or last pipeline stage, which add embedding or head."""
    c = count_parameters(m)
    sharded_layer = (c["per_layer"] - 2 * m.dim) // tp + 2 * m.dim
    stage_layers = (m.n_layers // pp) * sharded_layer
    vocab_shard = c["embedding"] // tp
    if pp == 1:
        return stage_layers + 2 * vocab_shard + m.dim
    return stage_layers + vocab_shard + m.dim  # the last stage: head plus final norm (first stage: embedding)


def activation_bytes_per_layer(cfg: Config, bytes_per_value: int) -> float:
    """Activations a decoder layer keeps for backward per micro-batch, with a flash-style attention kernel
    (no S x S scores kept). Counts the tensors our layer saves: norm inputs and outputs, q/k/v, attention
    output, gate/up outputs and their product; tensor-parallel shards divide the inner ones."""
    m, p = cfg.model, cfg.parallel
    tokens = cfg.data.seq_len // p.cp * p.micro_batch  # this rank's chunk of each sequence
    qkv = (m.n_heads + 2 * m.n_kv_heads) * m.head_dim
    # Sequence parallelism splits what lies between the tensor-parallel regions (norms, the layer's input) over tp.
    sequence_split = p.tp if p.sequence_parallel else 1
    # Two norm inputs and two norm outputs, full width on every tp rank. Sequence parallelism splits the inputs over
    # tp; the outputs are what the column-parallel projections gather: megatron's eager layer keeps its slice and
    # gathers it again for backward, the compiled layer keeps the gathered whole.
    norm_output_split = 1 if cfg.train.compile else sequence_split
    replicated = 2 * m.dim / sequence_split + 2 * m.dim / norm_output_split
    sharded = qkv + m.n_heads * m.head_dim + 3 * m.hidden_dim
    # Context parallelism: the halo's keys and values, kept with the chunk's for the attention's backward.
    halo = halo_tokens(cfg) * p.micro_batch * 2 * m.n_kv_heads * m.head_dim / p.tp
    full = (tokens * (replicated + sharded / p.tp) + halo) * bytes_per_value
    if p.activation_checkpointing == "full":
        return tokens * m.dim * bytes_per_value / sequence_split
    # selective keeps the same tensors: the recomputed attention core's inputs (q, k, v) are kept for it, and its
    # output is the output projection's input.
    return full


@dataclass(frozen=True)
class MemoryPlan:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits


def bytes_per_parameter(zero_stage: int, mixed_precision: bool) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) bytes per parameter, before ZeRO shards them."""
    if not mixed_precision:
        return 4, 4, 8
    # DeepSpeed's bf16 optimizer for ZeRO 0-1 adds every gradient into a float32 buffer of the whole model (the bf16
    # gradient is freed as it is added): 4 bytes a parameter (full 7B, dp=2: 116.9 GiB planned, 119.4 measured).
    return 2, 4 if zero_stage <= 1 else 2, 12


def memory_per_gpu(cfg: Config, dp: int, mixed_precision: bool = True) -> MemoryPlan:
    m, p = cfg.model, cfg.parallel
    n = parameters_per_rank(m, p.tp, p.pp)
    weight_b, grad_b, optim_b = bytes_per_parameter(p.zero_stage, mixed_precision)
    zero = p.zero_stage
    shards = dp * p.cp  # ZeRO partitions over the context-parallel ranks too
    weights = n * weight_b / (shards if zero >= 3 else 1)
    grads = n * grad_b / (shards if zero >= 2 else 1)
    optim = n * optim_b / (shards if zero >= 1 else 1)
    act_b = 2 if mixed_precision else 4
    layers_per_stage = m.n_layers // p.pp
    # 1F1B keeps up to pp micro-batches in flight on the first stage.
    in_flight = min(p.pp, max(1, cfg.train.global_batch // (p.micro_batch * dp))) if p.pp > 1 else 1
    activations = activation_bytes_per_layer(cfg, act_b) * layers_per_stage * in_flight
    # float32 logits and their gradient for one micro-batch (this rank's chunk), vocab sharded over tp.
    logits = 2 * cfg.data.seq_len // p.cp * p.micro_batch * m.vocab_size / p.tp * 4
    return MemoryPlan(weights, grads, optim, activations, logits)


def checkpoint_bytes_per_rank(cfg: Config, dp: int) -> float:
    """The float32 master weights and Adam moments (12 bytes a parameter) a rank copies to host memory and writes at
    a save: its ZeRO partition of its shard of the largest pipeline stage, or, where every data-parallel rank holds
    the shard whole (float32 at ZeRO stage 0), its share of it."""
    p = cfg.parallel
    return parameters_per_rank(cfg.model, p.tp, p.pp) * 12 / (dp * p.cp)


def halo_tokens(cfg: Config) -> int:
    """Context parallelism: the most positions before its chunk a rank receives keys and values for (the window's
    reach, W - 1, or every position before the last chunk without a window); 0 at cp = 1."""
    reach = cfg.model.key_reach
    before_last_chunk = cfg.data.seq_len - cfg.data.seq_len // cfg.parallel.cp
    return before_last_chunk if reach is None else min(reach, before_last_chunk)


def context_parallel_traffic(cfg: Config, bytes_per_value: int) -> tuple[float, float]:
    """Bytes a rank receives per decoder layer and micro-batch in the forward pass (the backward pass sends as many
    back): (the halo exchange, an all-gather of the whole sequence's keys and values as other frameworks do)."""
    m, p = cfg.model, cfg.parallel
    kv_per_token = 2 * m.n_kv_heads * m.head_dim / p.tp * bytes_per_value * p.micro_batch
    gathered = cfg.data.seq_len * (p.cp - 1) // p.cp
    return halo_tokens(cfg) * kv_per_token, gathered * kv_per_token


def plan_peak_tflops(cfg: Config, flag: float | None) -> tuple[float, str]:
    """The peak TFLOP/s a plan divides by, and where it comes from: --peak-tflops, else logging.peak_tflops, else
    the datasheet figure of PLAN_DEFAULT_GPU (plans are for GPUs, where dtype `auto` is bfloat16)."""
    if flag is not None:
        return flag, "--peak-tflops"
    if cfg.logging.peak_tflops is not None:
        return cfg.logging.peak_tflops, "logging.peak_tflops"
    dtype = concrete_dtype(cfg.train.dtype, on_gpu=True)
    model, tflops = datasheet_peak_tflops(PLAN_DEFAULT_GPU, dtype)
    return tflops, f"{model} datasheet, dense {dtype}; --peak-tflops or logging.peak_tflops for another GPU"


def implied_tokens_per_second_per_gpu(cfg: Config, mfu: float, peak_tflops: float) -> float:
    return mfu * peak_tflops * 1e12 / flops_per_token(cfg.model, cfg.data.seq_len)["total"]


def _count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def describe(cfg: Config, mfu: float, peak_tflops: float | None) -> list[tuple[str, str]]:
    """The rows `pretrain plan` prints, for a config whose world size is resolved (parallel.dp set); `peak_tflops`
    is --peak-tflops (see plan_peak_tflops)."""
    m, p = cfg.model, cfg.parallel
    dp = p.dp
    c = count_parameters(m)
    f = flops_per_token(m, cfg.data.seq_len)
    mixed = cfg.train.dtype != "float32"
    mem = memory_per_gpu(cfg, dp, mixed_precision=mixed)
    weight_b, grad_b, optim_b = bytes_per_parameter(p.zero_stage, mixed)
    window = "full causal" if m.sliding_window is None else f"window {m.sliding_window}"
    sequence_parallel_label = (" (sequence parallel, async)" if p.async_tensor_parallel
                               else " (sequence parallel)" if p.sequence_parallel else "")
    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    peak, peak_source = plan_peak_tflops(cfg, peak_tflops)
    rows = [
        ("layout", f"tp={p.tp}{sequence_parallel_label} pp={p.pp} cp={p.cp} dp={dp} "
                   f"(world {p.tp * p.pp * p.cp * dp}), ZeRO-{p.zero_stage}, "
                   f"micro-batch {p.micro_batch}, grad accumulation {cfg.train.global_batch // (p.micro_batch * dp)}"),
        ("parameters", f"{_count(c['total'])} ({c['total']:,}): embedding {c['embedding']:,}, "
                       f"{m.n_layers} layers x {c['per_layer']:,}, final norm {c['final_norm']:,}, "
                       f"LM head {c['lm_head']:,}"),
        ("parameters per rank", f"{parameters_per_rank(m, p.tp, p.pp):,} (largest pipeline stage, one tp shard)"),
        ("FLOPs per token", f"{f['total']:.4g} = 6 x {c['matmul']:,} matmul params "
                            f"{f['dense']:.4g} + attention {f['attention']:.4g} "
                            f"({window}, seq {cfg.data.seq_len}, "
                            f"{mean_attended_keys(cfg.data.seq_len, m.sliding_window):.1f} mean attended keys, "
                            "exact causal count)"),
        ("tokens per step", f"{tokens_per_step:,} ({cfg.train.global_batch} x {cfg.data.seq_len})"),
        ("memory per GPU", f"{_gib(mem.total)} = weights {_gib(mem.weights)} + gradients {_gib(mem.gradients)} "
                           f"+ optimizer {_gib(mem.optimizer)} + activations {_gib(mem.activations)} "
                           f"({p.activation_checkpointing} checkpointing) + logits {_gib(mem.logits)}"),
        ("precision", (f"bf16 weights, {'fp32' if grad_b == 4 else 'bf16'} gradients, fp32 master + Adam" if mixed
                       else "float32") + f" ({weight_b}+{grad_b}+{optim_b} bytes/param)"),
        ("checkpoint save per rank", f"{_gib(checkpoint_bytes_per_rank(cfg, dp))} of float32 master and Adam state "
                                     "copied to host memory and written; 0 bytes communicated"
                                     + (f" (until 2026-12-07: {_gib(12 * parameters_per_rank(m, p.tp, p.pp))}, "
                                        "12 bytes x parameters per rank, all-reduced over data-parallel ranks)"
                                        if p.zero_stage > 0 or mixed else "")),
        ("throughput at MFU", f"{implied_tokens_per_second_per_gpu(cfg, mfu, peak):,.0f} tokens/s/GPU "
                              f"at {mfu:.0%} of {peak:g} TFLOP/s ({peak_source})"),
    ]
    if p.cp > 1:
        halo, gathered = context_parallel_traffic(cfg, 2 if mixed else 4)
        rows.insert(1, ("context parallel", f"chunks of {cfg.data.seq_len // p.cp:,} tokens; per layer and micro-batch "
                                            f"a rank receives the keys and values of {halo_tokens(cfg):,} positions "
                                            f"before its chunk, {_mib(halo)} (an all-gather of the sequence's: "
                                            f"{_mib(gathered)}), and returns their gradients in the backward pass"))
    return rows
