"""Training throughput of a Mistral 7B-shaped model in the real trainer: tokens/s/GPU and MFU.

    python benchmarks/train_step.py                          # 1 GPU: 7B width, 8 layers, seq 8192, window 4096
    python benchmarks/train_step.py --seq-lens 4096 8192 16384 32768 --windows 4096 none
    python benchmarks/train_step.py --nproc 2 --layers 8 --layouts zero1 zero3 tp2 pp2
    python benchmarks/train_step.py --nproc 2 --layers 32 --layouts zero1 zero3 tp2 pp2 --steps 6 --warmup 2
    python benchmarks/train_step.py --nproc 2 --layers 32 --layouts zero1 zero3 tp2 tp2sp tp2async --steps 8 \\
        --warmup 2 --profile
    python benchmarks/train_step.py --nproc 4 --layers 32 --layouts zero1 zero3 tp2async pp2 pp4 --steps 5 --warmup 2
    python benchmarks/train_step.py --nproc 1 2 4 --layers 8          # weak scaling: the same work per GPU
    python benchmarks/train_step.py --nproc 2 --layouts zero1 cp2 --seq-lens 8192 65536 131072 --accum 2
    python benchmarks/train_step.py --peer                   # and transformers' MistralForCausalLM at the same shape
    python benchmarks/train_step.py --peer --peer-float8     # and that peer in torchao float8 (tensorwise, rowwise)
    python benchmarks/train_step.py --fp8 off tensorwise rowwise --peer --peer-float8 --peer-recompute none
    python benchmarks/train_step.py --fp8 off tensorwise --peer --peer-float8 tensorwise --peer-recompute none
    python benchmarks/train_step.py --smoke                  # a tiny float32 run on CPU, to check the script works

Each configuration is `pretrain train` on configs/mistral-7b.yaml (with fewer layers where the whole 7B does not
fit: one GPU holds 8 of its 32 with their optimizer state), random tokens in real shards, bf16, no checkpoints (not
even the final one) or evaluation, run to --steps; the first --warmup steps (compilation, allocator warm-up) are
left out of the averages. A layout is a data-parallel run with ZeRO-1 (zero1) or ZeRO-3 (zero3), or tp=2 (tp2), tp=2
with sequence parallelism (tp2sp; GPUs only) and with its gathers and scatters fused with their matmuls (tp2async:
parallel.async_tensor_parallel; GPUs only), pp=2 (pp2) or pp=4 (pp4), or each sequence split over 2 GPUs (cp2:
context parallelism), with data parallelism over the remaining GPUs; "mem GiB" is rank 0's peak allocated memory.
"to step 1" is the time from starting `pretrain train` to the end of the first step, compilation included (each run
starts with an empty compilation cache, as on a new machine); the trainer's own breakdown of it (model build,
DeepSpeed, first step) is printed under the table. MFU counts the model FLOPs of `pretrain plan` (6 x matmul
parameters + exact causal/window attention) against the GPU's dense bf16 datasheet peak (pretrain.hardware; 989
TFLOP/s on an H100 SXM or H200, n/a for a GPU not in its table) and against the bf16 matmul rate measured on the
same GPU in the same run.
--profile prints rank 0's top kernels over 3 steps after the warm-up and their device time per step by kind
(matmul, attention, NCCL communication, the rest) beside the step time: what the kernels of one kind add up to,
and, where the kinds add up to more than the step, how much of them overlapped.
With several --nproc, each layout runs at each number of GPUs with the same micro-batches per data-parallel
replica (weak scaling), and a last table gives each one's tokens/s/GPU over that at the fewest GPUs.
--fp8 runs each layout with each train.fp8 recipe (off: bf16), and prints each FP8 row's tokens/s over the bf16
row's. --peer (one GPU) also runs benchmarks/peer_transformers.py, the plain compiled transformers loop a user would
write instead, once at each shape, at its best (no recomputation, as the trainer) and with gradient checkpointing
(--peer-recompute picks), and prints each trainer row's tokens/s over each peer and over the faster bf16 one;
--peer-float8 adds the peer in torchao float8, which each FP8 row is also set against (the same recipe, and the
faster float8 peer).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.prepare import MANIFEST, MANIFEST_VERSION, ShardWriter, token_dtype  # noqa: E402
from durable import write_json_atomic  # noqa: E402
from pretrain.hardware import datasheet_peak_tflops  # noqa: E402
from pretrain.plan import flops_per_token  # noqa: E402
from pretrain.training.metrics import StepProfiler, read_metrics  # noqa: E402

PROFILED_STEPS = StepProfiler.STEPS


def measured_matmul_tflops(size: int = 8192) -> float:
    import torch
    from triton.testing import do_bench

    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    return 2 * size**3 / ms / 1e9


def write_random_shards(out: Path, samples: int, seq_len: int, vocab_size: int, seed: int = 0) -> None:
    """Shards in `pretrain data prepare`'s format holding uniformly random tokens (throughput does not depend on
    which tokens they are)."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    writer = ShardWriter(out, 256_000_000, dtype, seq_len + 1)
    rng = np.random.default_rng(seed)
    for _ in range(samples):
        writer.add(rng.integers(0, vocab_size, seq_len + 1, dtype=np.int64))
    writer.close()
    write_json_atomic(out / MANIFEST, {
        "version": MANIFEST_VERSION, "seq_len": seq_len, "sample_tokens": seq_len + 1, "dtype": dtype.name,
        "vocab_size": vocab_size, "tokenizer_sha256": None, "samples": samples, "shards": writer.shards,
    })


