"""Training with real processes on CPU (gloo): layout parity (data, tensor, pipeline and context parallel) in float32
and in bf16, a run whose loss falls, resharding a checkpoint into another layout, exact resume after SIGTERM.

Parity tolerance: every layout computes the same float32 function of the same global batch; they differ only in
the order of float32 sums (gradient reduction over dp, tp all-reduces, micro-batch accumulation), about 1e-7
relative per step. Adam amplifies that little over 20 steps; 2e-4 relative on the loss leaves room for it while a
wrong shard, a missing gradient reduction or a skipped micro-batch moves the loss by 1e-2 or more (and a lost
optimizer state after resharding moves the next steps by more than that too).

bf16 takes the paths every GPU run takes (DeepSpeed's bf16 optimizer with float32 master weights, gradients
accumulated in float32 through the weights' `main_grad`, bf16 activations between ranks, the float32 gradient
reduction), which float32 runs never enter. Its tolerance comes from bf16's own rounding in this very run: the bf16
run in one process differs from the float32 one by D (the largest relative loss difference over the 20 steps, and the
relative distance of the final weights). A bf16 layout rounds in other places (tensor-parallel partial sums, the
order of float32 gradient sums, chunked attention), so it too lies about D from the float32 run, and two bf16 runs
lie within 2 D of each other; 3 D leaves room for the layouts that round in more places than one process does (a
tensor-parallel all-reduce of bf16 partial sums). A data-parallel rank whose gradients are not reduced, a wrong
shard or a lost micro-batch moves a run from float32's by far more than bf16's rounding does. These runs take a
learning rate of 1e-3: at the preset's 3e-3 the last of 20 steps are unsteady in every layout, float32 included (the
loss swings by 3 % between steps 16 and 20), which makes rounding differences of 1e-4 in step 15 into percents by
step 20; at 1e-3 the loss falls steadily, D is 5.2e-4 on the losses and 2.7e-3 on the weights, and the layouts
lie within 1e-4 and 1.5e-3 of the one-process run (measured on the CI machine). What bf16 takes on GPUs only is not
here: sequence parallelism (megatron-core allocates its gathers on CUDA), FP8 and the fused attention kernels; their
layouts are tested on GPUs (tests/test_training_gpu.py, tests/test_product_gpu.py, benchmarks/multi_gpu.sh).
"""

import json
import signal
import subprocess
import time

import pytest

from pretrain.checkpoint.store import step_dir_name
from tests.runs import ROOT, losses, metrics, run_train, train, train_command, trained_once

STEPS = 20
# The step-10 checkpoint of each layout is what the resharding tests load. The loss-spike guard judges from step 5
# against a window of 8 (128 and 64 by default): in every layout it decides, and must find no spike.
COMMON = [f"train.steps={STEPS}", "parallel.micro_batch=2", "checkpoint.every_steps=10",
          "train.spike_guard.window=8", "train.spike_guard.min_steps=4"]
TOLERANCE = 2e-4

LAYOUTS = {
    "single": ([], 1),
    "dp2-zero1": (["parallel.zero_stage=1", "train.eval_every=10"], 2),
    "dp2-zero2": (["parallel.zero_stage=2"], 2),
    "dp2-zero3": (["parallel.zero_stage=3"], 2),
    "tp2": (["parallel.tp=2"], 2),
    "pp2": (["parallel.pp=2"], 2),
    "tp2-pp2": (["parallel.tp=2", "parallel.pp=2"], 4),
    # Each sequence in two chunks of 64 tokens, the window (64) reaching 63 tokens into the chunk before; with
    # evaluation and a data worker, as users run it.
    "cp2": (["parallel.cp=2", "train.eval_every=10", "data.num_workers=1"], 2),
    # Two data-parallel replicas of two context-parallel ranks: each replica reads its own samples, ZeRO-3 partitions
    # over all four ranks.
    "cp2-dp2": (["parallel.cp=2", "parallel.zero_stage=3"], 4),
}
PARALLEL_LAYOUTS = [name for name in LAYOUTS if name != "single"]
BF16_LAYOUTS = ["single", "dp2-zero1", "dp2-zero2", "dp2-zero3", "tp2", "pp2", "cp2", "tp2-pp2"]
BF16 = ["train.dtype=bfloat16", "optim.lr=1e-3"]
LAYOUTS.update({f"bf16-{name}": ([*LAYOUTS[name][0], *BF16], LAYOUTS[name][1]) for name in BF16_LAYOUTS})
LAYOUTS["float32-lr1e-3"] = (BF16[1:], 1)


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    return trained_once(LAYOUTS, COMMON, tiny_data, tmp_path_factory)


def assert_close(got: dict[int, float], expected: dict[int, float], what: str) -> None:
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= TOLERANCE * abs(loss), f"{what} step {step}: {got[step]} vs {loss}"


