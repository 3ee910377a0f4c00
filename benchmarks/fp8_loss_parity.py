"""Loss parity of FP8 training with bf16 on real text: the same run, from the same seed, with each train.fp8 recipe.

    python benchmarks/fp8_loss_parity.py --out parity                       # one H200: 1B model, 500 steps
    python benchmarks/fp8_loss_parity.py --out parity --recipes off rowwise --steps 200
    python benchmarks/fp8_loss_parity.py --smoke --out /tmp/parity          # tiny bf16-only run on CPU

The built-in corpus (the Python standard library, about 11 MB), a 32,000-piece tokenizer and shards at seq 4096 are
made with the commands a user types; then `pretrain train configs/mistral-7b.yaml` at about 1B parameters (dim
2048, 16 layers, 16 query and 4 key/value heads, SwiGLU 7168; embeddings untied) with evaluation, once per recipe,
all from the same seed and data order. The runs share the GPU (they start together: --sequential runs them one at a
time). Prints each recipe's train loss at the end (the last step, and the mean of the last 50 steps, which evens out
the batch-to-batch noise), its last evaluation loss, each against bf16's, and writes the curves to OUT/fp8_loss.png
and the losses to OUT/losses.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.training.metrics import read_metrics  # noqa: E402

# About 1.0B parameters (pretrain plan): 16 x 54.5M in the layers, 2 x 65.5M embedding and LM head.
MODEL_1B = ["model.dim=2048", "model.n_layers=16", "model.n_heads=16", "model.n_kv_heads=4", "model.head_dim=128",
            "model.hidden_dim=7168"]
SMOKE_MODEL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
               "model.hidden_dim=128", "model.sliding_window=32", "train.dtype=float32", "data.num_workers=0"]
TAIL = 50  # steps the final train loss is averaged over


def cli(*args, log: Path | None = None) -> None:
    command = [sys.executable, "-m", "launch.cli", *map(str, args)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if log is not None:
        log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"fp8_loss_parity: `pretrain {' '.join(map(str, args))}` failed (exit {done.returncode}): "
                 + (done.stderr.strip().splitlines() or [""])[-1])


def prepare_data(out: Path, vocab: int, seq_len: int, corpus_mb: float | None) -> list[str]:
    """Corpus, tokenizer and shards as a user makes them (once: kept in OUT/data); the data overrides."""
    data = out / "data"
    if not (data / "eval" / "manifest.json").exists():
        cli("data", "corpus", "--out", data / "corpus", *(["--max-mb", corpus_mb] if corpus_mb else []))
        cli("tokenizer", "train", "--input", data / "corpus" / "train" / "*.jsonl", "--vocab-size", vocab,
            "--out", data / "tokenizer")
        for split in ("train", "eval"):
            cli("data", "prepare", "--input", data / "corpus" / split / "*.jsonl", "--tokenizer", data / "tokenizer",
                "--seq-len", seq_len, "--out", data / split)
    return [f"data.train=[{{path: {data / 'train'}}}]", f"data.eval={data / 'eval'}",
            f"data.tokenizer={data / 'tokenizer'}", f"data.seq_len={seq_len}", f"model.max_seq_len={seq_len}"]


def train_command(args, recipe: str, data: list[str]) -> list[str]:
    overrides = [*data, *(SMOKE_MODEL if args.smoke else MODEL_1B), f"model.vocab_size={args.vocab}",
                 f"train.fp8={recipe}", f"train.steps={args.steps}", f"train.global_batch={args.global_batch}",
                 f"parallel.micro_batch={args.micro_batch}", f"train.seed={args.seed}", f"data.seed={args.seed}",
                 f"optim.warmup_steps={args.warmup}", f"train.eval_every={args.eval_every}", "train.eval_steps=8",
                 "checkpoint.every_steps=0", "checkpoint.save_final=false", "logging.every_steps=1",
                 "logging.tensorboard=false"]
    return [sys.executable, "-m", "launch.cli", "train", str(ROOT / "configs" / "mistral-7b.yaml"), *overrides,
            "--nproc", "1", "--run-dir", str(args.out / f"run-{recipe}")]


def run_recipes(args, data: list[str]) -> dict[str, int]:
    """Each recipe's `pretrain train`, together or one at a time; their exit codes."""
    codes, running = {}, {}
    for recipe in args.recipes:
        log = open(args.out / f"train-{recipe}.log", "w")  # noqa: SIM115 - closed when the run ends
        running[recipe] = subprocess.Popen(train_command(args, recipe, data), cwd=ROOT, stdout=log, stderr=log), log
        if args.sequential:
            codes[recipe] = running[recipe][0].wait()
    for recipe, (process, log) in running.items():
        codes[recipe] = process.wait()
        log.close()
    return codes


def losses(run_dir: Path, kind: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == kind}