LAYOUTS = {"zero1": ["parallel.zero_stage=1"], "zero3": ["parallel.zero_stage=3"],
           "tp2": ["parallel.tp=2", "parallel.zero_stage=1"],
           "tp2sp": ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=1"],
           "tp2async": ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.async_tensor_parallel=true",
                        "parallel.zero_stage=1"],
           "pp2": ["parallel.pp=2", "parallel.zero_stage=1"], "pp4": ["parallel.pp=4", "parallel.zero_stage=1"],
           "cp2": ["parallel.cp=2", "parallel.zero_stage=1"]}


def model_parallel_size(layout: str) -> int:
    """GPUs one model replica spans in `layout` (tp x pp x cp, from its overrides)."""
    size = 1
    for override in LAYOUTS[layout]:
        key, value = override.split("=")
        if key in ("parallel.tp", "parallel.pp", "parallel.cp"):
            size *= int(value)
    return size


# Kernel name fragments (lower case) of each kind; the first kind that matches wins, the rest is "other".
KERNEL_KINDS = {
    "communication (NCCL)": ("nccl",),
    # Compiled Triton templates (triton_tem_*) are FlexAttention's: matmul templates need max-autotune, off here.
    "attention": ("flash", "fmha", "attention", "flex", "sdpa", "triton_tem_"),
    "matmul": ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma"),
}


def device_ms_by_kind(trace: Path, steps: int) -> dict[str, float]:
    """GPU kernel time per step (ms) by kind, from a torch.profiler Chrome trace of `steps` steps."""
    totals = dict.fromkeys([*KERNEL_KINDS, "other"], 0.0)
    for event in json.loads(trace.read_text())["traceEvents"]:
        if event.get("cat") != "kernel":
            continue
        name = event["name"].lower()
        kind = next((kind for kind, parts in KERNEL_KINDS.items() if any(part in name for part in parts)), "other")
        totals[kind] += event["dur"] / 1e3 / steps
    return totals


def micro_batch_size(args, seq_len: int) -> int:
    """Sequences per micro-batch at `seq_len`: --micro-batch, or --tokens-per-micro-batch / seq_len."""
    return args.tokens_per_micro_batch // seq_len if args.tokens_per_micro_batch else args.micro_batch


