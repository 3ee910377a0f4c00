"""DeepSpeed's engine as the trainer configures it, in one process."""

from __future__ import annotations

import importlib

import pytest
import torch

from pretrain.config import load_config, resolve_world
from tests.runs import ROOT


def _train_bf16(deepspeed_default: bool, monkeypatch) -> tuple[list[float], list[torch.Tensor], list[bool]]:
    """3 bf16 ZeRO-1 steps of 2 micro-batches on the tiny model, configured as the trainer does or with DeepSpeed's
    default accumulation (and its own float32 add): losses, final weights, and per step whether every bf16 gradient
    was gone after the first micro-batch's backward."""
    # Imported here with DS_ACCELERATOR set for this test only: the module sets it in os.environ when missing, which
    # every later subprocess of the suite would inherit (DeepSpeed then no longer warns at import in a rank's log).
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    engine_module = importlib.import_module("pretrain.engine")
    cfg = resolve_world(load_config(ROOT / "configs" / "tiny.yaml", [
        "train.dtype=bfloat16", "train.global_batch=4", "parallel.micro_batch=2", "parallel.zero_stage=1",
        "data.tokenizer=null", "model.attention_backend=sdpa"]), 1)
    configured = engine_module.deepspeed_config(cfg)
    if deepspeed_default:
        configured["bf16"].pop("immediate_grad_update", None)
        monkeypatch.setattr(engine_module.BF16_Optimizer, "_update_hp_grad", engine_module._deepspeed_update_hp_grad)
    monkeypatch.setattr(engine_module, "deepspeed_config", lambda _: configured)
    monkeypatch.setenv("LOCAL_RANK", "0")
    engine = engine_module.build_engine(cfg, eos_id=None).engine
    generator = torch.Generator().manual_seed(0)
    losses, freed = [], []
    for _ in range(3):
        for micro in range(engine.gradient_accumulation_steps()):
            tokens = torch.randint(0, cfg.model.vocab_size, (2, 65), generator=generator)
            loss = engine(tokens[:, :-1], tokens[:, 1:])
            engine.backward(loss)
            if micro == 0:
                freed.append(all(param.grad is None for param in engine.module.parameters()))
            engine.step()
        losses.append(loss.item())
    return losses, [param.detach().clone() for param in engine.module.parameters()], freed


def test_bf16_gradients_accumulate_in_float32_as_they_come(single_process_group, monkeypatch):
    """The trainer's bf16 ZeRO-1 frees each bf16 gradient once it is added into float32 (without a float32 copy of
    it), and trains bit for bit as DeepSpeed's default, which keeps them until the step."""
    losses, weights, freed = _train_bf16(False, monkeypatch)
    reference_losses, reference_weights, reference_freed = _train_bf16(True, monkeypatch)
    assert freed == [True] * 3 and reference_freed == [False] * 3
    assert losses == reference_losses
    assert all(torch.equal(a, b) for a, b in zip(weights, reference_weights, strict=True))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_float32_accumulation_of_bf16_gradients_is_exact_in_backward_hooks(device, monkeypatch):
    """The add the trainer's bf16 ZeRO-1 does once per parameter and micro-batch, called as DeepSpeed calls it (in a
    hook during backward, into views of one flat float32 buffer, some not 16-byte aligned): the float32 sums of the
    widened values, bit for bit, at every size, and nothing outside each view written."""
    monkeypatch.setenv("DS_ACCELERATOR", "cuda" if device == "cuda" else "cpu")
    accumulate = importlib.import_module("pretrain.engine").accumulate_into_float32
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
