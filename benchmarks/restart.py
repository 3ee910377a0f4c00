"""Seconds from a fault to the next completed step, with in-job restarts (launch/restarts.py): the tiny model, 2 ranks
on CPU, rank 1 killed with SIGKILL `--faults` times in one run, each time a few steps after the last restart.

    python benchmarks/restart.py                        # `pretrain train --nproc 2` on this machine
    python benchmarks/restart.py --slurm                # a 2-node job (`pretrain submit`, one rank per node) on the
                                                        # Slurm cluster of SLURM_CONF whose nodes run on this machine
                                                        # (slurm/local-cluster/up.sh --nodes 2): the ranks must be
                                                        # visible here to be killed and watched

Each fault's time, split as it passes: detection (the kill until the launcher saw the failure; under Slurm until
every rank of the failed start had ended: the survivor's collective fails, it exits, and srun sees the step end),
teardown (until every rank had ended; under Slurm until srun returned to the batch step), start (process start,
imports, process group, model, engine, data loaders), load (the checkpoint) and the first step after it. The kill is
this script's; the other moments are the launcher's record (RUN_DIR/restarts.jsonl) and the restarted ranks'
startup record. The data (the built-in corpus, a 4096-piece tokenizer, 128-token shards) is made in --work first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from launch.restarts import read_restarts  # noqa: E402

PARTS = ("detection", "teardown", "start", "load", "first step")


def make_data(root: Path) -> list[str]:
    from data_pipeline.corpus import write_builtin_corpus
    from data_pipeline.prepare import prepare
    from data_pipeline.tokenizer import train_tokenizer

    if not (root / "eval" / "manifest.json").is_file():
        write_builtin_corpus(root / "corpus", max_mb=1.5)
        train_tokenizer([str(root / "corpus" / "train" / "*.jsonl")], root / "tokenizer", vocab_size=4096,
                        sample_bytes=1_500_000)
        for split in ("train", "eval"):
            prepare([str(root / "corpus" / split / "*.jsonl")], root / "tokenizer", 128, root / split,
                    progress=False)
    return [f"data.train=[{{path: {root / 'train'}}}]", f"data.eval={root / 'eval'}",
            f"data.tokenizer={root / 'tokenizer'}", "data.seq_len=128"]


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "train":
            steps.append(record["step"])
    return steps


def rank_processes(run_dir: Path) -> dict[int, psutil.Process]:
    """The running trainer ranks of the run, by rank."""
    found = {}
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        # srun's command line names launch.rank too
        if "launch.rank" in cmdline and str(run_dir) in cmdline and Path(cmdline[0]).name.startswith("python"):
            try:
                env = process.environ()
                found[int(env.get("RANK") or env["SLURM_PROCID"])] = process
            except (psutil.NoSuchProcess, KeyError):
                continue
    return found


def wait_until(condition, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"benchmarks/restart.py: {what} did not happen within {timeout:.0f} s")
        time.sleep(0.02)


def one_fault(run_dir: Path, fault: int, slurm: bool) -> list[float]:
    """Kill rank 1 a few steps after the last (re)start, so that each fault comes where the one before did not; the
    step after which it failed, then the seconds of each of PARTS and in all."""
    after = (max(logged_steps(run_dir), default=0) if fault else 0) + 3
    wait_until(lambda: max(logged_steps(run_dir), default=0) >= after, f"step {after}")
    ranks = list(rank_processes(run_dir).items())
    killed_at = time.time()
    dict(ranks)[1].kill()
    wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for _, p in ranks),
               "the end of every rank")
    ranks_ended = time.time()

    def restarted() -> bool:
        records = read_restarts(run_dir)
        return len(records) > fault and records[fault]["next_step_s"] is not None

    wait_until(restarted, "the next step after the restart")
    record = read_restarts(run_dir)[fault]
    seen = record["time"]
    if slurm:  # the batch step sees the failure when srun returns: after every rank ended
        detection, teardown = ranks_ended - killed_at, seen - ranks_ended
    else:
        detection, teardown = seen - killed_at, record["teardown_s"]
    parts = [detection, teardown, record["start_s"], record["load_s"], record["first_step_s"]]
    return [record["after_step"], *parts, seen + record["next_step_s"] - killed_at]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--slurm", action="store_true", help="a 2-node job on the local Slurm cluster")
    parser.add_argument("--work", type=Path, help="where the data and the run go (default: a temporary directory)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="restart-benchmark-"))
    data = make_data(work / "data")
    run_dir = (work / f"run-{int(time.time())}").resolve()
    overrides = [*data, f"train.steps={args.steps}", "train.global_batch=8", "parallel.micro_batch=4",
                 "logging.every_steps=1", "checkpoint.every_steps=2", "train.eval_every=0", "data.num_workers=0",
                 "logging.tensorboard=false", f"launch.max_restarts={args.faults}"]
    cli = [sys.executable, "-m", "launch.cli"]
    if args.slurm:
        submitted = subprocess.run([*cli, "submit", "configs/tiny.yaml", *overrides, "slurm.nodes=2",
                                    "slurm.tasks_per_node=1", "--run-dir", str(run_dir), "--time", "20"],
                                   cwd=ROOT, capture_output=True, text=True, check=True)
        job = submitted.stdout.split()[0]

        def ended() -> bool:
            return not subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip()
    else:
        with open(work / "train.log", "w") as log:
            launcher = subprocess.Popen([*cli, "train", "configs/tiny.yaml", *overrides, "--nproc", "2",
                                         "--run-dir", str(run_dir)], cwd=ROOT, stderr=log)

        def ended() -> bool:
            return launcher.poll() is not None
    rows = [one_fault(run_dir, fault, args.slurm) for fault in range(args.faults)]
    wait_until(ended, "the end of the run")
    if max(logged_steps(run_dir)) != args.steps:
        raise SystemExit(f"benchmarks/restart.py: the run ended at step {max(logged_steps(run_dir))} of "
                         f"{args.steps}: see {run_dir}")
    where = "2-node Slurm job, one rank per node" if args.slurm else "2 local processes"
    print(f"restart after SIGKILL of rank 1: tiny model, {where}, CPU ({os.cpu_count()} cores); run {run_dir}")
    print("| fault | killed after step | " + " | ".join(f"{part} s" for part in PARTS) + " | fault to next step s |")
    print("| --- " * (len(PARTS) + 3) + "|")
    for number, row in enumerate(rows, 1):
        print(f"| {number} | {row[0]} | " + " | ".join(f"{value:.2f}" for value in row[1:]) + " |")
    medians = [statistics.median(row[i] for row in rows) for i in range(1, len(PARTS) + 2)]
    print("| median | | " + " | ".join(f"{value:.2f}" for value in medians) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