def run_config(args, layout: str, nproc: int, seq_len: int, window: int | None, fp8: str, work: Path) -> dict:
    """One `pretrain train` run on `nproc` GPUs; returns its averaged metrics after the warm-up steps."""
    name = f"{layout}-x{nproc}-seq{seq_len}-w{window or 'full'}" + ("" if fp8 == "off" else f"-fp8{fp8}")
    if nproc % model_parallel_size(layout):
        return {"name": name, "error": f"{layout} needs a multiple of {model_parallel_size(layout)} GPUs"}
    micro_batch = micro_batch_size(args, seq_len)
    global_batch = micro_batch * args.accum * (nproc // model_parallel_size(layout))
    data = work / f"data-{seq_len}-{global_batch * args.steps}"
    if not (data / "manifest.json").exists():
        write_random_shards(data, global_batch * args.steps, seq_len, args.vocab)
    overrides = [
        f"model.n_layers={args.layers}", f"model.vocab_size={args.vocab}", f"model.max_seq_len={seq_len}",
        f"model.sliding_window={'null' if window is None else min(window, seq_len)}",
        f"data.train=[{{path: {data}}}]", "data.eval=null", "data.tokenizer=null", f"data.seq_len={seq_len}",
        *LAYOUTS[layout], f"parallel.micro_batch={micro_batch}",
        f"train.global_batch={global_batch}",
        f"train.steps={args.steps}", "train.eval_every=0", f"train.compile={str(not args.no_compile).lower()}",
        f"train.fp8={fp8}",
        "checkpoint.every_steps=0", "checkpoint.save_final=false", "logging.every_steps=1",
        "logging.tensorboard=false", "optim.warmup_steps=1",
        f"logging.profile_step={args.warmup + 1 if args.profile else 0}",
    ]
    if args.checkpointing:
        overrides.append(f"parallel.activation_checkpointing={args.checkpointing}")
    if args.smoke:
        overrides += ["model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
                      "model.hidden_dim=128", "train.dtype=float32", "data.num_workers=0"]
    run_dir = work / name
    command = [sys.executable, "-m", "launch.cli", "train", str(ROOT / "configs" / "mistral-7b.yaml"),
               *overrides, *args.overrides, "--nproc", str(nproc), "--run-dir", str(run_dir)]
    # A fresh compilation cache per run: "to step 1" then includes compiling, as on a new machine.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(run_dir / "inductor-cache")}
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "stderr.log"
    launched = time.time()
    with open(log, "w") as stderr:
        # Its own process group: a run past --timeout is ended with its ranks and their data workers, which would
        # otherwise hold the GPUs (and wait in collectives) through the next run.
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stderr, stderr=stderr, start_new_session=True)
        try:
            code = process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = f"not finished within --timeout {args.timeout} s"
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        return {"name": name, "error": f"exit {code}: {tail} (whole log: {log})"}
    records = read_metrics(run_dir / "metrics.jsonl")
    startup = next(r for r in records if r["kind"] == "startup")
    # The profiled steps run slower under the profiler: left out of the averages.
    profiled = range(args.warmup + 1, args.warmup + 1 + PROFILED_STEPS) if args.profile else range(0)
    timed = [r for r in records if r["kind"] == "train" and r["step"] > args.warmup and r["step"] not in profiled]
    mean = {key: float(np.mean([r[key] for r in timed])) for key in ("tokens_per_s_per_gpu", "step_time_s")}
    mean["memory_gib"] = max(r["memory_gib"] for r in timed)
    mean["loss"] = timed[-1]["loss"]
    from pretrain.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    mean["flops_per_token"] = flops_per_token(cfg.model, seq_len)["total"]
    mean["to_step_1_s"] = startup["time"] - launched
    phases = {key: value for key, value in startup.items() if key.endswith("_s")}
    profile = run_dir / "profile" / "top.txt"
    traces = sorted((run_dir / "profile").glob("trace-*.json"))
    by_kind = device_ms_by_kind(traces[0], PROFILED_STEPS) if traces else None
    return {"name": name, "seq_len": seq_len, "window": window, "fp8": fp8, **mean, "phases": phases,
            "profile": profile.read_text() if profile.exists() else None, "device_ms_by_kind": by_kind}


