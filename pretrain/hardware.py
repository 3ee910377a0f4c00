"""Peak compute of the GPU a run trains on, which MFU divides by.

MFU = achieved model FLOP/s / peak FLOP/s of one GPU in the training dtype. The peak comes from
`logging.peak_tflops` when set, else from DATASHEET_PEAK_TFLOPS by the name torch reports for the device
(`torch.cuda.get_device_name()`). A GPU not in the table gets no MFU rather than a figure of another GPU.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from pretrain.config import Config, DtypeName

# Dense (not sparse) peak TFLOP/s of one GPU from the vendors' datasheets, by training dtype: bfloat16 is the
# tensor-core figure, float32 the plain (non-tensor) one, as the trainer leaves TF32 off. NVIDIA prints Hopper's and
# Blackwell's tensor figures with 2:4 sparsity: dense is half of them (1979 / 2 = 989, as usually quoted). A dtype
# a datasheet does not state is left out. First match wins: the PCIe, NVL and GH200 names come before their family's.
DATASHEET_PEAK_TFLOPS: tuple[tuple[str, str, dict[DtypeName, float]], ...] = (
    # (pattern of the device name, model, {dtype: TFLOP/s})
    (r"\bGH200\b", "NVIDIA GH200", {"bfloat16": 989.0, "float32": 67.0}),
    (r"\bH200 NVL\b", "NVIDIA H200 NVL", {"bfloat16": 835.0, "float32": 60.0}),
    (r"\bH200\b", "NVIDIA H200 SXM", {"bfloat16": 989.0, "float32": 67.0}),
    (r"\bH100 NVL\b", "NVIDIA H100 NVL", {"bfloat16": 835.0, "float32": 60.0}),
    (r"\bH100 PCIe\b", "NVIDIA H100 PCIe", {"bfloat16": 756.0, "float32": 51.0}),
    (r"\bH100\b", "NVIDIA H100 SXM", {"bfloat16": 989.0, "float32": 67.0}),
    (r"\bH800 PCIe\b", "NVIDIA H800 PCIe", {"bfloat16": 756.0, "float32": 51.0}),
    (r"\bH800\b", "NVIDIA H800 SXM", {"bfloat16": 989.0, "float32": 67.0}),
    (r"\bA100\b", "NVIDIA A100", {"bfloat16": 312.0, "float32": 19.5}),
    (r"\bA800\b", "NVIDIA A800", {"bfloat16": 312.0, "float32": 19.5}),
    (r"\bL40S\b", "NVIDIA L40S", {"bfloat16": 362.05, "float32": 91.6}),
    (r"\bB200\b", "NVIDIA B200", {"bfloat16": 2250.0}),
    (r"\bMI300X\b", "AMD Instinct MI300X", {"bfloat16": 1307.4, "float32": 163.4}),
    (r"\bMI325X\b", "AMD Instinct MI325X", {"bfloat16": 1307.4, "float32": 163.4}),
    (r"\bMI250X\b", "AMD Instinct MI250X", {"bfloat16": 383.0, "float32": 47.9}),
)


def datasheet_peak_tflops(device_name: str, dtype: DtypeName) -> tuple[str, float] | None:
    """(model, dense peak TFLOP/s) of the GPU torch names `device_name`, in `dtype`; None if not in the table."""
    for pattern, model, peaks in DATASHEET_PEAK_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return (model, peaks[dtype]) if dtype in peaks else None
    return None


def concrete_dtype(name: str, on_gpu: bool) -> DtypeName:
    """A dtype name with `auto` made concrete: bfloat16 on a GPU, float32 on CPU (slow at bfloat16 matmuls)."""
    if name == "auto":
        return "bfloat16" if on_gpu else "float32"
    return name


def peak_flops(cfg: Config, device_name: str | None, note: Callable[[str], None]) -> float | None:
    """Peak FLOP/s of one GPU of this run, for MFU: logging.peak_tflops, else the datasheet figure of the GPU torch
    names `device_name` (None: no GPU, and no MFU). For a GPU not in the table, None and one line to `note` saying
    which key to set."""
    if device_name is None:
        return None
    if cfg.logging.peak_tflops is not None:
        return cfg.logging.peak_tflops * 1e12
    dtype = concrete_dtype(cfg.train.dtype, on_gpu=True)
    found = datasheet_peak_tflops(device_name, dtype)
    if found is None:
        note(f"MFU is not logged: no datasheet peak of {device_name} in {dtype} is known here; set "
             "logging.peak_tflops=<dense TFLOP/s of one GPU> to log it")
        return None
    return found[1] * 1e12