def plot(curves: dict[str, dict[str, dict[int, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, ratio_ax) = plt.subplots(2, 1, figsize=(8, 7), sharex=True,
                                             gridspec_kw={"height_ratios": [2, 1]})
    reference = curves.get("off", {}).get("train", {})
    for recipe, series in curves.items():
        label = "bf16" if recipe == "off" else f"fp8 {recipe}"
        steps = sorted(series["train"])
        train_ax.plot(steps, [series["train"][s] for s in steps], label=f"{label}, train", linewidth=0.8)
        evals = sorted(series["eval"])
        train_ax.plot(evals, [series["eval"][s] for s in evals], marker="o", label=f"{label}, eval")
        if recipe != "off" and reference:
            common = [s for s in steps if s in reference]
            ratio_ax.plot(common, [series["train"][s] / reference[s] - 1 for s in common], label=label, linewidth=0.8)
    train_ax.set_ylabel("cross-entropy (nats/token)")
    train_ax.set_title(title)
    train_ax.legend()
    train_ax.grid(alpha=0.3)
    ratio_ax.axhline(0, color="black", linewidth=0.5)
    ratio_ax.set_ylabel("train loss / bf16's - 1")
    ratio_ax.set_xlabel("step")
    ratio_ax.grid(alpha=0.3)
    if ratio_ax.lines[1:]:
        ratio_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where data, runs, losses and the plot go")
    parser.add_argument("--recipes", nargs="+", choices=["off", "tensorwise", "rowwise"],
                        default=["off", "tensorwise", "rowwise"], help="train.fp8 recipes (off: bf16, the reference)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--global-batch", type=int, default=4, help="sequences per step (default 4: 16k tokens)")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--corpus-mb", type=float, help="cap the built-in corpus (default: all of it)")
    parser.add_argument("--sequential", action="store_true", help="one run at a time instead of all together")
    parser.add_argument("--smoke", action="store_true", help="a tiny float32 run on CPU, to check the script")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.global_batch, args.micro_batch, args.seq_len, args.vocab = 6, 2, 1, 64, 512
        args.warmup, args.eval_every, args.corpus_mb = 2, 3, args.corpus_mb or 0.3
    if "off" not in args.recipes:
        parser.error("--recipes must include off: bf16 is what the FP8 recipes are compared with")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    data = prepare_data(args.out, args.vocab, args.seq_len, args.corpus_mb)
    print(f"data ready in {time.monotonic() - start:.0f} s; training {', '.join(args.recipes)} for {args.steps} "
          f"steps of {args.global_batch} x {args.seq_len} tokens", flush=True)
    codes = run_recipes(args, data)
    curves = {recipe: {kind: losses(args.out / f"run-{recipe}", kind) for kind in ("train", "eval")}
              for recipe in args.recipes}
    (args.out / "losses.json").write_text(json.dumps(curves))
    reference = curves["off"]
    print(f"\n{'recipe':>10} {'exit':>4} {'steps':>5} {'last loss':>9} {'mean last ' + str(TAIL):>12} "
          f"{'vs bf16':>8} {'last eval':>9} {'vs bf16':>8} {'tokens/s':>9}")
    for recipe, series in curves.items():
        train, evals = series["train"], series["eval"]
        if not train:
            print(f"{recipe:>10} {codes[recipe]:>4} no steps logged (see {args.out / f'train-{recipe}.log'})")
            continue
        tail = [train[s] for s in sorted(train)[-TAIL:]]
        reference_tail = [reference["train"][s] for s in sorted(reference["train"])[-TAIL:]]
        mean, reference_mean = sum(tail) / len(tail), sum(reference_tail) / max(len(reference_tail), 1)
        last_eval = evals[max(evals)] if evals else float("nan")
        reference_eval = reference["eval"][max(reference["eval"])] if reference["eval"] else float("nan")
        speeds = [r["tokens_per_s"] for r in read_metrics(args.out / f"run-{recipe}" / "metrics.jsonl")
                  if r["kind"] == "train" and r["step"] > 10]
        speed = sum(speeds) / len(speeds) if speeds else float("nan")
        print(f"{recipe:>10} {codes[recipe]:>4} {max(train):>5} {train[max(train)]:>9.4f} {mean:>12.4f} "
              f"{mean / reference_mean - 1:>+8.2%} {last_eval:>9.4f} {last_eval / reference_eval - 1:>+8.2%} "
              f"{speed:>9,.0f}")
    plot(curves, args.out / "fp8_loss.png",
         f"{'tiny smoke model' if args.smoke else 'about 1B parameters'}, built-in corpus, seq {args.seq_len}, "
         f"{args.global_batch} sequences per step")
    print(f"\nlosses in {args.out / 'losses.json'}, curves in {args.out / 'fp8_loss.png'} "
          f"({time.monotonic() - start:.0f} s in all)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