@pytest.mark.parametrize("layout", PARALLEL_LAYOUTS)
def test_layout_matches_single_process(layout, runs):
    run_dir, got = runs(layout)
    assert sorted(got) == list(range(1, STEPS + 1))
    records = metrics(run_dir)
    assert not [r["step"] for r in records if r["kind"] == "spike"]
    # What the guard judged is what was logged: the loss and gradient norm over all ranks, not one rank's share.
    logged = {r["step"]: r for r in records if r["kind"] == "train"}
    window = json.loads((run_dir / "checkpoints" / step_dir_name(STEPS) / "trainer.json").read_text())["spike_window"]
    for key in ("loss", "grad_norm"):
        assert window[key] == pytest.approx([logged[step][key] for step in range(STEPS - 7, STEPS + 1)], rel=1e-6)
    assert_close(got, runs("single")[1], layout)


def final_weights(run_dir) -> dict:
    from pretrain.checkpoint.weights import load_weights

    return load_weights(run_dir).full_state


def weight_distance(got: dict, expected: dict) -> float:
    """Relative distance of two sets of the same weights, over all of them."""
    import torch

    difference = sum((got[name].double() - value.double()).square().sum() for name, value in expected.items())
    return float(torch.sqrt(difference / sum(value.double().square().sum() for value in expected.values())))


def loss_distance(got: dict[int, float], expected: dict[int, float]) -> float:
    return max(abs(got[step] - loss) / abs(loss) for step, loss in expected.items())


@pytest.fixture(scope="module")
def bf16_rounding(runs) -> tuple[float, float]:
    """D of the module docstring: how far bf16's rounding moves the one-process run from float32 (losses, weights)."""
    (single_dir, single), (bf16_dir, bf16) = runs("float32-lr1e-3"), runs("bf16-single")
    return loss_distance(bf16, single), weight_distance(final_weights(bf16_dir), final_weights(single_dir))


@pytest.mark.parametrize("layout", BF16_LAYOUTS[1:])
def test_bf16_layout_matches_single_process(layout, runs, bf16_rounding):
    loss_rounding, weight_rounding = bf16_rounding
    run_dir, got = runs(f"bf16-{layout}")
    reference_dir, reference = runs("bf16-single")
    assert sorted(got) == list(range(1, STEPS + 1))
    loss_error, weight_error = loss_distance(got, reference), weight_distance(final_weights(run_dir),
                                                                              final_weights(reference_dir))
    print(f"\nbf16 {layout} against bf16 in one process: losses {loss_error:.2e}, weights {weight_error:.2e}; bf16 "
          f"against float32 in one process: losses {loss_rounding:.2e}, weights {weight_rounding:.2e}")
    assert loss_error <= 3 * loss_rounding and weight_error <= 3 * weight_rounding


def test_two_process_run_learns_and_writes_metrics_and_plot(runs):
    run_dir, got = runs("dp2-zero1")
    assert got[STEPS] < got[1] - 1.0, got
    records = metrics(run_dir)
    train_record = next(r for r in records if r["kind"] == "train")
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_gpu", "step_time_s", "data_wait_s",
                "memory_gib", "checkpoint_stall_s", "skipped_steps", "rollbacks"):
        assert key in train_record
    assert [r["step"] for r in records if r["kind"] == "eval"] == [10, 20]
    startup = next(r for r in records if r["kind"] == "startup")
    assert startup["step"] == 1
    assert 0 < startup["model_s"] + startup["deepspeed_s"] + startup["first_step_s"] < startup["to_first_step_s"]
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert (run_dir / "config.yaml").is_file()


def checkpoint_shards(run_dir) -> dict[str, tuple[set[str], int]]:
    """The step-10 checkpoint's parameter files: the keys each holds and its size in bytes."""
    from safetensors import safe_open

    model_dir = run_dir / "checkpoints" / "step_00000010" / "model"
    return {path.name: (set(safe_open(str(path), framework="pt").keys()), path.stat().st_size)
            for path in sorted(model_dir.iterdir())}


@pytest.mark.parametrize("layout", ["dp2-zero1", "dp2-zero3"])
def test_data_parallel_ranks_share_a_checkpoint(layout, runs):
    """Each rank writes what its ZeRO partition holds (without a collective: tests/test_checkpoint_save.py): the two
    files hold about equal halves, every value once, and their fragments join into every tensor the one-process
    run's checkpoint holds, in its shape."""
    from pretrain.checkpoint.state import ShardReader
    from pretrain.config import load_config

    got = checkpoint_shards(runs(layout)[0])
    assert list(got) == ["tp00-pp00-dp0000.safetensors", "tp00-pp00-dp0001.safetensors"]
    (first, first_size), (second, second_size) = got.values()
    assert not {key for key in first & second if not key.startswith("shape/")}
    assert max(first_size, second_size) < 1.5 * min(first_size, second_size), (first_size, second_size)
    model = load_config(ROOT / "configs" / "tiny.yaml", ["data.tokenizer=null"]).model
    shared, single = (ShardReader(runs(name)[0] / "checkpoints" / "step_00000010", model)
                      for name in (layout, "single"))
    assert sorted(shared.index) == sorted(single.index)
    for key in single.index:
        assert shared.full(key).shape == single.full(key).shape, key