# The peer's configurations: at its best where it fits (no recomputation, as the trainer), with gradient
# checkpointing as a second row (--peer-recompute), and torchao float8 for the FP8 rows (--peer-float8).
PEER_BF16 = {"none": ("peer", []), "full": ("peer, gradient checkpointing", ["--recompute", "full"])}
PEER_FLOAT8 = {"tensorwise": ("peer, float8 tensorwise", ["--float8", "tensorwise"]),
               "rowwise": ("peer, float8 rowwise", ["--float8", "rowwise"])}


def peer_variants(args) -> dict[str, list[str]]:
    """The peer rows to run, by label: its options."""
    variants = dict(PEER_BF16[recompute] for recompute in args.peer_recompute)
    if args.peer_float8 is not None:
        variants.update(PEER_FLOAT8[recipe] for recipe in args.peer_float8 or PEER_FLOAT8)
    return variants


def peer_summary(label: str, peer: dict) -> str:
    if "error" in peer:
        return f"{label}: FAILED {peer['error']}"
    memory = f", {peer['memory_gib']:.1f} GiB" if peer["memory_gib"] is not None else ""
    return (f"{label}: {peer['tokens_per_s']:,.0f} tokens/s, step {peer['step_time_s']:.3f} s, first step "
            f"{peer['first_step_s']:.1f} s{memory}")


def print_peer_ratios(rows: list[dict], results: dict[str, dict]) -> None:
    """Each trainer row at one shape over each peer run at that shape, and the ratios the FP8 work is judged by."""
    for label, peer in results.items():
        print(f"  {peer_summary(label, peer)}" + ("" if "error" in peer else "; " + ", ".join(
            f"{row['name']} / this = {row['tokens_per_s_per_gpu'] / peer['tokens_per_s']:.2f}x" for row in rows)))
    measured = {label: peer["tokens_per_s"] for label, peer in results.items() if "error" not in peer}
    bf16_peers = [measured[label] for label, _ in PEER_BF16.values() if label in measured]
    float8_peers = {recipe: measured[label] for recipe, (label, _) in PEER_FLOAT8.items() if label in measured}
    for row in rows:
        ours = row["tokens_per_s_per_gpu"]
        if row["fp8"] == "off" and bf16_peers:
            print(f"  {row['name']} / the faster bf16 peer = {ours / max(bf16_peers):.2f}x")
        if row["fp8"] != "off" and float8_peers:
            same = (f"the peer in float8 {row['fp8']} = {ours / float8_peers[row['fp8']]:.2f}x, "
                    if row["fp8"] in float8_peers else "")
            print(f"  {row['name']} / {same}the faster float8 peer = {ours / max(float8_peers.values()):.2f}x")


