"""Typed run configuration: YAML presets, dotted overrides, and validation before anything starts.

Every failure is a `ConfigError` whose message is one line naming the key and the fix.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key and the fix."""


# The dtypes a run computes in, by name; pretrain.dtypes maps them to torch's. `auto` picks one by device.
DtypeName = Literal["bfloat16", "float32"]
# torchao's float8 training recipes (train.fp8): one scale per tensor, or one per row (finer, more accurate).
Float8Recipe = Literal["tensorwise", "rowwise"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    dim: int = Field(4096, gt=0)
    n_layers: int = Field(32, gt=0)
    n_heads: int = Field(32, gt=0)
    n_kv_heads: int = Field(8, gt=0)
    head_dim: int = Field(128, gt=0)
    hidden_dim: int = Field(14336, gt=0)
    vocab_size: int = Field(32000, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    # Attention reaches the `sliding_window` most recent positions, itself included (transformers' count);
    # null means full causal attention.
    sliding_window: int | None = Field(4096, gt=0)
    max_seq_len: int = Field(8192, gt=0)
    attention_backend: Literal["auto", "cudnn", "flash", "flex", "sdpa"] = "auto"
    document_masking: bool = False
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _shape(self) -> ModelConfig:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.n_kv_heads}: "
                "grouped-query attention needs whole groups; pick n_kv_heads dividing n_heads"
            )
        if self.sliding_window is not None and self.sliding_window > self.max_seq_len:
            raise ValueError(
                f"model.sliding_window={self.sliding_window} is larger than model.max_seq_len={self.max_seq_len}: "
                "set sliding_window <= max_seq_len, or null for full attention"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"model.head_dim={self.head_dim} is odd: rotary embeddings rotate pairs of dimensions; "
                "choose an even head_dim"
            )
        return self

    @property
    def key_reach(self) -> int | None:
        """How many positions before its own a query's keys reach: W - 1, unbounded (None) without a window."""
        return None if self.sliding_window is None else self.sliding_window - 1


class ParallelConfig(_Section):
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    # Context parallelism: each sequence split into cp contiguous chunks, one per rank of a context-parallel group; a
    # rank receives the keys and values of the sliding window's reach before its chunk from the ranks before it.
    cp: int = Field(1, ge=1)
    # null: derived from the world size as world / (tp * pp * cp).
    dp: int | None = Field(None, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 1
    micro_batch: int = Field(1, ge=1)
    # With tp > 1: norms and residual adds hold 1/tp of the sequence each (megatron-core's sequence parallelism).
    sequence_parallel: bool = False
    # With sequence parallelism and compile: each all-gather and the matmul that takes its output, and each matmul and
    # the reduce-scatter of its output, run as one fused kernel pipeline that overlaps the transfer with the GEMM
    # (inductor's async tensor parallelism over symmetric memory on the tensor-parallel group).
    async_tensor_parallel: bool = False
    # selective recomputes the attention core in backward: it saves memory only where the kernel would keep the
    # S x S scores (SDPA with an explicit mask, the CPU path); the fused GPU kernels keep q, k, v and the output,
    # which the layer keeps anyway. full recomputes the whole decoder layer and keeps only its input.
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    # The dtype the data-parallel ranks sum their gradients in. float32, as Megatron does for bf16: in bf16 every sum
    # rounds to 8 significant bits (1 + 2^-12 and 1 + 3 * 2^-12 average to 1 instead of 1 + 2^-11). bfloat16 halves
    # the bytes of the all-reduce (ZeRO 0-1) or reduce-scatter (ZeRO 2-3) at that cost, for bandwidth-bound runs.
    grad_reduce_dtype: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _combinations(self) -> ParallelConfig:
        if self.pp > 1 and self.zero_stage > 1:
            raise ValueError(
                f"parallel.zero_stage={self.zero_stage} with parallel.pp={self.pp}: DeepSpeed's pipeline engine "
                "runs only ZeRO 0 or 1; set parallel.zero_stage=1 or parallel.pp=1"
            )
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tp > 1: it splits the sequence over the "
                             "tensor-parallel ranks; set parallel.tp=2 or more, or sequence_parallel=false")
        if self.async_tensor_parallel and not self.sequence_parallel:
            raise ValueError("parallel.async_tensor_parallel=true needs parallel.sequence_parallel=true: it overlaps "
                             "the sequence-parallel gathers and scatters with their matmuls; set both or neither")
        if self.cp > 1 and self.pp > 1:
            raise ValueError(f"parallel.cp={self.cp} with parallel.pp={self.pp}: DeepSpeed's pipeline engine passes "
                             "whole sequences between stages; set parallel.cp=1 or parallel.pp=1")
        if self.sequence_parallel and self.pp > 1:
            raise ValueError(
                f"parallel.sequence_parallel=true with parallel.pp={self.pp}: the pipeline stages do not pass "
                "sequence-parallel activations on; set parallel.sequence_parallel=false or parallel.pp=1"
            )
        return self


