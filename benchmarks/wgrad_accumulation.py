"""What accumulating each weight gradient straight into its float32 gradient saves (issue 31's gradient-accumulation
fusion, pretrain/model/linear.py), measured on the weight-gradient matmuls alone.

    python benchmarks/wgrad_accumulation.py                 # the 8-layer slice of the 7B: seq 8192, 8 micro-batches
    python benchmarks/wgrad_accumulation.py --smoke         # tiny shapes on CPU, to check the script works

Each micro-batch every linear layer's weight gradient dW = dY.T @ X (dY (T, N), X (T, K)) is added into the float32
gradient DeepSpeed keeps (ZeRO-1, bf16). DeepSpeed's way: the matmul writes dW in bf16, then a kernel adds it into
float32 (here the trainer's own, `pretrain.training.engine.accumulate_into_float32`). The fused way, the trainer's
for bf16 layers: one matmul that reads the float32 gradient and writes the sum (`torch.addmm(...,
out_dtype=torch.float32)`, cuBLAS's beta = 1; CUDA only). In float8
(the tensorwise recipe) torch's `_scaled_mm` takes no matrix to add to, so the nearest is a float32 result plus an
add. Times are per optimizer step (layers x micro-batches), from CUDA events around each variant; the result of
each variant is compared with the float64 sum.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from pretrain.model.float8 import E4M3, E5M2, cast_to_float8_and_transpose, tensorwise_scale  # noqa: E402
from pretrain.training.engine import accumulate_into_float32  # noqa: E402

# Mistral 7B's linear layers (N, K) per decoder layer, and the LM head once.
LAYER_WEIGHTS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
HEAD_WEIGHT = (32000, 4096)


def bf16_then_add(grad, operands):
    dy, x = operands
    accumulate_into_float32(grad, dy.t() @ x)


def fused_addmm(grad, operands):
    dy, x = operands
    torch.addmm(grad, dy.t(), x, out_dtype=torch.float32, out=grad)


def float8_operands(dy, x):
    """dY.T and X cast as the tensorwise recipe casts them for the weight gradient, with their inverse scales:
    (N, T) row-major @ (T, K) column-major."""
    dy_scale, x_scale = tensorwise_scale(dy, E5M2), tensorwise_scale(x, E4M3)
    _, dy8_t = cast_to_float8_and_transpose(dy, dy_scale, E5M2)  # (N, T)
    _, x8_t = cast_to_float8_and_transpose(x, x_scale, E4M3)  # (K, T)
    return dy8_t, x8_t, dy_scale.reciprocal(), x_scale.reciprocal()


def float8_bf16_then_add(grad, operands):
    dy8, x8, dy_inv, x_inv = operands
    dw = torch._scaled_mm(dy8, x8.t(), scale_a=dy_inv, scale_b=x_inv, out_dtype=torch.bfloat16)
    accumulate_into_float32(grad, dw)


def float8_float32_then_add(grad, operands):
    dy8, x8, dy_inv, x_inv = operands
    grad.add_(torch._scaled_mm(dy8, x8.t(), scale_a=dy_inv, scale_b=x_inv, out_dtype=torch.float32))


def timed(device, repeats: int, run, *args) -> float:
    """Seconds per call of run(*args)."""
    run(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            run(*args)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        run(*args)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch (T)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--micro-batches", type=int, default=8, help="micro-batches per optimizer step")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    shrink = 64 if args.smoke else 1
    tokens = args.tokens // shrink
    weights = {name: (n // shrink, k // shrink, args.layers) for name, (n, k) in LAYER_WEIGHTS.items()}
    weights["lm_head"] = (HEAD_WEIGHT[0] // shrink, HEAD_WEIGHT[1] // shrink, 1)
    float8_ok = device.type == "cuda" and torch.cuda.get_device_capability() >= (8, 9)

    variants = {"bf16 dW, then the add (DeepSpeed's way)": ("bf16", bf16_then_add)}
    if device.type == "cuda":
        variants["addmm into float32 (fused: the trainer)"] = ("bf16", fused_addmm)
    if float8_ok:
        variants["float8 dW in bf16, then the add (the trainer)"] = ("float8", float8_bf16_then_add)
        variants["float8 dW in float32, then the add"] = ("float8", float8_float32_then_add)

    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; tokens per micro-batch "
          f"{tokens}, {args.layers} layers, {args.micro_batches} micro-batches per step")
    print("| variant | ms per step | largest error vs float64 (relative) |")
    print("| --- | --- | --- |")
    torch.manual_seed(0)
    for label, (kind, run) in variants.items():
        total_s, worst = 0.0, 0.0
        for name, (n, k, count) in weights.items():
            if kind == "float8" and name == "lm_head":
                kind_here, run_here = "bf16", bf16_then_add  # the recipes keep the LM head in bf16
            else:
                kind_here, run_here = kind, run
            dy = torch.randn(tokens, n, device=device, dtype=torch.bfloat16)
            x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
            grad = torch.randn(n, k, device=device, dtype=torch.float32)
            expected = grad.double() + dy.double().t() @ x.double()
            operands = float8_operands(dy, x) if kind_here == "float8" else (dy, x)
            check = grad.clone()
            run_here(check, operands)
            worst = max(worst, ((check.double() - expected).norm() / expected.norm()).item())
            total_s += timed(device, args.repeats, run_here, grad, operands) * count * args.micro_batches
        print(f"| {label} | {total_s * 1e3:.1f} | {worst:.1e} |", flush=True)


if __name__ == "__main__":
    main()
