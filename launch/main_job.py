"""`pretrain demo`: the main job. The whole life of a small model on the built-in corpus, through the commands a
user runs: corpus, tokenizer, token shards, training in two processes (dp=2 with ZeRO-1 on configs/tiny.yaml; on a
GPU machine one per GPU, at most two) stopped by SIGTERM and resumed, `pretrain status`, export to transformers,
generation with transformers and with `pretrain generate`. With --instruct, four more stages fine-tune that model on
the built-in instruction set (configs/tiny-instruct.yaml) and chat with it and let it moderate, as the Mistral 7B
paper's Instruct model.

The data goes where the config names it (configs/tiny.yaml: runs/data/...), so the preset trains without data
overrides afterwards; the run and its export go under --out (runs/demo). Re-running starts clean: the data is
made again (deterministic: the same bytes) and --out is replaced, if this command made it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text

from durable import write_json_atomic
from launch.errors import UserError
from launch.local import visible_gpus
from pretrain.checkpoint.store import complete_steps
from pretrain.config import Config, load_config, resolve_world
from pretrain.launch_contract import EXIT_SAVED_ON_SIGNAL
from pretrain.training.metrics import read_metrics

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
INSTRUCT_CONFIG = CONFIG.with_name("tiny-instruct.yaml")
QUESTION = "Explain what this function of the Python module os.path does:\ndef join(a, *p)"
MODERATED = ("Return the number of items in a container.", "You are worthless and everybody hates you.")
MARKER = ".made-by-pretrain-demo"  # --out is replaced on a re-run only if it holds this file
PROMPTS = ("def read_config(path):", "class Parser:")
SAMPLING = {"temperature": 0.7, "top_p": 0.9, "seed": 0, "max_new_tokens": 60}
STAGES = 9
INSTRUCT_STAGES = 4

console = Console(highlight=False)


class StageFailed(Exception):
    """A command of the demo failed; its own output, above, says why."""


class Stages:
    """Numbered stage banners and the time each stage took."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.times: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def stage(self, title: str, what: str):
        console.rule(f"[bold]{len(self.times) + 1}/{self.total}  {title}")
        console.print(what, style="dim", markup=False)
        start = time.perf_counter()
        yield
        self.times.append((title, time.perf_counter() - start))
        console.print(f"[green]done[/] in {self.times[-1][1]:.1f} s")


def shown(path: Path | str) -> str:
    """A path as the user would type it: relative to the working directory when it is under it."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def pretrain_command(args: list[str]) -> tuple[list[str], str]:
    """The real command line (this Python running launch.cli) and how a user types it."""
    args = [str(a) for a in args]
    return [sys.executable, "-m", "launch.cli", *args], shlex.join(["pretrain", *args])


def pretrain(args: list[str], capture: bool = False) -> str:
    command, typed = pretrain_command(args)
    console.print(f"$ {typed}", style="bold cyan", markup=False, soft_wrap=True)
    result = subprocess.run(command, stdout=subprocess.PIPE if capture else None, text=True)
    if result.returncode != 0:
        raise StageFailed(f"`{typed}` exited with status {result.returncode} (its output is above)")
    return result.stdout if capture else ""


def logged_steps(metrics: Path, kind: str = "train") -> dict[int, float]:
    """Loss of every logged step of `kind` (a step repeated after a resume keeps its latest value)."""
    return {r["step"]: r["loss"] for r in read_metrics(metrics) if r["kind"] == kind}


def train_then_interrupt(args: list[str], metrics: Path, interrupt_at: int) -> None:
    """Start `pretrain train`, send SIGTERM to its launcher once step `interrupt_at` is logged, and check that the
    ranks saved and exited with EX_TEMPFAIL (75), as on a Slurm preemption."""
    command, typed = pretrain_command(args)
    console.print(f"$ {typed}", style="bold cyan", markup=False, soft_wrap=True)
    proc = subprocess.Popen(command)
    while proc.poll() is None and max(logged_steps(metrics), default=0) < interrupt_at:
        time.sleep(0.2)
    if proc.returncode is not None:
        raise StageFailed(f"`{typed}` ended with status {proc.returncode} before step {interrupt_at} "
                          "(its output is above)")
    console.print(f"[bold yellow]step {max(logged_steps(metrics))} logged: SIGTERM to the launcher "
                  f"(pid {proc.pid}), as a preemption would send[/]")
    proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    if code != EXIT_SAVED_ON_SIGNAL:
        raise StageFailed(f"after SIGTERM `{typed}` exited with status {code}, not {EXIT_SAVED_ON_SIGNAL} "
                          "(saved on a signal): see its output above")


def newest_checkpoint(run_dir: Path) -> int:
    steps = complete_steps(run_dir / "checkpoints")
    if not steps:
        raise StageFailed(f"{run_dir}/checkpoints holds no complete checkpoint after the interruption")
    return steps[-1]


def transformers_samples(export_dir: Path) -> dict[str, str]:
    """Load the export as any transformers user would and continue each prompt (seeded sampling)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export_dir)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    console.print(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
                  f"parameters) and {type(tokenizer).__name__} from {shown(export_dir)}")
    samples = {}
    for prompt in PROMPTS:
        torch.manual_seed(SAMPLING["seed"])
        inputs = tokenizer(prompt, return_tensors="pt")
        output = model.generate(**inputs, do_sample=True, temperature=SAMPLING["temperature"],
                                top_p=SAMPLING["top_p"], max_new_tokens=SAMPLING["max_new_tokens"],
                                pad_token_id=tokenizer.eos_token_id)
        samples[prompt] = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        console.print(Text.assemble((prompt, "bold"), samples[prompt], "\n"), soft_wrap=True)
    return samples


