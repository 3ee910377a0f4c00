"""The peer a user would pick instead of `pretrain train`: transformers' MistralForCausalLM in a plain training loop.

    python benchmarks/peer_transformers.py --layers 8 --seq-len 8192 --window 4096 --accum 8
    python benchmarks/peer_transformers.py --layers 8 --recompute full        # with gradient checkpointing
    python benchmarks/peer_transformers.py --layers 8 --float8 rowwise        # torchao float8 training
    python benchmarks/peer_transformers.py --smoke       # a tiny float32 model on CPU, to check the script

The loop is what a careful user writes on one GPU: float32 weights under bf16 autocast, torch.compile over the
whole model, FlexAttention (transformers' `attn_implementation="flex_attention"`, which carries the sliding window
in its block mask), fused AdamW, `--accum` micro-batches per optimizer step. It runs at its best where it fits:
without recomputation by default (the trainer does not recompute either); `--recompute full` turns gradient
checkpointing on, for shapes that do not fit without it. `--float8 tensorwise|rowwise` converts every linear layer
but the LM head with torchao's `convert_to_float8_training`, as torchao and torchtitan recommend. Random tokens
(throughput does not depend on which tokens they are). Prints one JSON line: the mean tokens/s over the steps after
--warmup (compilation, allocator warm-up) and the peak allocated memory. benchmarks/train_step.py --peer runs it
at the shape of its own runs and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from transformers import MistralConfig, MistralForCausalLM


def peer_model(args) -> MistralForCausalLM:
    config = MistralConfig(
        vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.dim // args.heads, max_position_embeddings=args.seq_len, sliding_window=args.window,
        rope_theta=1e6, tie_word_embeddings=False, use_cache=False,
        attn_implementation="sdpa" if args.smoke else "flex_attention",
    )
    return MistralForCausalLM(config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny float32 model on CPU, to check the script")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--hidden-dim", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--window", type=int, default=4096, help="sliding window; 0 for full causal")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--accum", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--recompute", choices=["none", "full"], default="none",
                        help="gradient checkpointing of every layer (default %(default)s: none, when it fits)")
    parser.add_argument("--float8", choices=["off", "tensorwise", "rowwise"], default="off",
                        help="torchao float8 training of the linear layers, the LM head kept in bf16 (default off)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.dim, args.hidden_dim, args.heads, args.kv_heads = 2, 64, 128, 4, 2
        args.vocab, args.seq_len, args.window, args.accum, args.steps, args.warmup = 256, 128, 64, 2, 3, 1
    args.window = args.window or None
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.smoke:
        parser.error("the peer benchmark needs a CUDA GPU; use --smoke on CPU")
    if args.float8 != "off" and not (on_gpu and torch.cuda.get_device_capability() >= (8, 9)):
        parser.error("--float8 needs a GPU with float8 matmuls (compute capability 8.9 or newer: Ada, Hopper)")
    device = "cuda" if on_gpu else "cpu"

    torch.manual_seed(0)
    model = peer_model(args).to(device)
    if args.recompute == "full":
        # Newer transformers rename the method and warn; the old name works in every version the image may hold.
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*", category=FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.float8 != "off":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(args.float8),
                                   module_filter_fn=lambda module, name: name != "lm_head")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=on_gpu)
    forward = model if args.smoke else torch.compile(model)
    generator = torch.Generator(device).manual_seed(0)
    tokens_per_step = args.micro_batch * args.seq_len * args.accum
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        for _ in range(args.accum):
            tokens = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len), device=device,
                                   generator=generator)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=on_gpu):
                loss = forward(input_ids=tokens, labels=tokens).loss / args.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # waits for the step's kernels
        times.append(time.perf_counter() - start)
    timed = times[args.warmup:]
    print(json.dumps({
        "tokens_per_s": tokens_per_step * len(timed) / sum(timed),
        "step_time_s": sum(timed) / len(timed),
        "first_step_s": times[0],
        "memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "loss": loss.item() * args.accum,
        "recompute": args.recompute,
        "float8": args.float8,
    }))


if __name__ == "__main__":
    main()