class DataSource(_Section):
    path: str
    weight: float = Field(1.0, gt=0)


class DataConfig(_Section):
    # Directories written by `pretrain data prepare` (each holds a manifest.json), mixed by weight.
    train: list[DataSource] = Field(default_factory=list)
    eval: str | None = None
    tokenizer: str | None = None
    seq_len: int = Field(2048, gt=0)
    # Processes that read the training data (0: the rank itself); evaluation reads in the rank (build_loader).
    num_workers: int = Field(1, ge=0)
    seed: int = 1234
    skip_corrupt_shards: bool = False
    # Train (and evaluate) only on the tokens the shards mark: chat data from `pretrain data prepare --chat`, whose
    # mask covers the assistant's answers. The shards must carry a mask exactly when this is true.
    loss_mask: bool = False


class OptimConfig(_Section):
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    # WSD only: the fraction of the steps spent in the final decay.
    decay_fraction: float = Field(0.2, gt=0, le=1)

    @model_validator(mode="after")
    def _lrs(self) -> OptimConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr} exceeds optim.lr={self.lr}: set min_lr <= lr")
        return self


class SpikeGuardConfig(_Section):
    """A finite step whose loss or gradient norm lies more than `sigmas` standard deviations above the mean of the
    last `window` applied steps is not applied, like a non-finite one (OLMo-core's SkipStepAdamW, used for OLMo 3 7B:
    6 sigma over 128 steps). It judges once the window holds `min_steps` values (OLMo-core: half the window)."""

    enabled: bool = True
    window: int = Field(128, ge=2)
    sigmas: float = Field(6.0, gt=0)
    min_steps: int = Field(64, ge=2)

    @model_validator(mode="after")
    def _min_steps_fit(self) -> SpikeGuardConfig:
        if self.min_steps > self.window:
            raise ValueError(f"train.spike_guard.min_steps={self.min_steps} exceeds window={self.window}, which "
                             "never holds that many steps: set min_steps <= window")
        return self


