"""`pretrain export`, `pretrain import`, `pretrain generate` and `pretrain eval`: a trained model out of (and into)
the trainer's checkpoints, and run in one process."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from launch.errors import UserError


def cmd_export(args: argparse.Namespace) -> int:
    from pretrain.checkpoint.weights import read_checkpoint
    from pretrain.release.export import check_output, export_hf, export_mistral

    out = Path(args.out)
    check_output(out, args.force)
    weights = read_checkpoint(Path(args.checkpoint))
    print(f"exporting {weights.origin} (step {weights.trainer_state.get('step')}) as {args.format} to {out}",
          file=sys.stderr)
    tokenizer = Path(args.tokenizer) if args.tokenizer else None
    if args.format == "hf":
        export_hf(weights, out, dtype=args.dtype, max_shard_size=args.max_shard_size, tokenizer=tokenizer,
                  force=args.force)
    else:
        export_mistral(weights, out, dtype=args.dtype, tokenizer=tokenizer, force=args.force)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from pretrain.release.export import check_output
    from pretrain.release.hf_import import import_hf

    out = Path(args.out)
    check_output(out, args.force)
    cfg = import_hf(Path(args.hf_dir), out, base_config=Path(args.config) if args.config else None,
                    overrides=args.overrides, force=args.force)
    print(f"wrote {out}: config.yaml and a step-0 checkpoint at tp={cfg.parallel.tp}; continue pretraining with "
          f"`pretrain train {out / 'config.yaml'} --run-dir {out}`", file=sys.stderr)
    return 0


def _load(args: argparse.Namespace):
    from data_pipeline.tokenizer import Tokenizer
    from pretrain.checkpoint.weights import load_weights

    weights = load_weights(Path(args.model))
    tokenizer = Tokenizer.load(weights.tokenizer) if weights.tokenizer else None
    return weights, tokenizer


def sampling_options(args: argparse.Namespace) -> tuple[float, float]:
    """(temperature, top_p) from the options `add_sampling_args` adds, checked."""
    if args.greedy and (args.temperature is not None or args.top_p is not None):
        raise UserError("--greedy takes the most likely token: drop --temperature/--top-p, or drop --greedy")
    temperature = 0.0 if args.greedy else 0.7 if args.temperature is None else args.temperature
    top_p = 0.9 if args.top_p is None else args.top_p
    if args.max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
        raise UserError("--max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    return temperature, top_p


def load_with_tokenizer(args: argparse.Namespace):
    """The weights of args.model and their tokenizer, which must be known."""
    weights, tokenizer = _load(args)
    if tokenizer is None:
        raise UserError(f"{args.model} comes with no tokenizer: export it with one, or point data.tokenizer at one")
    return weights, tokenizer


def cmd_generate(args: argparse.Namespace) -> int:
    from pretrain.dtypes import resolve_dtype
    from pretrain.inference.generate import build_model, generate
    from pretrain.parallel import single_process_group

    temperature, top_p = sampling_options(args)
    weights, tokenizer = load_with_tokenizer(args)
    prompt = tokenizer.encode(args.prompt, bos=True)
    with single_process_group():
        model = build_model(weights, resolve_dtype(args.dtype), tokenizer.eos_id)
        new = generate(model, prompt, args.max_new_tokens, temperature=temperature, top_p=top_p, seed=args.seed,
                       eos_id=tokenizer.eos_id, vocab_size=tokenizer.vocab_size, progress=True)
    text = tokenizer.decode(new)
    if args.json:
        print(json.dumps({"prompt_ids": prompt, "new_ids": new, "text": text}))
    else:
        print(text)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pretrain.dtypes import resolve_dtype
    from pretrain.inference.evaluate import eval_loader, evaluate
    from pretrain.inference.generate import build_model
    from pretrain.parallel import single_process_group

    if args.batches < 1:
        raise UserError("--batches must be >= 1")
    weights, tokenizer = _load(args)
    run = weights.config
    micro_batch = args.batch_size or (run.parallel.micro_batch if run else 1)
    seed = run.data.seed if run else 1234
    with single_process_group():
        model = build_model(weights, resolve_dtype(args.dtype), tokenizer.eos_id if tokenizer else None)
        loader = eval_loader(args.data, model, micro_batch=micro_batch, seed=seed,
                             tokenizer_sha256=tokenizer.sha256 if tokenizer else None)
        result = evaluate(model, loader, args.batches, progress=True)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} over {result['batches']} batches "
              f"({result['tokens']:,} tokens)")
    return 0


def _shard_size(text: str) -> str:
    if not re.fullmatch(r"\d+([KMGT]i?B)?", text.strip(), flags=re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write bytes or e.g. 500MB, 5GB")
    return text.strip()


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: bfloat16 on a GPU, float32 on CPU (default %(default)s)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="stop after this many new tokens, or at </s> (default %(default)s)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--temperature", type=float, help="sampling temperature (default 0.7)")
    p.add_argument("--top-p", type=float, help="nucleus sampling: keep this much probability mass (default 0.9)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampling, for a reproducible answer; unused with --greedy (default %(default)s)")
    add_dtype_arg(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a verified checkpoint as a transformers or Mistral reference model directory")
    p.add_argument("checkpoint", help="checkpoint directory, or run directory (its newest verified checkpoint)")
    p.add_argument("--format", choices=["hf", "mistral"], default="hf",
                   help="hf: transformers MistralForCausalLM; mistral: mistral-inference's consolidated layout")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --force)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights dtype (default float32: the trainer's master weights, exactly)")
    p.add_argument("--max-shard-size", type=_shard_size, default="5GB",
                   help="largest safetensors file for --format hf (e.g. 2GB)")
    p.add_argument("--tokenizer", help="tokenizer directory or .model file (default: the run's data.tokenizer)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="a transformers Mistral directory as a run directory to continue pretraining")
    p.add_argument("hf_dir", help="directory with config.json and model*.safetensors (save_pretrained output)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides such as parallel.tp=2 data.train=...")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--config", help="base YAML for everything but the model (default: the built-in defaults)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("generate", help="continue a prompt with a trained model (one process, rolling KV cache)")
    p.add_argument("model", help="run directory, checkpoint directory, or `pretrain export --format hf` output")
    p.add_argument("--prompt", required=True, help="the text to continue (encoded after <s>)")
    add_sampling_args(p)
    p.add_argument("--json", action="store_true", help="print prompt and generated token ids with the text")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="loss and perplexity on held-out token shards")
    p.add_argument("model", help="run directory, checkpoint directory, or `pretrain export --format hf` output")
    p.add_argument("--data", required=True, help="a `pretrain data prepare` output directory (with manifest.json)")
    p.add_argument("--batches", type=int, default=16, help="evaluation batches to average (default %(default)s)")
    p.add_argument("--batch-size", type=int, help="sequences per batch (default: the run's parallel.micro_batch)")
    add_dtype_arg(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_eval)
