"""The model wrapped in DeepSpeed's engine on megatron-core's process groups.

pp == 1: `Mistral` in DeepSpeed's engine (ZeRO 0-3). pp > 1: the same stage modules as a DeepSpeed
`PipelineModule` (1F1B over micro-batches, ZeRO 0-1), with a topology whose rank order matches megatron-core's
(tensor-parallel fastest, then data, then pipeline). Parameters carry canonical names (those of the tp=1, pp=1
`Mistral`) so that checkpoints, initialization and export do not depend on the layout.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch._inductor.config

# DeepSpeed picks its accelerator when first imported; without CUDA it must be told to use the CPU.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

import deepspeed  # noqa: E402
from deepspeed.pipe import LayerSpec, PipelineModule  # noqa: E402
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer  # noqa: E402
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology  # noqa: E402
from deepspeed.runtime.zero.utils import ZERO_SUPPORTED_OPTIMIZERS  # noqa: E402
from deepspeed.utils import set_z3_leaf_modules  # noqa: E402
from torch.distributed._symmetric_memory import enable_symm_mem_for_group  # noqa: E402

from pretrain import parallel  # noqa: E402
from pretrain.config import Config, check_zero_stage_for_dtype, grad_accum_steps  # noqa: E402
from pretrain.dtypes import resolve_dtype  # noqa: E402
from pretrain.hardware import concrete_dtype  # noqa: E402
from pretrain.model.float8 import Float8Layers, check_float8_device  # noqa: E402
from pretrain.model.mistral import (  # noqa: E402
    DecoderLayer,
    Embedding,
    Mistral,
    OutputHead,
    VocabParallelLoss,
    init_weights,
    megatron_layer_config,
)
from pretrain.training.converters import build_converters  # noqa: E402
from pretrain.training.optim import GatedAdamW, build_optimizer, build_scheduler  # noqa: E402

_deepspeed_update_hp_grad = BF16_Optimizer._update_hp_grad
# ZeRO takes the optimizers it lists by their exact type; GatedAdamW is torch's AdamW with a gate before its step.
ZERO_SUPPORTED_OPTIMIZERS.append(GatedAdamW)

if torch.cuda.is_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _add_widened(total_ptr, addend_ptr, numel, BLOCK: tl.constexpr):
        """total (float32) += addend (bf16) over `numel` elements; each program adds one BLOCK."""
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < numel
        total = tl.load(total_ptr + offsets, mask=inside)
        addend = tl.load(addend_ptr + offsets, mask=inside).to(tl.float32)
        tl.store(total_ptr + offsets, total + addend, mask=inside)


ADD_BLOCK = 4096  # elements per program: 16 per thread with 8 warps, in 16-byte loads


def accumulate_into_float32(total: torch.Tensor, addend: torch.Tensor) -> None:
    """total (float32) += addend (bf16, as many elements), widening each value in the add. On CUDA in one Triton
    kernel: PyTorch's kernel for an add of mixed dtypes is not vectorized. On one H200, 8 layers of the 7B, these adds
    took 67 ms of a 1.5 s step with PyTorch's kernel, 77 ms compiled by inductor (dynamic shapes) and 38 ms here."""
    if total.is_cuda and total.is_contiguous() and addend.is_contiguous():
        numel = total.numel()
        _add_widened[(triton.cdiv(numel, ADD_BLOCK),)](total, addend, numel, BLOCK=ADD_BLOCK, num_warps=8)
    else:
        total.add_(addend.view(total.shape))


@torch.no_grad()
def _add_bf16_grad_into_float32(self, lp, group_idx, param_idx, clear_lp_grads):
    """DeepSpeed's `BF16_Optimizer._update_hp_grad` without its float32 copy of each bf16 gradient: the add reads
    the bf16 values and widens them itself (the same float32 sums, bit for bit), one pass over the gradient where
    the copy and the add made two and wrote a temporary. It runs once per parameter per micro-batch: on one H200,
    8 layers of the 7B at seq 8192, such copies took about 67 ms of a 1.54 s step. Expert-parallel folding is left to
    DeepSpeed's own."""
    if lp.grad is None or self.autoep_folding_tp_group is not None:
        return _deepspeed_update_hp_grad(self, lp, group_idx, param_idx, clear_lp_grads)
    hp_grad = self.fp32_groups_gradients[group_idx][param_idx]
    accumulate_into_float32(hp_grad, lp.grad)
    lp._hp_grad = hp_grad
    self.fp32_groups_has_gradients[group_idx][param_idx] = True
    if clear_lp_grads:
        lp.grad.zero_()


