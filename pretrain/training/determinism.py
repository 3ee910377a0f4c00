"""train.deterministic: the same bits from the same command on a GPU.

Without it, three things vary from run to run on a GPU (CPU runs repeat bit for bit already): cuDNN's attention
backward adds the key blocks' contributions to dQ with atomics, in whatever order they land; inductor
benchmarks several variants of some kernels when it compiles them (split reductions, tile sizes) and keeps the fastest
one, which under another process's load may be another, summing in another order; a few PyTorch kernels add with
atomics (index_add_, scatter_add_ and others). With it, cuDNN's backward takes its
deterministic algorithm (cudnn-frontend asks torch.are_deterministic_algorithms_enabled()), inductor picks kernels
without benchmarking (its `deterministic` mode), PyTorch uses its deterministic kernels or refuses an op that has
none, and cuBLAS gets a fixed workspace (its documented condition for reproducible results). Our own Triton kernels
(pretrain/model/swiglu.py, float8.py, the engine's float32 adds) write each output element from one program, in a
fixed order, so they are deterministic in either mode.
"""

from __future__ import annotations

import os

import torch
import torch._inductor.config


def make_deterministic() -> None:
    """Before the model is built and compiled: every later kernel choice is a deterministic one. Nothing on CPU, where
    runs repeat bit for bit already and torch's deterministic kernels only cost time (a step of the tiny model took
    20 times as long with them)."""
    if not torch.cuda.is_available():
        return
    # cuBLAS reads it when it creates a handle (the first matmul); torch checks it in deterministic mode.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch._inductor.config.deterministic = True