def run_peer(args, seq_len: int, window: int | None, options: list[str]) -> dict:
    """benchmarks/peer_transformers.py at this run's shape with `options`: its JSON line, or {"error": ...}."""
    micro_batch = micro_batch_size(args, seq_len)
    command = [sys.executable, str(ROOT / "benchmarks" / "peer_transformers.py"), "--layers", str(args.layers),
               "--vocab", str(args.vocab), "--seq-len", str(seq_len), "--window", str(window or 0),
               "--micro-batch", str(micro_batch), "--accum", str(args.accum), "--steps", str(args.steps),
               "--warmup", str(args.warmup), *options] + (["--smoke"] if args.smoke else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"not finished within --timeout {args.timeout} s"}
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: " + "\n".join(done.stderr.splitlines()[-10:])}
    return json.loads(done.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny float32 model on CPU, to check the script")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192])
    parser.add_argument("--windows", nargs="+", default=["4096"], help="window sizes; 'none' for full causal")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--tokens-per-micro-batch", type=int, default=0,
                        help="micro-batch = this / seq_len for each sequence length (same tokens per step for all)")
    parser.add_argument("--accum", type=int, default=8, help="micro-batches per optimizer step per replica")
    parser.add_argument("--checkpointing", choices=["none", "selective", "full"],
                        help="activation checkpointing (default: the preset's)")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1],
                        help="GPUs per run; several: each layout at each (weak scaling)")
    parser.add_argument("--layouts", nargs="+", default=["zero1"], choices=list(LAYOUTS),
                        help="zero1, zero3: data parallel with that ZeRO stage; tp2, pp2, pp4: tp=2, pp=2 or pp=4 "
                             "(ZeRO-1); tp2sp: tp=2 with sequence parallelism (ZeRO-1); tp2async: and async tensor "
                             "parallelism")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--timeout", type=int, default=900, help="seconds one configuration may take")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of 3 steps after the warm-up")
    parser.add_argument("--peer", action="store_true",
                        help="also run transformers' MistralForCausalLM at each row's shape (1 GPU), without and with "
                             "gradient checkpointing, and print the ratio to the faster")
    parser.add_argument("--peer-float8", nargs="*", choices=list(PEER_FLOAT8),
                        help="with --peer: also the peer in torchao float8 training, in these recipes (default, "
                             "the flag alone: tensorwise and rowwise)")
    parser.add_argument("--peer-recompute", nargs="*", choices=list(PEER_BF16), default=list(PEER_BF16),
                        help="with --peer: the bf16 peer rows, without recomputation (none: its best where it fits) "
                             "and with gradient checkpointing (full); default both, none of them if given no value")
    parser.add_argument("--fp8", nargs="+", choices=["off", "tensorwise", "rowwise"], default=["off"],
                        help="train.fp8 recipes to run each layout with (off: bf16); FP8 rows are set against the "
                             "bf16 row")
    parser.add_argument("--work-dir", type=Path, help="where shards and runs go (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*", help="extra dotted config overrides after --")
    args = parser.parse_args(argv)
    if args.profile and args.steps < args.warmup + PROFILED_STEPS + 1:
        parser.error(f"--profile needs --steps of at least --warmup + {PROFILED_STEPS + 1}: the profiled steps are "
                     "left out of the averages")
    if args.smoke:
        args.layers, args.vocab, args.seq_lens, args.windows = 4, 256, [128], ["64"]  # 4 layers: pp4 runs too
        args.accum, args.steps, args.warmup, args.no_compile = 2, 4, 1, True

    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.smoke:
        parser.error("the benchmark needs CUDA GPUs; use --smoke on CPU")
    if args.peer and args.nproc != [1]:
        parser.error("--peer compares one GPU with one GPU: use it with --nproc 1")
    if args.peer_float8 is not None and not args.peer:
        parser.error("--peer-float8 adds rows to --peer: pass both")
    if args.fp8 != ["off"] and args.smoke:
        parser.error("--fp8 needs GPUs with float8 tensor cores: train.fp8 is refused on CPU (drop --fp8 with --smoke)")
    matmul = measured_matmul_tflops() if on_gpu else None
    device = torch.cuda.get_device_name() if on_gpu else "CPU"
    sheet = datasheet_peak_tflops(device, "bfloat16")
    print(f"device {device} x {max(args.nproc)}; bf16 matmul 8192^3 measured: "
          + (f"{matmul:.1f} TFLOP/s" if matmul else "n/a")
          + (f"; datasheet peak ({sheet[0]}, dense bf16) {sheet[1]:g} TFLOP/s" if sheet else "; datasheet peak n/a"))
    micro = f"{args.tokens_per_micro_batch} tokens" if args.tokens_per_micro_batch else f"{args.micro_batch}"
    print(f"model: Mistral 7B width, {args.layers} layers, vocab {args.vocab}; micro-batch {micro} x "
          f"{args.accum} accumulation per replica, activation checkpointing {args.checkpointing or 'as the preset'}, "
          f"compile={'off' if args.no_compile else 'on'} {' '.join(args.overrides)}")
    header = (f"{'layout':>6} {'fp8':>10} {'GPUs':>4} {'seq':>6} {'window':>6} {'to step 1 s':>11} "
              f"{'tokens/s/GPU':>13} {'step s':>8} {'GFLOP/token':>11} {'MFU(sheet)':>10} {'MFU(meas)':>10} "
              f"{'mem GiB':>8} {'loss':>7}")
    print(header)
    print("-" * len(header))
    profiles, phases, rows_by_shape, scaling = [], [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        for layout in args.layouts:
            for seq_len in args.seq_lens:
                for window_text in args.windows:
                    window = None if window_text == "none" else int(window_text)
                    for fp8 in args.fp8:
                        for nproc in args.nproc:
                            row = run_config(args, layout, nproc, seq_len, window, fp8, work)
                            columns = f"{layout:>6} {fp8:>10} {nproc:>4} {seq_len:>6} {window_text:>6}"
                            if "error" in row:
                                print(f"{columns}  FAILED {row['error']}", flush=True)
                                continue
                            achieved = row["tokens_per_s_per_gpu"] * row["flops_per_token"] / 1e12
                            mfu_sheet = f"{achieved / sheet[1]:>10.1%}" if sheet else f"{'n/a':>10}"
                            mfu_measured = f"{achieved / matmul:>10.1%}" if matmul else f"{'n/a':>10}"
                            print(f"{columns} {row['to_step_1_s']:>11.1f} {row['tokens_per_s_per_gpu']:>13,.0f} "
                                  f"{row['step_time_s']:>8.3f} {row['flops_per_token'] / 1e9:>11.2f} {mfu_sheet} "
                                  f"{mfu_measured} {row['memory_gib']:>8.1f} {row['loss']:>7.3f}", flush=True)
                            profiles.append((row["name"], row["profile"], row["device_ms_by_kind"],
                                             row["step_time_s"]))
                            phases.append((row["name"], row["phases"]))
                            scaling.setdefault((layout, fp8, seq_len, window_text), []).append(
                                (nproc, row["tokens_per_s_per_gpu"]))
                            rows_by_shape.setdefault((layout, nproc, seq_len, window), []).append(row)
        peers = {}
        for seq_len, window in dict.fromkeys((seq, window) for _, _, seq, window in rows_by_shape):
            for label, options in (peer_variants(args) if args.peer else {}).items():
                peer = peers.setdefault((seq_len, window), {})[label] = run_peer(args, seq_len, window, options)
                # Printed as each ends: a run cut short by its time limit still shows the peers it finished.
                print(f"seq {seq_len}, window {window or 'full'}, {peer_summary(label, peer)}", flush=True)
    if len(args.nproc) > 1:
        print("\nweak scaling (the same micro-batches per data-parallel replica): tokens/s/GPU over that at the "
              "fewest GPUs")
        for (layout, fp8, seq_len, window_text), runs in scaling.items():
            fewest, base = runs[0]
            print(f"{layout:>6} fp8 {fp8} seq {seq_len} window {window_text}: "
                  + ", ".join(f"{n} GPUs {tokens / base:.1%}" for n, tokens in runs) + f" (of {fewest} GPUs)")
    for name, times in phases:
        print(f"startup of {name} (rank 0, from its process start): "
              + ", ".join(f"{key.removesuffix('_s').replace('_', ' ')} {value:.1f} s" for key, value in times.items()))
    for rows in rows_by_shape.values():
        bf16 = next((row for row in rows if row["fp8"] == "off"), None)
        for row in rows:
            if bf16 is not None and row["fp8"] != "off":
                print(f"{row['name']} / {bf16['name']} (bf16) = "
                      f"{row['tokens_per_s_per_gpu'] / bf16['tokens_per_s_per_gpu']:.2f}x")
    for (layout, _, seq_len, window), rows in rows_by_shape.items():
        if (seq_len, window) in peers:
            print(f"\npeers at seq {seq_len}, window {window or 'full'} (transformers MistralForCausalLM, compiled, "
                  f"flex, fused AdamW), against {layout}: "
                  + ", ".join(f"{row['name']} {row['tokens_per_s_per_gpu']:,.0f} tokens/s" for row in rows))
            print_peer_ratios(rows, peers[(seq_len, window)])
    for name, table, by_kind, step_time_s in profiles:
        if table:
            print(f"\nprofile of {name}: {table}")
        if by_kind and any(by_kind.values()):  # on CPU the trace holds no GPU kernels
            print(f"device time per step of {name} (rank 0, ms): "
                  + ", ".join(f"{kind} {ms:.1f}" for kind, ms in by_kind.items())
                  + f"; sum {sum(by_kind.values()):.1f}; step time {step_time_s * 1e3:.1f}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
