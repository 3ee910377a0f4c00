"""The one map from dtype names (train.dtype, the `--dtype` flags of export and generate) to torch dtypes."""

from __future__ import annotations

from typing import get_args

import torch

from pretrain.config import DtypeName
from pretrain.hardware import concrete_dtype

DTYPES: dict[DtypeName, torch.dtype] = {name: getattr(torch, name) for name in get_args(DtypeName)}


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name on this machine (`auto`: bfloat16 on a GPU, float32 on CPU)."""
    return DTYPES[concrete_dtype(name, on_gpu=torch.cuda.is_available())]
