"""Attention backends: forward and forward+backward time and TFLOP/s on the attended (query, key) pairs.

    python benchmarks/attention.py            # CUDA, bf16, Mistral 7B heads, seq 4k/16k/32k, full vs window 4096
    python benchmarks/attention.py --smoke    # a tiny float32 run on CPU, to check the script works

FLOP convention (printed with the table): forward = 4 * B * Hq * D * attended pairs (two matmuls,
QK^T and PV, of 2 FLOPs per multiply-add); backward = 2.5 x forward, so forward+backward = 3.5 x forward.
Attended pairs count only the (query, key) pairs the mask allows: S(S+1)/2 for full causal attention and
about S*W with a window W, so a windowed kernel is not credited for work it rightly skips.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.model.attention import attention, cudnn_available, flash_available

BACKWARD_FACTOR = 2.5


def attended_pairs(seq_len: int, window: int | None) -> int:
    """Number of (query, key) pairs with key <= query and, with a window, key > query - window."""
    if window is None or window >= seq_len:
        return seq_len * (seq_len + 1) // 2
    return window * (window + 1) // 2 + (seq_len - window) * window


def forward_flops(batch: int, q_heads: int, head_dim: int, pairs: int) -> float:
    return 4.0 * batch * q_heads * head_dim * pairs


def measure_ms(fn, device: torch.device, repeats: int) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) * 1e3 / repeats


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    return (["sdpa", "flex"] + (["flash"] if flash_available(device, dtype) else [])
            + (["cudnn"] if cudnn_available(device, dtype) else []))


def bench_one(backend, batch, seq_len, q_heads, kv_heads, head_dim, window, dtype, device, repeats):
    q = torch.randn(batch, seq_len, q_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, seq_len, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, seq_len, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn_like(q)

    q_const, k_const, v_const = q.detach(), k.detach(), v.detach()

    def forward():
        # Inputs without requires_grad: on CPU, FlexAttention refuses them even under no_grad.
        attention(q_const, k_const, v_const, window, backend)

    def forward_backward():
        q.grad = k.grad = v.grad = None
        attention(q, k, v, window, backend).backward(grad_out)

    forward_ms = measure_ms(forward, device, repeats)
    # FlexAttention has no backward on CPU (torch raises), so only its forward is timed there.
    can_backward = device.type == "cuda" or backend != "flex"
    train_ms = measure_ms(forward_backward, device, repeats) if can_backward else None
    return forward_ms, train_ms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny float32 sizes that run on CPU in seconds")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--window", type=int, default=4096, help="sliding window compared with full causal")
    parser.add_argument("--backends", nargs="+", default=None, help="default: every backend that runs here")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        q_heads, kv_heads, head_dim, dtype = 4, 2, 16, torch.float32
        seq_lens, window, repeats = [128, 256], 64, 3
    else:
        if device.type != "cuda":
            parser.error("the full benchmark needs a CUDA GPU; use --smoke on CPU")
        q_heads, kv_heads, head_dim, dtype = 32, 8, 128, torch.bfloat16  # Mistral 7B
        seq_lens, window, repeats = args.seq_lens, args.window, 0
    backends = args.backends or available_backends(device, dtype)

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"device {name}, {dtype}, batch {args.batch}, {q_heads} query / {kv_heads} kv heads, head dim {head_dim}"
    )
    print(
        "FLOPs: forward = 4 * B * Hq * D * attended pairs; forward+backward = 3.5 x forward "
        f"(backward = {BACKWARD_FACTOR} x forward). Attended pairs: S(S+1)/2 full causal, ~S*W windowed."
    )
    header = (f"{'backend':>8} {'seq':>7} {'window':>7} {'fwd ms':>9} {'fwd TF/s':>9} {'fwd+bwd ms':>11} "
              f"{'fwd+bwd TF/s':>13}")
    print(header)
    print("-" * len(header))
    train_ms_by = {}  # (seq_len, window or None, backend) -> forward+backward ms
    for seq_len in seq_lens:
        for this_window in (None, window):
            flops = forward_flops(args.batch, q_heads, head_dim, attended_pairs(seq_len, this_window))
            for backend in backends:
                label = "full" if this_window is None else str(this_window)
                try:
                    forward_ms, train_ms = bench_one(
                        backend,
                        args.batch,
                        seq_len,
                        q_heads,
                        kv_heads,
                        head_dim,
                        this_window,
                        dtype,
                        device,
                        repeats,
                    )
                except torch.OutOfMemoryError:
                    print(f"{backend:>8} {seq_len:>7} {label:>7} {'out of memory':>9}")
                    torch.cuda.empty_cache()
                    continue
                forward_tflops = flops / forward_ms / 1e9
                if train_ms is None:
                    train = f"{'n/a':>11} {'n/a':>13}"
                else:
                    train_ms_by[seq_len, this_window, backend] = train_ms
                    train = f"{train_ms:>11.3f} {flops * (1 + BACKWARD_FACTOR) / train_ms / 1e9:>13.4g}"
                print(
                    f"{backend:>8} {seq_len:>7} {label:>7} {forward_ms:>9.3f} {forward_tflops:>9.4g} {train}"
                )
    print_window_gain(train_ms_by, seq_lens, window)


def print_window_gain(train_ms_by: dict, seq_lens: list[int], window: int) -> None:
    """Per length, the fastest windowed kernel against the fastest full-causal one (forward+backward): how much
    faster, and its TF/s on the attended pairs as a share of the full-causal kernel's."""
    for seq_len in seq_lens:
        full = {b: ms for (s, w, b), ms in train_ms_by.items() if s == seq_len and w is None}
        windowed = {b: ms for (s, w, b), ms in train_ms_by.items() if s == seq_len and w == window}
        if not full or not windowed or window >= seq_len:
            continue
        best_full, best_window = min(full, key=full.get), min(windowed, key=windowed.get)
        speedup = full[best_full] / windowed[best_window]
        tflops_share = speedup * attended_pairs(seq_len, window) / attended_pairs(seq_len, None)
        print(f"seq {seq_len}: window {window} ({best_window}) is {speedup:.2f}x faster than full causal "
              f"({best_full}), at {tflops_share:.0%} of its TF/s")


if __name__ == "__main__":
    main()