def prepare_out(out: Path) -> None:
    """An empty --out, replacing one a previous demo made; anything else already there is refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise UserError(f"{out} exists and was not made by `pretrain demo`: pass another --out, or remove it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("this directory is replaced when `pretrain demo` runs again with this --out\n")


def data_paths(cfg: Config) -> dict[str, Path]:
    if len(cfg.data.train) != 1 or "://" in cfg.data.train[0].path or not cfg.data.eval or not cfg.data.tokenizer:
        raise UserError("the demo makes one local train source, an eval split and a tokenizer: give data.train "
                        "one path, and set data.eval and data.tokenizer")
    tokenizer = Path(cfg.data.tokenizer)
    return {"corpus": tokenizer.parent / "corpus", "tokenizer": tokenizer, "train": Path(cfg.data.train[0].path),
            "eval": Path(cfg.data.eval)}


def run_demo(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    gpus = visible_gpus()
    if args.nproc is None:
        args.nproc = min(2, gpus) if gpus else 2
    cfg = load_config(CONFIG, args.overrides)
    steps = cfg.train.steps
    interrupt_at = args.interrupt_at or round(steps * 0.6)
    if not 0 < interrupt_at < steps:
        raise UserError(f"--interrupt-at {interrupt_at} must lie between 0 and train.steps={steps}")
    parallel = resolve_world(cfg, args.nproc).parallel  # a layout that does not fit is refused before anything
    layout = f"tp={parallel.tp}, pp={parallel.pp}, dp={parallel.dp}, ZeRO-{parallel.zero_stage}"
    data = data_paths(cfg)
    out = Path(args.out)
    run_dir, export_dir = out / "run", out / "export"
    prepare_out(out)
    stages = Stages(STAGES + (INSTRUCT_STAGES if args.instruct else 0))
    config = shown(CONFIG)

    with stages.stage("Built-in corpus", "this Python's standard library sources as JSON lines (train and eval)"):
        pretrain(["data", "corpus", "--out", data["corpus"]]
                 + (["--max-mb", args.corpus_mb] if args.corpus_mb else []))
    with stages.stage("Tokenizer", f"a Mistral-shaped BPE tokenizer of {cfg.model.vocab_size} pieces"):
        pretrain(["tokenizer", "train", "--input", data["corpus"] / "train" / "*.jsonl", "--vocab-size",
                  cfg.model.vocab_size, "--out", data["tokenizer"]])
    with stages.stage("Token shards", f"packed sequences of {cfg.data.seq_len} tokens in checksummed shards"):
        for split in ("train", "eval"):
            pretrain(["data", "prepare", "--input", data["corpus"] / split / "*.jsonl", "--tokenizer",
                      data["tokenizer"], "--seq-len", cfg.data.seq_len, "--out", data[split]])

    train_args = ["train", config, *args.overrides, "--nproc", args.nproc, "--run-dir", run_dir]
    metrics = run_dir / "metrics.jsonl"
    with stages.stage("Training, interrupted",
                      f"{config} in {args.nproc} process{'es' if args.nproc > 1 else ''} "
                      f"({'one per GPU' if gpus else 'on CPU'}; {layout}); SIGTERM at step "
                      f"{interrupt_at}: every rank saves at the next step boundary and exits 75"):
        train_then_interrupt(train_args, metrics, interrupt_at)
        saved_step = newest_checkpoint(run_dir)
        console.print(f"launcher exited {EXIT_SAVED_ON_SIGNAL}: checkpoint saved at step {saved_step}")
    with stages.stage("Status", "where the run stands: steps, checkpoints (sha256 verified), last metrics"):
        pretrain(["status", run_dir])
    with stages.stage("Training, resumed", "the same command again: it continues from the newest verified "
                                           "checkpoint, bit-exact, to the end"):
        pretrain(train_args)
        losses = logged_steps(metrics)
        if max(losses) != steps:
            raise StageFailed(f"the resumed run stopped at step {max(losses)}, not {steps}")
    with stages.stage("Export", "the newest verified checkpoint as a transformers MistralForCausalLM directory"):
        pretrain(["export", run_dir, "--format", "hf", "--out", export_dir])
    with stages.stage("Generation with transformers", "AutoModelForCausalLM and AutoTokenizer on the export, "
                                                      f"sampling at temperature {SAMPLING['temperature']}"):
        hf_samples = transformers_samples(export_dir)
    with stages.stage("Generation with pretrain generate", "our model from the checkpoint, rolling key/value cache"):
        prompt = PROMPTS[0]
        output = pretrain(["generate", run_dir, "--prompt", prompt, "--max-new-tokens", SAMPLING["max_new_tokens"],
                           "--temperature", SAMPLING["temperature"], "--top-p", SAMPLING["top_p"],
                           "--seed", SAMPLING["seed"], "--json"], capture=True)
        generated = json.loads(output.splitlines()[-1])["text"]  # the last line: libraries may print before it
        console.print(Text.assemble((prompt, "bold"), generated), soft_wrap=True)

    instruct = run_instruct(args, cfg, data, out, run_dir, stages) if args.instruct else None
    evals = logged_steps(metrics, "eval")
    summary = {
        "run_dir": str(run_dir), "config": str(run_dir / "config.yaml"), "metrics": str(metrics),
        "loss_plot": str(run_dir / "loss.png"), "checkpoints": str(run_dir / "checkpoints"),
        "tensorboard": str(run_dir / "tensorboard"), "export": str(export_dir),
        "data": {name: str(path) for name, path in data.items()},
        "nproc": args.nproc, "steps": steps, "interrupted_at": saved_step,
        "first_loss": [min(losses), losses[min(losses)]], "final_loss": [steps, losses[steps]],
        "eval_loss": [[step, evals[step]] for step in sorted(evals)],
        "transformers_samples": hf_samples, "pretrain_generate": {prompt: generated},
        "stage_seconds": dict(stages.times), "total_seconds": time.perf_counter() - started,
        **({"instruct": instruct} if instruct else {}),
    }
    write_json_atomic(out / "summary.json", summary)
    print_summary(summary, out / "summary.json")
    return summary


def run_instruct(args: argparse.Namespace, cfg: Config, data: dict[str, Path], out: Path, base_run: Path,
                 stages: Stages) -> dict:
    """The --instruct stages: the built-in instruction set as chat shards, the fine-tune of the demo's model on them
    (configs/tiny-instruct.yaml, from its weights with a fresh optimizer), chat with the paper's guardrail prompt,
    and self-reflection moderation."""
    instruct_data = data["tokenizer"].parent / "instruct"
    corpus = data["tokenizer"].parent / "instruct-corpus"
    run_dir = out / "instruct"
    with stages.stage("Instruction data", "questions about standard-library functions answered by their docstrings, "
                                          "as chat shards whose loss mask keeps only the answers"):
        pretrain(["data", "instruct", "--out", corpus])
        for split in ("train", "eval"):
            pretrain(["data", "prepare", "--chat", "--input", corpus / split / "instruct.jsonl", "--tokenizer",
                      data["tokenizer"], "--seq-len", cfg.data.seq_len, "--out", instruct_data / split])
    # The demo's own overrides apply too (but its data and step count are the base run's).
    overrides = [o for o in args.overrides if not o.startswith(("data.train=", "data.eval=", "train.steps="))]
    overrides += [f"data.train=[{{path: {instruct_data / 'train'}}}]", f"data.eval={instruct_data / 'eval'}",
                  f"data.tokenizer={data['tokenizer']}", f"data.seq_len={cfg.data.seq_len}"]
    overrides += [f"train.steps={args.instruct_steps}"] if args.instruct_steps else []
    with stages.stage("Instruction fine-tuning", f"{shown(INSTRUCT_CONFIG)} from the weights of {shown(base_run)}, "
                                                 "with a fresh optimizer and schedule"):
        pretrain(["train", shown(INSTRUCT_CONFIG), *overrides, "--nproc", args.nproc, "--run-dir", run_dir,
                  "--init-from", base_run])
    losses, evals = logged_steps(run_dir / "metrics.jsonl"), logged_steps(run_dir / "metrics.jsonl", "eval")
    with stages.stage("Chat", "the fine-tuned model answers in Mistral's instruct format, with the paper's guardrail "
                              "system prompt"):
        output = pretrain(["chat", run_dir, "--message", QUESTION, "--guardrails", "--greedy", "--max-new-tokens",
                           SAMPLING["max_new_tokens"], "--json"], capture=True)
        reply = json.loads(output.splitlines()[-1])["reply"]
        console.print(Text.assemble((QUESTION + "\n", "bold"), reply), soft_wrap=True)
    with stages.stage("Moderation", "self-reflection: the model labels each text, with the label's probability "
                                    "read from its logits"):
        output = pretrain(["moderate", run_dir, "--text", *MODERATED, "--json"], capture=True)
        verdicts = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        for verdict in verdicts:
            console.print(f"{verdict['label']} (p={verdict['probability']:.3f}): {verdict['text']}", markup=False)
    return {"run_dir": str(run_dir), "first_loss": [min(losses), losses[min(losses)]],
            "final_loss": [max(losses), losses[max(losses)]], "eval_loss": [[k, evals[k]] for k in sorted(evals)],
            "chat": {QUESTION: reply}, "moderation": verdicts}


def print_summary(s: dict, path: Path) -> None:
    console.rule("[bold]Summary")
    (first_step, first), (last_step, last) = s["first_loss"], s["final_loss"]
    console.print(f"train loss {first:.3f} at step {first_step} -> {last:.3f} at step {last_step}"
                  + (f"; eval loss {s['eval_loss'][0][1]:.3f} at step {s['eval_loss'][0][0]} -> "
                     f"{s['eval_loss'][-1][1]:.3f} at step {s['eval_loss'][-1][0]}" if s["eval_loss"] else ""))
    console.print(f"interrupted by SIGTERM and saved at step {s['interrupted_at']}, resumed to step {s['steps']}")
    if "instruct" in s:
        (first_step, first), (last_step, last) = s["instruct"]["first_loss"], s["instruct"]["final_loss"]
        console.print(f"instruction fine-tuning: masked train loss {first:.3f} at step {first_step} -> {last:.3f} at "
                      f"step {last_step}; run directory {shown(s['instruct']['run_dir'])}")
    where = [("run directory", s["run_dir"]), ("resolved config", s["config"]), ("metrics", s["metrics"]),
             ("loss plot", s["loss_plot"]), ("TensorBoard", s["tensorboard"]), ("checkpoints", s["checkpoints"]),
             ("transformers export", s["export"]), *((f"data: {name}", p) for name, p in s["data"].items()),
             ("this summary", str(path))]
    for name, where_to in where:
        console.print(f"  {name:<20} {shown(where_to)}", markup=False, soft_wrap=True)
    console.print("stage times: " + ", ".join(f"{name} {sec:.0f} s" for name, sec in s["stage_seconds"].items()))
    console.print(f"[bold]total {s['total_seconds'] / 60:.1f} min[/]")


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        run_demo(args)
    except StageFailed as e:
        print(f"pretrain demo: error: {e}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job: data, tokenizer, shards, training interrupted and resumed, "
                                    "export to transformers and generation, on the built-in corpus")
    p.add_argument("overrides", nargs="*", help=f"dotted overrides of {shown(CONFIG)}, e.g. train.steps=400")
    p.add_argument("--out", default="runs/demo",
                   help="directory for the run and its export (default runs/demo; replaced on a re-run)")
    p.add_argument("--nproc", type=int,
                   help="training processes (default 2; on a GPU machine one per GPU, at most 2)")
    p.add_argument("--interrupt-at", type=int, help="step after which SIGTERM stops the run (default 60%% of steps)")
    p.add_argument("--corpus-mb", type=float, help="cap the built-in corpus's train split (default: all, 11 MB)")
    p.add_argument("--instruct", action="store_true",
                   help="then fine-tune the model on the built-in instruction set, chat with it and let it moderate")
    p.add_argument("--instruct-steps", type=int, help="fine-tuning steps (default: configs/tiny-instruct.yaml's)")
    p.set_defaults(func=cmd_demo)
