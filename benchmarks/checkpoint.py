"""Checkpoint save and load times of a Mistral 7B-shaped model in the real trainer, beside the disk's write speed.

    python benchmarks/checkpoint.py                 # 1 GPU: 7B width, 6 layers (19 GB of weights and Adam state)
    python benchmarks/checkpoint.py --nproc 2       # 2 GPUs, data parallel: each rank saves and loads its share
    python benchmarks/checkpoint.py --smoke         # a tiny float32 run on CPU, to check the script works
    python benchmarks/checkpoint.py --width 512 --layers 4 --seq-len 64 --save-after 4 --nproc 2
                                                    # CPU, data parallel: a 512-wide float32 model (about 45 M
                                                    # parameters), big enough for a save's stall to show

Measured in one run: the disk's sequential write speed (dd of zeros, fdatasync at the end); on a GPU, the copy
bandwidth from device to pinned host memory; an asynchronous save (the training stall, i.e. the copy to host memory,
and the background write with hashing and fsync), after enough steps for its pinned host buffers to be allocated in
the background, as in a real run (the allocation's time is shown too); a synchronous save; the load when a run resumes
(verification by sha256, reading, resharding into the engine: the startup's checkpoint phase), with the checkpoint's
files first dropped from the page cache; and a plain sequential
read of the same checkpoint files (dd with O_DIRECT, so the page cache does not answer it; without where the file
system refuses it).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from train_step import write_random_shards  # noqa: E402

from pretrain.training.metrics import read_metrics  # noqa: E402


def dd(*operands: str) -> tuple[int, float]:
    """Run dd; (bytes copied, seconds) from its last line: "N bytes (...) copied, S s, R GB/s"."""
    result = subprocess.run(["dd", *operands], capture_output=True, text=True, check=True)
    match = re.search(r"(\d+) bytes.* copied, ([\d.e+-]+) s", result.stderr)
    return int(match.group(1)), float(match.group(2))


def disk_write_gbps(work: Path, gigabytes: int) -> float:
    target = work / "dd.bin"
    copied, seconds = dd("if=/dev/zero", f"of={target}", "bs=64M", f"count={gigabytes * 16}", "conv=fdatasync")
    target.unlink()
    return copied / seconds / 1e9


def disk_read_gbps(files: list[Path]) -> float:
    """Sequential read of `files`, one after the other, past the page cache where the file system allows."""
    total, seconds = 0, 0.0
    for path in files:
        try:
            copied, took = dd(f"if={path}", "of=/dev/null", "bs=64M", "iflag=direct")
        except subprocess.CalledProcessError:  # no O_DIRECT here (tmpfs, say)
            copied, took = dd(f"if={path}", "of=/dev/null", "bs=64M")
        total, seconds = total + copied, seconds + took
    return total / seconds / 1e9


def evict_from_page_cache(files: list[Path]) -> None:
    """Drop the files' pages from the page cache, so that a load reads them from the disk as a resumed run on a fresh
    node would (the benchmark has just written them, and the host may hold them all in memory)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def pinned_copy_gbps(gigabytes: float = 2.0) -> float | None:
    """Device to pinned host memory, the copy a save's stall is made of (None without a GPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    source = torch.empty(int(gigabytes * 1e9) // 4, dtype=torch.float32, device="cuda")
    target = torch.empty(source.shape, dtype=torch.float32, pin_memory=True)
    target.copy_(source, non_blocking=True)  # warm-up
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    target.copy_(source, non_blocking=True)
    end.record()
    end.synchronize()
    return source.numel() * 4 / (start.elapsed_time(end) / 1e3) / 1e9


def train(args, run_dir: Path, data: Path, steps: int, every_steps: int, async_save: bool,
          save_final: bool = True) -> str:
    overrides = [
        f"model.n_layers={args.layers}", f"data.train=[{{path: {data}}}]", "data.eval=null", "data.tokenizer=null",
        f"data.seq_len={args.seq_len}", f"model.max_seq_len={args.seq_len}", f"model.sliding_window={args.seq_len}",
        "parallel.micro_batch=1", f"train.global_batch={args.nproc}", f"train.steps={steps}", "train.eval_every=0",
        f"parallel.zero_stage={args.zero_stage}",
        f"checkpoint.every_steps={every_steps}", f"checkpoint.save_final={str(save_final).lower()}",
        "checkpoint.keep_last=1", f"checkpoint.async_save={str(async_save).lower()}",
        "logging.every_steps=1", "logging.tensorboard=false", "train.compile=false",
    ]
    if args.width:
        heads = max(1, args.width // 32)
        overrides += [f"model.dim={args.width}", f"model.n_heads={heads}", f"model.n_kv_heads={max(1, heads // 4)}",
                      "model.head_dim=32", f"model.hidden_dim={3 * args.width}", f"model.vocab_size={vocab_size(args)}",
                      "train.dtype=float32", "data.num_workers=0"]
    command = [sys.executable, "-m", "launch.cli", "train", str(ROOT / "configs" / "mistral-7b.yaml"), *overrides,
               "--nproc", str(args.nproc), "--run-dir", str(run_dir)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"training failed ({result.returncode}):\n" + "\n".join(result.stderr.splitlines()[-20:]))
    return result.stderr


def vocab_size(args) -> int:
    return 256 if args.smoke else 32000


def saves(log: str) -> list[tuple[float, float]]:
    """(GB, seconds) of every save the log reports."""
    return [(float(gb), float(s)) for gb, s in re.findall(r"checkpoint step \d+: ([\d.]+) GB written in ([\d.]+) s",
                                                          log)]


def staging_allocation(log: str) -> tuple[float, float] | None:
    """(GB, seconds) of the pinned host buffers for asynchronous saves (None where none were allocated: on CPU)."""
    match = re.search(r"checkpoint: ([\d.]+) GB of pinned host memory for asynchronous saves ready in ([\d.]+) s",
                      log)
    return (float(match.group(1)), float(match.group(2))) if match else None


def progress(text: str) -> None:
    """Each figure as soon as it is measured: a run cut short still shows what it had."""
    print(f"measured: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--nproc", type=int, default=1, help="GPUs, or processes on CPU (data-parallel ranks)")
    parser.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2, 3))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int,
                        help="a narrower float32 model that trains on CPU: this width, heads of 32 (a quarter of them "
                             "for keys and values), MLP 3x as wide (default: the 7B's width)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--dd-gb", type=int, help="size of the dd write test (default: the checkpoint's)")
    parser.add_argument("--save-after", type=int, default=250,
                        help="steps before the asynchronous save (its pinned buffers are allocated meanwhile)")
    parser.add_argument("--work-dir", type=Path, help="on the disk to measure (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.seq_len, args.dd_gb, args.save_after, args.width = 2, 64, 1, 12, 64
    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        data = work / "data"
        write_random_shards(data, 16, args.seq_len, vocab_size(args))
        n = args.save_after
        # One save, after step n; its stall is logged with the step after it.
        async_log = train(args, work / "async", data, n + 1, n, async_save=True, save_final=False)
        staging = staging_allocation(async_log)
        if staging:
            progress(f"pinned staging buffers: {staging[0]:.1f} GB allocated in {staging[1]:.2f} s in the background")
        records = read_metrics(work / "async" / "metrics.jsonl")
        stall = max(r["checkpoint_stall_s"] for r in records if r["step"] == n + 1)
        # A steady step: the median of the last ones before the save, the pinning long done.
        last = sorted(r["step_time_s"] for r in records if r["kind"] == "train" and n - 10 <= r["step"] <= n)
        step_s = last[len(last) // 2]
        # Training time the background pinning cost: the steps from 2 to n against as many steady ones.
        pinning_cost = sum(r["step_time_s"] for r in records if r["kind"] == "train" and 2 <= r["step"] <= n) - (
            (n - 1) * step_s)
        gb, async_write_s = saves(async_log)[0]
        progress(f"async save: stall {stall:.2f} s, background write of {gb:.2f} GB in {async_write_s:.2f} s; "
                 f"steps 2-{n} took {pinning_cost:.2f} s longer than steady steps")
        # The disk's speed over as many bytes as the checkpoint: a shorter test may end inside a write cache.
        disk = disk_write_gbps(work, args.dd_gb or max(1, math.ceil(gb)))
        progress(f"dd sequential write {disk:.2f} GB/s")
        newest = work / "async" / "checkpoints" / (work / "async" / "checkpoints" / "latest").read_text().strip()
        checkpoint_files = sorted(p for p in newest.rglob("*") if p.is_file())
        read = disk_read_gbps(checkpoint_files)
        progress(f"sequential read of the checkpoint {read:.2f} GB/s")
        evict_from_page_cache(checkpoint_files)
        train(args, work / "async", data, n + 1, n, async_save=True)  # resumes from step n, saves step n + 1
        load_s = [r["checkpoint_s"] for r in read_metrics(work / "async" / "metrics.jsonl")
                  if r["kind"] == "startup"][-1]
        progress(f"load on resume {load_s:.2f} s")
        sync_log = train(args, work / "sync", data, 4, 4, async_save=False)
        sync_gb, sync_write_s = saves(sync_log)[0]
        progress(f"sync save: {sync_gb:.2f} GB in {sync_write_s:.2f} s")
        pinned = pinned_copy_gbps()
    print(f"disk: dd sequential write {disk:.2f} GB/s, read {read:.2f} GB/s; device to pinned host memory "
          + (f"{pinned:.2f} GB/s" if pinned else "n/a (no GPU)")
          + (f"; pinned staging buffers {staging[0]:.1f} GB allocated in {staging[1]:.2f} s (in the background, "
             f"before the save after step {n})" if staging else "")
          + f"; checkpoint {gb:.2f} GB ({args.layers} layers: fp32 weights + Adam moments), {args.nproc} rank(s) "
          f"at ZeRO-{args.zero_stage} saving and loading their shares at once; training step {step_s:.3f} s")
    print(f"{'what':<38} {'seconds':>8} {'GB/s':>7} {'vs':>6} {'reference':<18}")
    # The stall is each rank's copy of its own share, beside one GPU's copy bandwidth; the rest is the whole
    # checkpoint on the one disk, beside dd.
    rows = (("async save: training stall (a rank's)", gb / args.nproc, stall, pinned, "pinned copy"),
            ("async save: background write", gb, async_write_s, disk, "dd write"),
            ("sync save: write (all of it stalls)", gb, sync_write_s, disk, "dd write"),
            ("load on resume (verify + read)", gb, load_s, read, "sequential read"))
    for what, size, seconds, reference, name in rows:
        seconds = max(seconds, 1e-6)  # --smoke's saves round to 0.0 s
        share = f"{size / seconds / reference:>6.0%}" if reference else f"{'n/a':>6}"
        print(f"{what:<38} {seconds:>8.2f} {size / seconds:>7.2f} {share} {name:<18}")


if __name__ == "__main__":
    main()
