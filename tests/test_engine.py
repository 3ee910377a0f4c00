"""DeepSpeed's engine as the trainer configures it, in one process."""

from __future__ import annotations

import importlib

import pytest
import torch

from pretrain.config import load_config, resolve_world
from tests.devices import CPU_AND_CUDA
from tests.runs import ROOT


def _train_bf16(deepspeed_default: bool, monkeypatch) -> dict:
    """3 bf16 ZeRO-1 steps of 2 micro-batches on the tiny model, configured as the trainer does or with DeepSpeed's
    default accumulation (every gradient in bf16, added into float32 by its own add): per step the loss, the
    gradient norm, the float32 gradients before the step and whether every bf16 gradient was gone after the first
    micro-batch's backward; the final weights; the engine."""
    # Imported here with DS_ACCELERATOR set for this test only: the module sets it in os.environ when missing, which
    # every later subprocess of the suite would inherit (DeepSpeed then no longer warns at import in a rank's log).
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    engine_module = importlib.import_module("pretrain.training.engine")
    cfg = resolve_world(load_config(ROOT / "configs" / "tiny.yaml", [
        "train.dtype=bfloat16", "train.global_batch=4", "parallel.micro_batch=2", "parallel.zero_stage=1",
        "data.tokenizer=null", "model.attention_backend=sdpa"]), 1)
    configured = engine_module.deepspeed_config(cfg)
    if deepspeed_default:
        configured["bf16"].pop("immediate_grad_update", None)
        monkeypatch.setattr(engine_module.BF16_Optimizer, "_update_hp_grad", engine_module._deepspeed_update_hp_grad)
        # Without immediate_grad_update there is no float32 gradient for a matmul to add into.
        no_converters = importlib.import_module("pretrain.training.converters").ModelConverters([])
        monkeypatch.setattr(engine_module, "build_converters", lambda _: no_converters)
    monkeypatch.setattr(engine_module, "deepspeed_config", lambda _: configured)
    monkeypatch.setenv("LOCAL_RANK", "0")
    engine = engine_module.build_engine(cfg, eos_id=None).engine
    generator = torch.Generator().manual_seed(0)
    steps = {"loss": [], "grad_norm": [], "gradients": [], "freed": []}
    for _ in range(3):
        for micro in range(engine.gradient_accumulation_steps()):
            tokens = torch.randint(0, cfg.model.vocab_size, (2, 65), generator=generator)
            loss = engine(tokens[:, :-1], tokens[:, 1:])
            engine.backward(loss)
            if micro == 0:
                steps["freed"].append(all(param.grad is None for param in engine.module.parameters()))
        steps["gradients"].append(torch.cat([g.clone() for g in engine.optimizer.fp32_groups_gradients_flat]))
        # What DeepSpeed's norm, non-finite check and clipping read: the gradients it holds as present.
        for_norm, _ = engine.optimizer.get_grads_for_norm()
        steps["grad_norm"].append(torch.cat([g.view(-1) for g in for_norm]).norm().item())
        engine.step()
        steps["loss"].append(loss.item())
    steps["weights"] = [param.detach().clone() for param in engine.module.parameters()]
    steps["engine"] = engine
    return steps