class TrainConfig(_Section):
    steps: int = Field(1000, gt=0)
    # In sequences; gradient accumulation = global_batch / (micro_batch * dp).
    global_batch: int = Field(8, gt=0)
    seed: int = 1234
    # auto: bfloat16 on a GPU, float32 on CPU.
    dtype: Literal["auto", DtypeName] = "auto"
    compile: bool = False
    # Bitwise reproducible runs on GPUs (pretrain/training/determinism.py): two runs of the same command, and a run
    # resumed mid-way, compute the same bits; at some cost in tokens/s (benchmarks/RESULTS.md). CPU runs are so
    # already.
    deterministic: bool = False
    # FP8 matmuls in the linear layers (pretrain/model/float8.py): weights, optimizer state and checkpoints stay as
    # they are, so a run resumes with it on or off. GPUs with float8 tensor cores only (Ada, Hopper and later).
    fp8: Literal["off", Float8Recipe] = "off"
    # With fp8: the linear layers that stay in bf16, as patterns over their names (linear_layer_names), e.g.
    # head.lm_head, layers.0.*, layers.*.mlp.down_proj.
    fp8_bf16_layers: list[str] = Field(default_factory=lambda: ["head.lm_head"])
    eval_every: int = Field(0, ge=0)
    eval_steps: int = Field(10, gt=0)
    run_dir: str = "runs/default"
    # Fine-tuning: a run directory or checkpoint whose weights a run starts from when its run directory holds no
    # checkpoint yet; the optimizer, schedule, data order and step count start fresh.
    init_from: str | None = None
    # A rank that makes no progress (a micro-batch, an evaluation batch, a save...) for this many seconds is a hang:
    # the run names where each rank waits in one line, writes every thread's stack to RUN_DIR/hangs/ and exits 124
    # (pretrain.training.hang). Many times the longest wait between two progress marks (seconds on the 7B), yet a
    # hang is named within about a minute.
    hang_timeout_s: int = Field(60, gt=0)
    # The same until the first step ends (imports, rendezvous, DeepSpeed and its op builds, the checkpoint, compiling
    # step 1: 90 s on the 7B), while torch.compile compiles, and while a checkpoint is written or read whole.
    startup_timeout_s: int = Field(600, gt=0)
    # How long a rank waits for rank 0's rendezvous (MASTER_ADDR:MASTER_PORT) before it gives up with an error.
    rendezvous_timeout_s: int = Field(300, gt=0)
    # A step whose loss or gradients are not finite, or that spike_guard calls a spike, is skipped; after this many
    # skipped in a row the run reloads its newest checkpoint and goes on past the data that caused them, at most
    # max_rollbacks times.
    spike_guard: SpikeGuardConfig = Field(default_factory=SpikeGuardConfig)
    max_skipped_in_row: int = Field(5, ge=1)
    max_rollbacks: int = Field(3, ge=0)
    # Tests of the above: the 1-based global batches (as the data loader counts them) whose loss is made NaN, as a
    # bad batch would make it, or multiplied by SPIKE_FACTOR (pretrain.training.spike_guard), as a batch of
    # garbage would raise it. Announced at the start of the run; pp == 1 only.
    inject_nonfinite_batches: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list)
    inject_spike_batches: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list)
    # A test of what a crash leaves behind: the last rank raises an error in this step (0: never), as a bug or a
    # lost device would; a save still being written completes first. Announced at the start of the run.
    inject_error_at_step: int = Field(0, ge=0)
    # A test of hang reports: after this step (0: never) the last rank hangs, as inject_hang says: "collective" skips
    # the step's stop-signal poll (the others wait for it there; it waits in the next step's first collective),
    # "eval_data" waits forever for its evaluation data. Announced at the start of the run.
    inject_hang_at_step: int = Field(0, ge=0)
    inject_hang: Literal["collective", "eval_data"] = "collective"

    @field_validator("fp8", mode="before")
    @classmethod
    def _fp8_off(cls, value: Any) -> Any:
        """YAML reads a bare `off` (fp8: off, train.fp8=off) as false."""
        return "off" if value is False else value


class CheckpointConfig(_Section):
    every_steps: int = Field(500, ge=0)
    # Save when the run reaches train.steps (benchmarks turn it off: the full 7B's state is 87 GB). A stop signal
    # saves regardless.
    save_final: bool = True
    keep_last: int = Field(2, ge=1)
    keep_every: int = Field(0, ge=0)
    async_save: bool = True


class LoggingConfig(_Section):
    every_steps: int = Field(10, gt=0)
    tensorboard: bool = True
    wandb_project: str | None = None
    # Profile steps profile_step .. profile_step + 2 (0: off): a trace and the top kernels in RUN_DIR/profile/.
    profile_step: int = Field(0, ge=0)
    # Dense peak TFLOP/s of one GPU in train.dtype, which MFU divides by; null: the datasheet figure of the GPU's
    # name (pretrain.hardware), and no MFU for a GPU not listed there.
    peak_tflops: float | None = Field(None, gt=0)


