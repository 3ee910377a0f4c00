"""DeepSpeed's engine as the trainer configures it, in one process."""

from __future__ import annotations

import importlib

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