def test_bf16_weight_gradients_go_into_float32_inside_their_matmuls(single_process_group, monkeypatch):
    """The trainer's bf16 ZeRO-1: each linear layer's weight-gradient matmul adds into DeepSpeed's float32 gradient
    (no bf16 weight gradient at all), the other parameters' bf16 gradients are added into float32 and freed as they
    come; it trains as DeepSpeed's default, which rounds each micro-batch's weight gradient to bf16 before adding
    it: the same float32 gradients to that rounding, the same gradient norm (each fused gradient counted in it), the
    same losses."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    ours, reference = _train_bf16(False, monkeypatch), _train_bf16(True, monkeypatch)
    assert ours["freed"] == [True] * 3 and reference["freed"] == [False] * 3
    engine = ours["engine"]
    linear = [module.weight for module in engine.module.modules()
              if isinstance(module, ColumnParallelLinear | RowParallelLinear)]
    assert len(linear) == 4 * 4 + 1  # 4 per decoder layer, and the LM head
    flat = {buffer.untyped_storage().data_ptr() for buffer in engine.optimizer.fp32_groups_gradients_flat}
    assert all(weight.main_grad.dtype == torch.float32 and weight.main_grad.untyped_storage().data_ptr() in flat
               for weight in linear)
    assert not hasattr(reference["engine"].module.layers[0].mlp.gate_up_proj.weight, "main_grad")
    # Step 1 from the same weights: bf16's rounding of each micro-batch's gradient (2^-8 relative) apart; the later
    # steps start from weights that rounding has moved.
    errors = [((got - expected).norm() / expected.norm()).item()
              for got, expected in zip(ours["gradients"], reference["gradients"], strict=True)]
    assert 0 < errors[0] < 4e-3 and max(errors) < 2e-2, errors
    for key in ("loss", "grad_norm"):
        assert ours[key] == pytest.approx(reference[key], rel=1e-3), key
    for got, expected in zip(ours["weights"], reference["weights"], strict=True):
        assert torch.allclose(got.float(), expected.float(), rtol=0.02, atol=1e-3)


@pytest.mark.parametrize(("overrides", "converters"), [
    (["train.dtype=bfloat16", "parallel.zero_stage=1"], ["float32 weight gradients"]),
    (["train.dtype=bfloat16", "parallel.zero_stage=2"], []),
    (["train.dtype=float32", "parallel.zero_stage=1"], []),
    (["train.dtype=bfloat16", "parallel.zero_stage=1", "train.fp8=tensorwise"], ["float8", "float32 weight gradients"]),
    (["train.dtype=bfloat16", "parallel.zero_stage=3", "train.fp8=rowwise"], ["float8"]),
])
def test_the_converters_are_the_configs_in_order(overrides, converters, monkeypatch):
    """Float8 where train.fp8 asks for it, first; the float32 weight gradients where DeepSpeed keeps float32 gradients
    in its BF16_Optimizer (bf16, ZeRO 0-1): build_engine asserts that DeepSpeed agrees."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    build_converters = importlib.import_module("pretrain.training.converters").build_converters
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    assert [converter.name for converter in build_converters(cfg).converters] == converters


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_float32_accumulation_of_bf16_gradients_is_exact_in_backward_hooks(device, monkeypatch):
    """The add the trainer's bf16 ZeRO-1 does once per parameter and micro-batch, called as DeepSpeed calls it (in a
    hook during backward, into views of one flat float32 buffer, some not 16-byte aligned): the float32 sums of the
    widened values, bit for bit, at every size, and nothing outside each view written."""
    monkeypatch.setenv("DS_ACCELERATOR", "cuda" if device == "cuda" else "cpu")
    accumulate = importlib.import_module("pretrain.training.engine").accumulate_into_float32
    generator = torch.Generator(device).manual_seed(0)
    shapes = [(4096, 1024), (1024,), (333, 77), (32000, 64), (5,), (4097,)]
    params = [torch.randn(shape, device=device, generator=generator).bfloat16().requires_grad_() for shape in shapes]
    flat = torch.randn(sum(p.numel() for p in params) + 1, device=device, generator=generator)
    totals = [total.view(p.shape) for total, p in zip(torch.split(flat[:-1], [p.numel() for p in params]), params,
                                                      strict=True)]
    expected = flat.clone()
    for param, total in zip(params, totals, strict=True):
        param.register_post_accumulate_grad_hook(lambda p, total=total: accumulate(total, p.grad))
    for _ in range(2):  # two micro-batches
        scale = torch.randn((), device=device, generator=generator)
        sum((param.float().square() * scale).sum() for param in params).backward()
        expected[:-1] += torch.cat([param.grad.float().view(-1) for param in params])
        for param in params:
            param.grad = None
    assert torch.equal(flat, expected)
