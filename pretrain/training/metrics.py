"""Training metrics: the values logged of the training steps (`StepMetrics`), written as JSON lines (always),
TensorBoard and W&B (when configured), with a progress display with ETA and the loss plot written at the end of a run
(`MetricsLogger`). Only the global rank 0 writes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pretrain.config import Config
from pretrain.plan import flops_per_token


class MetricsLogger:
    def __init__(self, cfg: Config, run_dir: Path, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_step = start_step
        self.started = time.monotonic()
        self.path = run_dir / "metrics.jsonl"
        self.run_dir = run_dir
        self._tensorboard = None
        self._wandb = None
        self._progress = None
        if not enabled:
            return
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.logging.wandb_project:
            import wandb

            self._wandb = wandb.init(project=cfg.logging.wandb_project, dir=str(run_dir),
                                     config=cfg.model_dump(mode="json"), resume="allow", id=run_dir.name)
        if sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                      TextColumn("{task.description}"), TimeElapsedColumn(), TimeRemainingColumn())
            self._task = self._progress.add_task("", total=total_steps, completed=start_step)
            self._progress.start()

    def eta_seconds(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.monotonic() - self.started) / done * (self.total_steps - step)

    def log(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        """Record and show on the terminal (progress bar or a line)."""
        if not self.enabled:
            return
        self.write(step, values, kind)
        summary = _summary(values)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, description=summary)
        else:
            eta = self.eta_seconds(step)
            eta_text = "" if eta != eta else f" eta {_duration(eta)}"
            print(f"[{kind}] step {step}/{self.total_steps} {summary}{eta_text}", file=sys.stderr, flush=True)

    def write(self, step: int, values: dict[str, float], kind: str) -> None:
        """Record only: metrics.jsonl, TensorBoard, W&B."""
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": time.time(), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        # Their charts take numbers; a record's names and ranges (a spike's) stay in metrics.jsonl.
        scalars = {key: value for key, value in values.items() if isinstance(value, int | float)}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(f"{kind}/{key}", value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self, plot: bool = True) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
        if plot:
            plot_losses(self.path, self.run_dir / "loss.png")


class StepMetrics:
    """The values logged of the training steps (`values`): the last step's loss, learning rate and gradient norm;
    throughput (tokens/s, MFU), step time and data wait over the window of steps since the last log (`start_window`
    starts one, `add_data_wait` adds a step's); peak memory; the last save's stall and write times; the run's
    counters. `engine`, `checkpointer` and `state` are the trainer's."""

    def __init__(self, cfg: Config, engine, checkpointer, state, world: int, device, peak_flops: float | None):
        self.engine, self.checkpointer, self.state = engine, checkpointer, state
        self.world, self.device, self.peak_flops = world, device, peak_flops
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)["total"]
        self.start_window()

    def start_window(self) -> None:
        self.window_start = time.perf_counter()
        self.window_first_step, self.window_first_tokens, self.window_wait = self.state.step, self.state.tokens, 0.0

    def add_data_wait(self, seconds: float) -> None:
        self.window_wait += seconds

    def values(self, loss: float) -> dict[str, float]:
        elapsed = time.perf_counter() - self.window_start
        steps = max(1, self.state.step - self.window_first_step)
        tokens_per_s = (self.state.tokens - self.window_first_tokens) / elapsed
        values = {
            "loss": loss,
            "lr": self.engine.get_lr()[0],
            "tokens": self.state.tokens,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_gpu": tokens_per_s / self.world,
            "step_time_s": elapsed / steps,
            "data_wait_s": self.window_wait / steps,
            "checkpoint_stall_s": self.checkpointer.last_stall_s,
            "checkpoint_write_s": self.checkpointer.last_write_s,
            **self.state.counters(),
        }
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:  # DeepSpeed does not keep it without ZeRO
            values["grad_norm"] = float(grad_norm)
        if self.peak_flops is not None:
            values["mfu"] = tokens_per_s / self.world * self.flops_per_token / self.peak_flops
        if self.device is not None:
            import torch

            values["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            import psutil

            values["memory_gib"] = psutil.Process().memory_info().rss / 2**30
        return values


def _summary(values: dict[str, float]) -> str:
    keys = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s")
    return " ".join(f"{k} {values[k]:.4g}" for k in keys if k in values)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def read_metrics(path: Path, offset: int = 0) -> list[dict]:
    """The JSON records of `path` (metrics.jsonl, or another file of JSON lines) from byte `offset` on; a line cut
    short (by a kill in the middle of its write) is skipped."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def plot_losses(metrics_path: Path, out: Path) -> None:
    """Train (and eval) loss against step; a resumed run's repeated steps keep their latest value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, float]] = {}
    for record in read_metrics(metrics_path):
        if "loss" in record:
            series.setdefault(record["kind"], {})[record["step"]] = record["loss"]
    if not series:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, points in sorted(series.items()):
        steps = sorted(points)
        ax.plot(steps, [points[s] for s in steps], label=f"{kind} loss", marker="o" if kind == "eval" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)


class StepProfiler:
    """torch.profiler over three steps from `first_step`, on rank 0: a Chrome trace and a table of the operators
    and kernels that took the most device time (CPU time without a GPU), in RUN_DIR/profile/."""

    STEPS = 3

    def __init__(self, first_step: int, run_dir: Path, enabled: bool):
        self.first_step = first_step if enabled else 0
        self.out = run_dir / "profile"
        self._profile = None

    def before_step(self, step: int) -> None:
        """`step` is the number the coming step will have (1-based)."""
        if self.first_step and step == self.first_step:
            import torch

            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profile = torch.profiler.profile(activities=activities)
            self._profile.__enter__()

    def after_step(self, step: int) -> None:
        if self._profile is None or step < self.first_step + self.STEPS - 1:
            return
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._profile.__exit__(None, None, None)
        self.out.mkdir(exist_ok=True)
        self._profile.export_chrome_trace(str(self.out / f"trace-steps-{self.first_step}-{step}.json"))
        sort = "device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = self._profile.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
        (self.out / "top.txt").write_text(f"steps {self.first_step}-{step}, sorted by {sort}\n{table}\n")
        self._profile = None