class LaunchConfig(_Section):
    # In-job restarts (launch/restarts.py): after a rank crashes or hangs, the launcher ends the others and starts
    # every rank again from the newest complete checkpoint, at most this many times per `pretrain train` (per run of
    # a Slurm job); 0: never.
    max_restarts: int = Field(3, ge=0)


# A Slurm time limit: minutes, MM:SS, HH:MM:SS, with an optional D- before.
SLURM_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


class SlurmConfig(_Section):
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    # CPU nodes: processes per node when there are no GPUs.
    tasks_per_node: int = Field(1, ge=1)
    cpus_per_task: int = Field(1, ge=1)
    partition: str | None = None
    time: str = "01:00:00"
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str = "pretrain"
    max_requeues: int = Field(3, ge=0)
    signal_seconds: int = Field(120, ge=1)

    @field_validator("time")
    @classmethod
    def _slurm_time(cls, limit: str) -> str:
        if not SLURM_TIME.fullmatch(limit.strip()):
            raise ValueError(f"slurm.time={limit!r} is not a Slurm time: write HH:MM:SS, D-HH:MM:SS or minutes")
        return limit


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @model_validator(mode="after")
    def _cross_sections(self) -> Config:
        m, p = self.model, self.parallel
        fitting_tp = _divisors(math.gcd(m.n_heads, m.n_kv_heads, m.hidden_dim, m.vocab_size))
        for name, size, reason, fix in (
            ("model.n_heads", m.n_heads, "each tensor-parallel rank holds whole heads", ""),
            ("model.n_kv_heads", m.n_kv_heads, "each tensor-parallel rank holds whole heads", ""),
            ("model.hidden_dim", m.hidden_dim, "each tensor-parallel rank holds an equal slice of the MLP",
             f"set hidden_dim to a multiple of {p.tp} or "),
            ("model.vocab_size", m.vocab_size, "each tensor-parallel rank holds an equal slice of the vocabulary",
             f"pad vocab_size to a multiple of {p.tp} or "),
        ):
            if size % p.tp:
                raise ValueError(f"{name}={size} is not divisible by parallel.tp={p.tp}: {reason}; "
                                 f"{fix}choose tp from {fitting_tp}")
        if m.n_layers % p.pp:
            raise ValueError(
                f"model.n_layers={m.n_layers} is not divisible by parallel.pp={p.pp}: "
                f"choose pp from {_divisors(m.n_layers)}"
            )
        if m.document_masking and p.pp > 1:
            raise ValueError(
                f"model.document_masking=true with parallel.pp={p.pp}: the pipeline stages do not pass document "
                "boundaries on; set model.document_masking=false or parallel.pp=1"
            )
        if m.document_masking and self.data.loss_mask:
            raise ValueError(
                "model.document_masking=true with data.loss_mask=true: in chat data every answer ends with </s>, so "
                "each turn would be cut off from the conversation before it; set model.document_masking=false"
            )
        if m.document_masking and self.data.tokenizer is None:
            raise ValueError(
                "model.document_masking=true needs data.tokenizer: its end-of-document token marks where "
                "documents end; set data.tokenizer or model.document_masking=false"
            )
        if m.attention_backend in ("cudnn", "flash") and self.train.dtype == "float32":
            raise ValueError(
                f"model.attention_backend={m.attention_backend} with train.dtype=float32: its kernels compute in "
                "float16 or bfloat16 only; set train.dtype=bfloat16 (or auto, on GPUs) or attention_backend to flex "
                "or sdpa"
            )
        if self.data.seq_len > m.max_seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}: "
                "shorten data.seq_len or raise model.max_seq_len"
            )
        if self.data.seq_len % p.cp:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} is not divisible by parallel.cp={p.cp}: each context-parallel rank "
                f"holds an equal chunk of the sequence; set seq_len to a multiple of {p.cp} or change parallel.cp"
            )
        if p.sequence_parallel and (self.data.seq_len // p.cp) % p.tp:
            chunk = "" if p.cp == 1 else f" (its chunk of {self.data.seq_len // p.cp} tokens at parallel.cp={p.cp})"
            raise ValueError(
                f"data.seq_len={self.data.seq_len}{chunk} is not divisible by parallel.tp={p.tp}: with "
                "parallel.sequence_parallel=true each tensor-parallel rank holds an equal slice of the sequence; "
                f"set seq_len to a multiple of {p.tp * p.cp} or sequence_parallel=false"
            )
        if p.async_tensor_parallel and not self.train.compile:
            raise ValueError("parallel.async_tensor_parallel=true needs train.compile=true: the compiler fuses each "
                             "gather or scatter with its matmul; set train.compile=true or async_tensor_parallel=false")
        for injected in ("inject_nonfinite_batches", "inject_spike_batches"):
            if getattr(self.train, injected) and p.pp > 1:
                raise ValueError(f"train.{injected} works with parallel.pp=1 only: set parallel.pp=1 or "
                                 f"train.{injected}=[]")
        check_zero_stage_for_dtype(self, self.train.dtype)  # `auto` is checked when the engine is built
        self._check_fp8()
        if p.dp is not None:
            check_batch(self, p.dp)
        return self

    def _check_fp8(self) -> None:
        """The devices are checked when the engine is built (pretrain.model.float8.check_float8_device)."""
        t = self.train
        if t.fp8 == "off":
            return
        if t.dtype == "float32":
            raise ValueError(f"train.fp8={t.fp8} with train.dtype=float32: float8 training casts bfloat16 "
                             "activations; set train.dtype=bfloat16 (or auto, on GPUs) or train.fp8=off")
        names = linear_layer_names(self.model)
        for pattern in t.fp8_bf16_layers:
            if not fnmatch.filter(names, pattern):
                last = self.model.n_layers - 1
                raise ValueError(f"train.fp8_bf16_layers: {pattern!r} matches no linear layer; they are named "
                                 f"layers.N.{{{','.join(DECODER_LINEAR_LAYERS)}}} (N from 0 to {last}) and "
                                 "head.lm_head: fix the pattern")
        m, p = self.model, self.parallel
        # cuBLAS multiplies float8 only in sizes that are multiples of 16 (the rows, inner and output sizes).
        sizes = {"parallel.micro_batch x data.seq_len / parallel.cp (the tokens of a matmul)":
                 p.micro_batch * self.data.seq_len // p.cp,
                 "model.dim": m.dim,
                 "model.n_heads x model.head_dim / parallel.tp": m.n_heads * m.head_dim // p.tp,
                 "model.n_kv_heads x model.head_dim / parallel.tp": m.n_kv_heads * m.head_dim // p.tp,
                 "model.hidden_dim / parallel.tp": m.hidden_dim // p.tp}
        if not any(fnmatch.fnmatchcase("head.lm_head", pattern) for pattern in t.fp8_bf16_layers):
            sizes["model.vocab_size / parallel.tp"] = m.vocab_size // p.tp
        for name, size in sizes.items():
            if size % 16:
                raise ValueError(f"train.fp8={t.fp8}: {name} is {size}, and float8 matmuls take only multiples of "
                                 "16: change it, or set train.fp8=off")

    @property
    def model_parallel_size(self) -> int:
        """The ranks that hold one data-parallel replica: tensor, pipeline and context parallel."""
        return self.parallel.tp * self.parallel.pp * self.parallel.cp


# The projections of a decoder layer and the LM head: pretrain/model/mistral.py's linear layers, by canonical name
# (tests/test_float8.py checks that the model has exactly these).
DECODER_LINEAR_LAYERS = ("attention.qkv_proj", "attention.out_proj", "mlp.gate_up_proj", "mlp.down_proj")


def linear_layer_names(model: ModelConfig) -> list[str]:
    """The canonical names of the model's linear layers, in order."""
    return [f"layers.{i}.{name}" for i in range(model.n_layers) for name in DECODER_LINEAR_LAYERS] + ["head.lm_head"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_zero_stage_for_dtype(cfg: Config, dtype: str) -> None:
    """Refuse ZeRO stage 0 in bfloat16 (`dtype`: train.dtype, or what `auto` is on this machine): DeepSpeed 0.19 takes
    bfloat16 with float32 gradient accumulation only under ZeRO (its BF16_Optimizer) and raises a bare
    NotImplementedError at stage 0; bfloat16 accumulation instead would change the numerics."""
    if cfg.parallel.zero_stage == 0 and dtype == "bfloat16":
        given = "" if cfg.train.dtype == dtype else f" (train.dtype={cfg.train.dtype} on a GPU)"
        raise ConfigError(
            f"parallel.zero_stage=0 with bfloat16{given}: DeepSpeed keeps float32 master weights and float32 "
            "gradient accumulation only under ZeRO (stage 1 at dp=1 partitions nothing and costs nothing); set "
            "parallel.zero_stage=1 (or train.dtype=float32)"
        )


def check_batch(cfg: Config, dp: int) -> None:
    unit = cfg.parallel.micro_batch * dp
    if cfg.train.global_batch % unit:
        raise ValueError(
            f"train.global_batch={cfg.train.global_batch} is not divisible by parallel.micro_batch * dp = "
            f"{cfg.parallel.micro_batch} * {dp} = {unit}: set global_batch to a multiple of {unit}"
        )


def resolve_world(cfg: Config, world_size: int) -> Config:
    """The config with `parallel.dp` derived from the world size; raises ConfigError if they do not fit."""
    mp = cfg.model_parallel_size
    if world_size % mp:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp * parallel.pp * parallel.cp = "
            f"{cfg.parallel.tp} * {cfg.parallel.pp} * {cfg.parallel.cp} = {mp}: launch a multiple of {mp} processes "
            "or change tp/pp/cp"
        )
    dp = world_size // mp
    if cfg.parallel.dp is not None and cfg.parallel.dp != dp:
        raise ConfigError(
            f"parallel.dp={cfg.parallel.dp} does not match world size {world_size} / (tp*pp*cp={mp}) = {dp}: "
            f"set parallel.dp={dp} or null, or launch {cfg.parallel.dp * mp} processes"
        )
    try:
        check_batch(cfg, dp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    data = cfg.model_dump()
    data["parallel"]["dp"] = dp
    return Config.model_validate(data)


def grad_accum_steps(cfg: Config) -> int:
    assert cfg.parallel.dp is not None, "resolve_world first"
    return cfg.train.global_batch // (cfg.parallel.micro_batch * cfg.parallel.dp)


def default_world_size(cfg: Config) -> int:
    """The world a config describes on its own: explicit dp, else its Slurm allocation, else one replica."""
    if cfg.parallel.dp is not None:
        return cfg.model_parallel_size * cfg.parallel.dp
    per_node = cfg.slurm.gpus_per_node or cfg.slurm.tasks_per_node
    if cfg.slurm.nodes * per_node > 1:
        return cfg.slurm.nodes * per_node
    return cfg.model_parallel_size


# ---------------------------------------------------------------- loading and overrides


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML preset, apply `a.b=value` overrides, and validate. Raises ConfigError."""
    data = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        apply_override(data, item)
    return validate(data)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A preset, with `inherit: other.yaml` (relative to it) merged underneath, so layouts restate no model."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass a YAML file such as configs/tiny.yaml")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} inherits itself: remove the cycle in its inherit: keys")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, parallel:, ...)")
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    return _merge(_read_yaml(path.parent / str(parent), seen + (path.resolve(),)), data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_sections else value
    return merged


def apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not KEY=VALUE: write it like optim.lr=3e-4")
    parts = key.strip().split(".")
    if len(parts) == 2 and (parts[0], parts[1]) in _RENAMED_KEYS:
        parts[1] = _RENAMED_KEYS[parts[0], parts[1]]
    _check_path(parts)
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node[parts[-1]] = value


def _check_path(parts: list[str]) -> None:
    """Unknown keys in overrides get the same nearest-name hint as unknown keys in YAML."""
    model: type[BaseModel] | None = Config
    for i, part in enumerate(parts):
        if model is None:
            break
        fields = model.model_fields
        if part not in fields:
            raise ConfigError(_unknown_key_message(".".join(parts[: i + 1]), part, list(fields)))
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _unknown_key_message(dotted: str, name: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"did you mean {dotted.rsplit('.', 1)[0] + '.' if '.' in dotted else ''}{near[0]}?" if near else ""
    return f"unknown config key {dotted}: {hint or 'valid keys here are ' + ', '.join(valid)}".rstrip()


# Keys by their earlier names, (section, key) -> key: configs, run directories and checkpoints that use them still
# read. train.watchdog_s (no step within so many seconds) became train.hang_timeout_s (no progress within them);
# train.max_nonfinite_in_row became train.max_skipped_in_row when loss spikes came to be skipped too.
_RENAMED_KEYS = {("train", "watchdog_s"): "hang_timeout_s", ("train", "max_nonfinite_in_row"): "max_skipped_in_row"}


def validate(data: dict[str, Any]) -> Config:
    data = dict(data)
    for (section, old), new in _RENAMED_KEYS.items():
        if isinstance(data.get(section), dict) and old in data[section]:
            data[section] = {new: data[section][old], **{k: v for k, v in data[section].items() if k != old}}
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, data)) from None


def _describe(error: ValidationError, data: dict[str, Any]) -> str:
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    dotted = ".".join(loc)
    if first["type"] == "extra_forbidden":
        section: type[BaseModel] = Config
        for part in loc[:-1]:
            annotation = section.model_fields[part].annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                section = annotation
        return _unknown_key_message(dotted, loc[-1], list(section.model_fields))
    if first["type"] == "value_error":
        return str(first["ctx"]["error"]) if "ctx" in first else first["msg"]
    if first["type"] == "model_type" and not loc:
        return ("config must be a mapping of sections: model, parallel, data, optim, train, checkpoint, logging, "
                "launch, slurm")
    value = first.get("input")
    return f"config key {dotted or '<root>'}={value!r}: {first['msg'].lower()}; fix the value in the YAML or override"


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def check_paths(cfg: Config, *, need_data: bool = True) -> None:
    """Training needs its data and tokenizer on disk; say which path is missing and how to make it."""
    if cfg.data.tokenizer is not None and not Path(cfg.data.tokenizer).exists():
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer} does not exist: train one with `pretrain tokenizer train` "
            "or point it at a tokenizer directory"
        )
    if cfg.train.init_from is not None and not Path(cfg.train.init_from).is_dir():
        raise ConfigError(f"train.init_from={cfg.train.init_from} is not a directory: name a run directory or one "
                          "of its checkpoints (RUN_DIR/checkpoints/step_N)")
    if not need_data:
        return
    if not cfg.data.train:
        raise ConfigError("data.train is empty: list prepared data directories, e.g. data.train=[{path: data/shards}]")
    for i, source in enumerate(cfg.data.train):
        if not (Path(source.path) / "manifest.json").is_file() and "://" not in source.path:
            raise ConfigError(
                f"data.train[{i}].path={source.path} has no manifest.json: prepare it with "
                "`pretrain data prepare --out " + source.path + "`"
            )
    local_eval = cfg.data.eval is not None and "://" not in cfg.data.eval
    if local_eval and not (Path(cfg.data.eval) / "manifest.json").is_file():
        raise ConfigError(f"data.eval={cfg.data.eval} has no manifest.json: prepare it or set data.eval=null")


def save_resolved(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