def test_rank_share_splits_a_checkpoint_over_data_parallel_ranks():
    """Every parameter to exactly one rank, each share in name order, the same shares whatever order a rank lists
    its parameters in, balanced by size; a ZeRO-3 parameter (empty `.shape`) counts at its whole size."""
    import torch

    from pretrain.checkpoint.state import rank_share, unpartitioned_shape

    def parameter(shape, zero3=False):
        param = torch.nn.Parameter(torch.empty(0 if zero3 else shape))
        if zero3:
            param.ds_shape = torch.Size(shape)
        return param

    canonical = {parameter((8 * (i % 5 + 1), 16), zero3=i % 3 == 0): f"layers.{i}.w" for i in range(20)}
    reordered = dict(reversed(canonical.items()))
    largest = max(unpartitioned_shape(param).numel() for param in canonical)
    for dp_size in (1, 2, 3, 4):
        shares = [rank_share(canonical, dp_rank, dp_size) for dp_rank in range(dp_size)]
        assert shares == [rank_share(reordered, dp_rank, dp_size) for dp_rank in range(dp_size)]
        names = [[name for name, _ in share] for share in shares]
        assert all(share == sorted(share) for share in names)
        assert sorted(sum(names, [])) == sorted(canonical.values())
        loads = [sum(unpartitioned_shape(param).numel() for _, param in share) for share in shares]
        assert max(loads) - min(loads) <= largest, loads
    # Counted at 0, the ZeRO-3 parameter "a" would leave "b" on rank 0 too.
    canonical = {parameter((100,), zero3=True): "a", parameter((60,)): "b", parameter((40,)): "c"}
    assert [[name for name, _ in rank_share(canonical, dp_rank, 2)] for dp_rank in (0, 1)] == [["a"], ["b", "c"]]


RESHARDS = [("dp2-zero1", "single"), ("single", "dp2-zero3"), ("tp2", "single"), ("pp2", "single"),
            ("dp2-zero3", "tp2"), ("cp2", "single"), ("single", "cp2")]


@pytest.mark.parametrize(("source", "target"), RESHARDS, ids=[f"{s}-to-{t}" for s, t in RESHARDS])
def test_checkpoint_continues_in_another_layout(source, target, runs, tiny_data, tmp_path):
    """Load the source layout's step-10 checkpoint (weights and Adam state) into the target layout: the next step's
    loss is the loss of the loaded weights, and the steps after it follow the source run as closely as two layouts
    of one run do."""
    source_dir, source_losses = runs(source)
    overrides, nproc = LAYOUTS[target]
    checkpoint = source_dir / "checkpoints" / "step_00000010"
    got = train(tmp_path / "resharded", tiny_data, COMMON + overrides, nproc, ["--resume-from", str(checkpoint)])
    assert sorted(got) == list(range(11, STEPS + 1))
    assert abs(got[11] - source_losses[11]) <= 1e-5 * abs(source_losses[11])
    assert_close(got, {step: source_losses[step] for step in got}, f"{source} -> {target}")


@pytest.mark.parametrize("layout", ["dp2-zero1", "tp2", "cp2"])
def test_sigterm_then_resume_is_bit_exact(layout, runs, tiny_data, tmp_path):
    overrides, nproc = LAYOUTS[layout]
    uninterrupted = runs(layout)[1]
    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen(train_command(run_dir, tiny_data, COMMON + overrides, nproc), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics_file = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics_file.is_file() and len(metrics_file.read_text().splitlines()) >= 5):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 75
    stopped_at = max(losses(run_dir))
    assert stopped_at < STEPS
    result = run_train(run_dir, tiny_data, COMMON + overrides, nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}," in result.stderr
    assert losses(run_dir) == uninterrupted  # every step's loss, to the last bit


def test_save_final_off_leaves_no_checkpoint(tiny_data, tmp_path):
    """Benchmarks of the full 7B end without its 87 GB save: checkpoint.save_final=false."""
    from pretrain.checkpoint.store import complete_steps

    run_dir = tmp_path / "run"
    got = train(run_dir, tiny_data, ["train.steps=2", "parallel.micro_batch=8", "checkpoint.every_steps=0",
                                     "checkpoint.save_final=false"])
    assert sorted(got) == [1, 2]
    assert complete_steps(run_dir / "checkpoints") == []


def test_a_resumed_compiled_run_reuses_the_compilation_in_its_run_directory(tiny_data, tmp_path, monkeypatch):
    """torch.compile's caches live in RUN_DIR/compile-cache (launch.rank): the resumed start loads the compiled
    decoder layer instead of compiling it again (about 30 s against 6 s here on 2 cores)."""
    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        # Set ones win; inductor sets the first in this process once anything here has compiled.
        monkeypatch.delenv(variable, raising=False)
    run_dir = tmp_path / "run"
    overrides = ["parallel.micro_batch=8", "train.compile=true"]
    train(run_dir, tiny_data, overrides + ["train.steps=1"])
    train(run_dir, tiny_data, overrides + ["train.steps=2"])
    first, resumed = (r["first_step_s"] for r in metrics(run_dir) if r["kind"] == "startup")
    assert (run_dir / "compile-cache" / "inductor").is_dir()
    assert resumed < first / 2, (first, resumed)