BF16_Optimizer._update_hp_grad = _add_bf16_grad_into_float32


class MegatronMPU:
    """DeepSpeed's `mpu` interface answered by megatron-core's parallel_state, so both see the same groups. DeepSpeed's
    data-parallel group, over which it averages gradients and partitions ZeRO's state, spans the context-parallel
    ranks too: they hold the same parameters and compute gradients over different tokens."""

    def get_model_parallel_rank(self) -> int:
        return parallel.tp_rank()

    def get_model_parallel_world_size(self) -> int:
        return parallel.tp_size()

    def get_model_parallel_group(self):
        return parallel.tp_group()

    def get_data_parallel_rank(self) -> int:
        return parallel.dp_cp_rank()

    def get_data_parallel_world_size(self) -> int:
        return parallel.dp_cp_size()

    def get_data_parallel_group(self):
        return parallel.dp_cp_group()


def deepspeed_config(cfg: Config) -> dict:
    dtype = resolve_dtype(cfg.train.dtype)
    zero: dict = {"stage": cfg.parallel.zero_stage}
    if cfg.parallel.zero_stage >= 2:
        # Overlap the gradient reduce-scatter with the backward pass.
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=5e8)
    if cfg.parallel.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=5e8, stage3_param_persistence_threshold=1e6)
    return {
        "train_micro_batch_size_per_gpu": cfg.parallel.micro_batch,
        "gradient_accumulation_steps": grad_accum_steps(cfg),
        # DeepSpeed counts a sample per rank of its data-parallel group, which holds each sample's cp chunks.
        "train_batch_size": cfg.train.global_batch * cfg.parallel.cp,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # With bf16, a non-finite gradient norm skips the step (float32 ZeRO always does; optim.py covers stage 0).
        # ZeRO 0-1 accumulate each micro-batch's bf16 gradient into float32 as soon as autograd has it and free it:
        # the same sums as DeepSpeed's default, which keeps the bf16 gradients all step (zeroing them before, and
        # adding into them during, every micro-batch's backward).
        "bf16": {"enabled": dtype == torch.bfloat16, "check_grad_overflow": True, "immediate_grad_update": True},
        # Micro-batches' gradients accumulate in float32. DeepSpeed sums them over data-parallel ranks in the compute
        # dtype unless told otherwise (its communication_data_type defaults to bf16 with bf16 on): the sum's dtype is
        # parallel.grad_reduce_dtype's.
        "data_types": {"grad_accum_dtype": "fp32"} if dtype == torch.bfloat16 else {},
        "communication_data_type": {"float32": "fp32", "bfloat16": "bf16"}[cfg.parallel.grad_reduce_dtype]
        if dtype == torch.bfloat16 else "fp32",
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


class PipelineLoss(VocabParallelLoss):
    """The pipeline's loss function, called by DeepSpeed as loss_fn(logits, labels): the divisor of the step being
    run is set by the trainer before each batch (None is each micro-batch's mean)."""

    divisor: float | None = None

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().__call__(logits, labels, self.divisor)


@dataclass
class Built:
    engine: deepspeed.DeepSpeedEngine
    # parameter -> canonical name (as in the tp=1, pp=1 Mistral)
    canonical_names: dict[torch.nn.Parameter, str]
    # seconds spent building and initializing the model, and in deepspeed.initialize
    setup_s: dict[str, float]
    # the pipeline's loss function (pp > 1), whose divisor the trainer sets per batch
    pipeline_loss: PipelineLoss | None
    # this rank's linear layers that multiply in float8 (train.fp8), and their weights kept in float8
    float8: Float8Layers

    @property
    def pipelined(self) -> bool:
        return self.pipeline_loss is not None


def _stage_prefix(index: int, n_layers: int) -> str:
    if index == 0:
        return "embedding."
    if index == n_layers + 1:
        return "head."
    return f"layers.{index - 1}."


def _canonical(name: str, n_layers: int) -> str:
    """A pipeline module's parameter or submodule name ('3.attention.qkv_proj') as in the pp=1 `Mistral`."""
    index, rest = name.split(".", 1)
    return _stage_prefix(int(index), n_layers) + rest


def build_model(cfg: Config, eos_id: int | None,
                pipeline_loss: PipelineLoss | None) -> tuple[torch.nn.Module, dict[str, torch.nn.Parameter]]:
    """The (possibly pipelined, with `pipeline_loss` as its loss) module on this rank and its parameters by canonical
    name, initialized."""
    m, p = cfg.model, cfg.parallel
    if p.pp == 1:
        model = Mistral(m, eos_id=eos_id, activation_checkpointing=p.activation_checkpointing,
                        sequence_parallel=p.sequence_parallel, seed=cfg.train.seed)
        return model, dict(model.named_parameters())
    layer_config = megatron_layer_config(torch.float32)
    specs = [LayerSpec(Embedding, m, layer_config)]
    specs += [LayerSpec(DecoderLayer, m, layer_config, p.activation_checkpointing) for _ in range(m.n_layers)]
    specs += [LayerSpec(OutputHead, m, layer_config)]
    topology = PipeModelDataParallelTopology(num_pp=p.pp, num_mp=p.tp, num_dp=p.dp)
    model = PipelineModule(layers=specs, topology=topology, loss_fn=pipeline_loss,
                           partition_method="type:DecoderLayer")
    named = {_canonical(name, m.n_layers): param for name, param in model.named_parameters()}
    init_weights(named, m, cfg.train.seed)
    return model, named


def canonical_named_modules(model: torch.nn.Module, cfg: Config) -> Iterator[tuple[str, torch.nn.Module]]:
    """The submodules of `build_model`'s module on this rank, by their names in the pp=1 `Mistral`."""
    for name, module in model.named_modules():
        if cfg.parallel.pp == 1:
            yield name, module
        elif "." in name:  # below a stage (the stages themselves are named by their index only)
            yield _canonical(name, cfg.model.n_layers), module


def build_engine(cfg: Config, eos_id: int | None) -> Built:
    """The initialized model in DeepSpeed's engine; a checkpoint is loaded into it afterwards (Checkpointer.load)."""
    # The config's validation could not check `auto`: what it computes in is known only here.
    check_zero_stage_for_dtype(cfg, concrete_dtype(cfg.train.dtype, on_gpu=torch.cuda.is_available()))
    if cfg.train.fp8 != "off":
        check_float8_device(cfg.train.fp8)
    # DeepSpeed's communication layer adopts the process group parallel.init_distributed started; the pipeline
    # module needs it before deepspeed.initialize would set it up.
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    start = time.perf_counter()
    pipeline_loss = PipelineLoss() if cfg.parallel.pp > 1 else None
    model, named = build_model(cfg, eos_id, pipeline_loss)
    converters = build_converters(cfg)
    converters.convert(canonical_named_modules(model, cfg))
    if torch.cuda.is_available():
        model.cuda()
    built = time.perf_counter()
    if cfg.parallel.zero_stage == 3:
        # ZeRO-3 gathers a decoder layer's parameters all at once, in hooks on the layer alone (none on its
        # sublayers): fewer, larger gathers, and no hook inside the layer's compiled computation.
        set_z3_leaf_modules(model, [DecoderLayer])
    if cfg.parallel.async_tensor_parallel:
        # Read when the layers are compiled (at their first call).
        torch._inductor.config._micro_pipeline_tp = True
        enable_symm_mem_for_group(parallel.tp_group().group_name)
    if cfg.train.compile:
        # The embedding and the LM head's matmul stay eager: compiled, they would fuse nothing.
        for module in model.modules():
            if isinstance(module, DecoderLayer | OutputHead):
                module.compile_computation()
        (pipeline_loss or model.loss).compile()
    optimizer = build_optimizer(model, cfg.optim, cfg.parallel.zero_stage)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg),
        mpu=None if cfg.parallel.pp > 1 else MegatronMPU(),
        # The GPU parallel.init_distributed chose: DeepSpeed would take LOCAL_RANK, which is not the device index
        # where a rank sees only its own GPU (Slurm's --gpus-per-task).
        args=argparse.Namespace(device_rank=torch.cuda.current_device()) if torch.cuda.is_available() else None,
    )
    converters.after_optimizer(engine.optimizer)
    setup_s = {"model_s": built - start, "deepspeed_s": time.perf_counter() - built}
    return Built(engine, {param: name for name, param in named.items()}, setup_s, pipeline_loss, converters.float8)
