"""SwiGLU's activation, silu(gate) * up, forward and backward, compiled: plain torch ops (inductor's kernels) against
the trainer's `swiglu` (pretrain/model/swiglu.py: the same forward, a backward pass of its own).

    python benchmarks/swiglu.py             # the 7B's width: 8192 tokens x 14,336, 8 layers x 8 micro-batches
    python benchmarks/swiglu.py --smoke     # tiny shapes on CPU, to check the script works

Times are per optimizer step (layers x micro-batches), from CUDA events; "backward" is forward and backward
(`torch.autograd.grad`, so no gradient is accumulated anywhere) less the forward alone. Each variant's gradient is
compared with float64 autograd's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.model.swiglu import swiglu  # noqa: E402


def plain(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def seconds(device: torch.device, repeats: int, run) -> float:
    """Seconds per call of run()."""
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch")
    parser.add_argument("--hidden", type=int, default=14336, help="SwiGLU's width F (gate_up is 2F wide)")
    parser.add_argument("--calls", type=int, default=64, help="calls per optimizer step (layers x micro-batches)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    tokens, hidden = (64, 96) if args.smoke else (args.tokens, args.hidden)
    torch.manual_seed(0)
    gate_up = (3 * torch.randn(tokens, 2 * hidden, device=device)).bfloat16().requires_grad_()
    grad_output = torch.randn(tokens, hidden, device=device).bfloat16()
    reference = gate_up.detach().double().requires_grad_()
    plain(reference).backward(grad_output.double())

    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; gate_up ({tokens}, "
          f"{2 * hidden}) bf16, {args.calls} calls per step")
    print("| variant | forward ms per step | backward ms per step | backward GB/s (reads once) | largest error of "
          "the gradient vs float64 (relative) |")
    print("| --- | --- | --- | --- | --- |")
    once_bytes = gate_up.numel() * 2 * 2 + grad_output.numel() * 2  # gate_up and grad read, gate_up's grad written
    for label, fn in {"plain torch ops, compiled (the trainer until now)": plain,
                      "`swiglu`, compiled (its backward kernel)": swiglu}.items():
        compiled = torch.compile(fn)

        def forward(compiled=compiled):
            with torch.no_grad():
                compiled(gate_up)

        def forward_backward(compiled=compiled):
            return torch.autograd.grad(compiled(gate_up), gate_up, grad_output)[0]

        forward_s = seconds(device, args.repeats, forward)
        backward_s = seconds(device, args.repeats, forward_backward) - forward_s
        error = ((forward_backward().double() - reference.grad).norm() / reference.grad.norm()).item()
        print(f"| {label} | {forward_s * args.calls * 1e3:.1f} | {backward_s * args.calls * 1e3:.1f} | "
              f"{once_bytes / backward_s / 1e9:.0f} | {error:.1e} |", flush=True)


if __name__ == "__main__":
    main()
