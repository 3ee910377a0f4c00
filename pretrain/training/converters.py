"""Model converters, as torchtitan's: the changes made to the model's tensor-parallel linear layers before DeepSpeed
wraps it, one ordered list built from the config (`build_converters`) and applied in one place (`ModelConverters`).

Each converter takes some of the linear layers that no converter before it took, and `ModelConverters.taken`
records which one took each layer: the order decides, and it is stated once, in `build_converters`.

- `Float8Training` (train.fp8): float8 matmuls (pretrain/model/float8.py) in every linear layer but those
  train.fp8_bf16_layers names. First: a float8 layer's weight gradient comes from float8's matmul, in bf16.
- `Float32WeightGradients`: the remaining layers' weight-gradient matmuls add into DeepSpeed's float32 gradients
  (pretrain/model/linear.py), which exist once DeepSpeed's optimizer is built (`after_optimizer` attaches them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from pretrain.config import Config, Float8Recipe
from pretrain.dtypes import resolve_dtype
from pretrain.model.float8 import Float8Layers, use_float8
from pretrain.model.linear import use_float32_weight_gradients


class ModelConverter(Protocol):
    name: str

    def convert(self, layers: dict[str, nn.Module]) -> list[str]:
        """Convert some of `layers` (tensor-parallel linear layers by canonical name); returns the names taken."""

    def after_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called with DeepSpeed's optimizer once `deepspeed.initialize` has built it."""


class ModelConverters:
    """The converters in order, applied to the model (`convert`) and to DeepSpeed's optimizer (`after_optimizer`)."""

    def __init__(self, converters: list[ModelConverter]):
        self.converters = converters
        self.taken: dict[str, str] = {}  # linear layer's canonical name -> the name of the converter that took it

    def convert(self, named_modules: Iterable[tuple[str, nn.Module]]) -> None:
        """Convert the linear layers among `named_modules` (canonical name, module), converter by converter, each
        given the layers no converter before it took."""
        linear = {name: module for name, module in named_modules
                  if isinstance(module, ColumnParallelLinear | RowParallelLinear)}
        for converter in self.converters:
            free = {name: module for name, module in linear.items() if name not in self.taken}
            self.taken.update(dict.fromkeys(converter.convert(free), converter.name))

    def after_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for converter in self.converters:
            converter.after_optimizer(optimizer)

    @property
    def float8(self) -> Float8Layers:
        """The layers that multiply in float8 (none without train.fp8)."""
        return next((c.layers for c in self.converters if isinstance(c, Float8Training)), Float8Layers())


def build_converters(cfg: Config) -> ModelConverters:
    """This run's converters, in the order they take layers."""
    converters: list[ModelConverter] = []
    if cfg.train.fp8 != "off":
        # ZeRO-3 holds a weight whole only while its layer runs: there it is cast at each use.
        converters.append(Float8Training(cfg.train.fp8, cfg.train.fp8_bf16_layers,
                                         keep_weights=cfg.parallel.zero_stage < 3))
    # DeepSpeed builds its BF16_Optimizer for bf16 under ZeRO 0-1 (stage 0 with bf16 is refused by the config), its
    # ZeRO optimizers above: only the former keeps each weight's float32 gradient for a matmul to add into.
    if resolve_dtype(cfg.train.dtype) == torch.bfloat16 and cfg.parallel.zero_stage <= 1:
        converters.append(Float32WeightGradients())
    return ModelConverters(converters)


class Float8Training:
    """The linear layers but those `bf16_layers` names multiply in float8 with `recipe` (`use_float8`); `layers`
    holds them and the weights kept in float8, which the trainer refreshes after every change of the weights."""

    name = "float8"

    def __init__(self, recipe: Float8Recipe, bf16_layers: list[str], keep_weights: bool):
        self.recipe, self.bf16_layers, self.keep_weights = recipe, bf16_layers, keep_weights
        self.layers = Float8Layers()

    def convert(self, layers: dict[str, nn.Module]) -> list[str]:
        self.layers = use_float8(layers.items(), self.recipe, self.bf16_layers, keep_weights=self.keep_weights)
        return self.layers.names

    def after_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        pass  # nothing to attach: the float8 casts are made from the weights (Float8Layers.refresh_weights)


class Float32WeightGradients:
    """Each layer's weight-gradient matmul adds into the weight's float32 gradient in DeepSpeed's buffer: where
    DeepSpeed's BF16_Optimizer keeps float32 gradients and adds each micro-batch's into them as autograd produces it
    (immediate_grad_update, engine.deepspeed_config)."""

    name = "float32 weight gradients"

    def __init__(self) -> None:
        self.weights: list[nn.Parameter] = []

    def convert(self, layers: dict[str, nn.Module]) -> list[str]:
        self.weights = use_float32_weight_gradients(layers.values())
        return list(layers)

    def after_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        assert isinstance(optimizer, BF16_Optimizer) and optimizer.immediate_grad_update, (
            f"float32 weight gradients need DeepSpeed's BF16_Optimizer with immediate_grad_update; DeepSpeed built "
            f"{type(optimizer).__name__} (immediate_grad_update={getattr(optimizer, 'immediate_grad_update', None)}): "
            "build_converters chose them under another condition than DeepSpeed's")
        attach_float32_gradients(optimizer, self.weights)


def _mark_matmul_filled_gradients(optimizer: BF16_Optimizer) -> None:
    """Mark as present the float32 gradients that matmuls fill (the weights with a `main_grad`): the autograd hook
    that marks every other gradient never runs for them, and an unmarked gradient is left out of the norm, the
    non-finite check and the clipping."""
    for group_idx, group in enumerate(optimizer.bf16_groups):
        for param_idx, lp in enumerate(group):
            if hasattr(lp, "main_grad"):
                optimizer.fp32_groups_has_gradients[group_idx][param_idx] = True


_deepspeed_clear_hp_grads = BF16_Optimizer.clear_hp_grads


def _clear_hp_grads_keeping_matmul_filled(self):
    """DeepSpeed's `BF16_Optimizer.clear_hp_grads`, the matmul-filled gradients marked as present again."""
    _deepspeed_clear_hp_grads(self)
    _mark_matmul_filled_gradients(self)


BF16_Optimizer.clear_hp_grads = _clear_hp_grads_keeping_matmul_filled


def attach_float32_gradients(optimizer: BF16_Optimizer, weights: list[nn.Parameter]) -> None:
    """Give each of `weights` its float32 gradient in DeepSpeed's buffer as `weight.main_grad`, where its
    weight-gradient matmul adds (`use_float32_weight_gradients`)."""
    wanted = {id(weight) for weight in weights}
    attached = 0
    for group_idx, group in enumerate(optimizer.bf16_groups):
        for param_idx, lp in enumerate(group):
            if id(lp) in wanted:
                lp.main_grad = lp._hp_grad = optimizer.fp32_groups_gradients[group_idx][param_idx].view(lp.shape)
                attached += 1
    assert attached == len(wanted), "a weight outside DeepSpeed's bf16 groups"
    _mark_matmul_filled_gradients(optimizer)
