"""Parameter, FLOP and memory counts against values computed by hand."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config, resolve_world
from pretrain.hardware import datasheet_peak_tflops, peak_flops
from pretrain.plan import (
    activation_bytes_per_layer,
    checkpoint_bytes_per_rank,
    context_parallel_traffic,
    count_parameters,
    flops_per_token,
    mean_attended_keys,
    memory_per_gpu,
    parameters_per_rank,
    plan_peak_tflops,
)

ROOT = Path(__file__).resolve().parents[1]
MISTRAL = ROOT / "configs" / "mistral-7b.yaml"


def _plan(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "launch.cli", "plan", str(MISTRAL), *args],
                          capture_output=True, text=True, cwd=ROOT, check=True).stdout


def test_mistral_7b_parameter_count_by_hand():
    m = load_config(MISTRAL).model
    # Per layer: q 4096*4096 + k,v 2*4096*1024 + o 4096*4096 + MLP 3*4096*14336 + two norms 2*4096.
    per_layer = 16_777_216 + 8_388_608 + 16_777_216 + 176_160_768 + 8_192
    assert per_layer == 218_112_000
    total = 32 * per_layer + 2 * 32_000 * 4096 + 4096
    c = count_parameters(m)
    assert c["per_layer"] == per_layer
    assert c["total"] == total == 7_241_732_096
    assert round(c["total"] / 1e9, 2) == 7.24
    assert c["matmul"] == total - 32_000 * 4096 - 32 * 8192 - 4096


def test_mean_attended_keys_by_hand():
    # Full causal over 4 positions: (1 + 2 + 3 + 4) / 4.
    assert mean_attended_keys(4, None) == 2.5
    # Window 2 over 4 positions: 1, 2, 2, 2.
    assert mean_attended_keys(4, 2) == 7 / 4
    # Mistral: S=8192, W=4096: (4096*4097/2 + 4096*4096) / 8192.
    assert mean_attended_keys(8192, 4096) == 3072.25
    assert mean_attended_keys(100, 500) == mean_attended_keys(100, None)


def test_flops_per_token_by_hand():
    m = load_config(MISTRAL).model
    f = flops_per_token(m, 8192)
    assert f["dense"] == 6 * 7_110_393_856
    assert f["attention"] == 12 * 32 * 32 * 128 * 3072.25
    assert f["total"] == pytest.approx(47.4946e9, rel=1e-4)


def test_parameters_per_rank_shard_over_tp_and_pp():
    m = load_config(MISTRAL).model
    assert parameters_per_rank(m, 1, 1) == 7_241_732_096
    sharded_layer = (218_112_000 - 8192) // 2 + 8192
    assert parameters_per_rank(m, 2, 1) == 32 * sharded_layer + 32_000 * 4096 + 4096
    assert parameters_per_rank(m, 1, 4) == 8 * 218_112_000 + 32_000 * 4096 + 4096


def test_zero_stages_shard_what_they_should():
    cfg = resolve_world(load_config(MISTRAL, ["parallel.activation_checkpointing=full"]), 8)
    n = 7_241_732_096
    z1 = memory_per_gpu(cfg, 8)
    # ZeRO-1 in bf16 accumulates every gradient in float32 (DeepSpeed's bf16 optimizer).
    assert (z1.weights, z1.gradients, z1.optimizer) == (2 * n, 4 * n, 12 * n / 8)
    z3 = memory_per_gpu(resolve_world(load_config(MISTRAL, ["parallel.zero_stage=3"]), 8), 8)
    assert (z3.weights, z3.gradients, z3.optimizer) == (2 * n / 8, 2 * n / 8, 12 * n / 8)
    # Full recomputation keeps one bf16 hidden state per layer: 8192 tokens * 4096 * 2 bytes * 32 layers.
    assert z1.activations == 8192 * 4096 * 2 * 32


@pytest.mark.parametrize("compile", [True, False])
@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_sequence_parallel_splits_the_norm_activations_over_tp(checkpointing, compile):
    common = ["parallel.tp=2", f"parallel.activation_checkpointing={checkpointing}", f"train.compile={compile}"]
    tp2 = load_config(MISTRAL, common)
    sp = load_config(MISTRAL, [*common, "parallel.sequence_parallel=true"])
    # bf16; 8192 tokens of width 4096, halved: the layer input (full recomputation), or the two norm inputs, and in
    # eager mode the two norm outputs too (compiled, the projections keep them gathered).
    halved = 1 if checkpointing == "full" else 2 if compile else 4
    assert activation_bytes_per_layer(tp2, 2) - activation_bytes_per_layer(sp, 2) == 8192 * 4096 * 2 * halved / 2


def test_context_parallel_splits_activations_and_zero_state_and_counts_the_halo():
    long = ["data.seq_len=131072", "model.max_seq_len=131072", "parallel.activation_checkpointing=full"]
    cp1 = resolve_world(load_config(MISTRAL, long), 2)
    cp2 = resolve_world(load_config(MISTRAL, [*long, "parallel.cp=2"]), 2)
    assert (cp1.parallel.dp, cp2.parallel.dp) == (2, 1)
    one, two = memory_per_gpu(cp1, 2), memory_per_gpu(cp2, 1)
    # ZeRO-1 partitions the optimizer over dp x cp = 2 either way; each rank keeps half the sequence's activations.
    assert two.optimizer == one.optimizer and two.activations == one.activations / 2 and two.logits == one.logits / 2
    # bf16 keys and values of 4095 positions (W - 1), 8 kv heads of 128: 16 MiB per layer, where an all-gather of the
    # other half of the sequence would bring 65,536 positions: 256 MiB.
    halo, gathered = context_parallel_traffic(load_config(MISTRAL, [*long, "parallel.cp=2"]), 2)
    assert (halo, gathered) == (4095 * 2 * 8 * 128 * 2, 65536 * 2 * 8 * 128 * 2)
    out = _plan(*long, "parallel.cp=2", "--world-size", "2")
    assert "cp=2 dp=1 (world 2)" in out and "16.0 MiB" in out and "256.0 MiB" in out


def test_plan_command_prints_7_24_b():
    out = _plan()
    assert "7.24 B (7,241,732,096)" in out
    assert "tokens/s/GPU" in out and "memory per GPU" in out


def test_a_checkpoint_save_communicates_nothing():
    """The 7B at tp=2 on 8 GPUs (dp=4, ZeRO-1): each rank copies the 12 bytes of float32 master and Adam state of a
    quarter of its shard's parameters and sends none of them; until 2026-12-07 a save all-reduced the 12 bytes of
    every parameter of the shard on every rank (40.47 GiB, 43.5 GB)."""
    n = parameters_per_rank(load_config(MISTRAL).model, tp=2, pp=1)
    cfg = resolve_world(load_config(MISTRAL, ["parallel.tp=2"]), 8)
    assert checkpoint_bytes_per_rank(cfg, cfg.parallel.dp) == 12 * n / 4
    assert f"{12 * n / 4 / 2**30:.2f} {12 * n / 2**30:.2f}" == "10.12 40.47"
    out = " ".join(_plan("parallel.tp=2", "--world-size", "8").replace("│", " ").split())  # the table's rows, unwrapped
    assert ("checkpoint save per rank 10.12 GiB of float32 master and Adam state copied to host memory and written; "
            "0 bytes communicated (until 2026-12-07: 40.47 GiB") in out


# Names as torch.cuda.get_device_name() reports them.
@pytest.mark.parametrize("device_name, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", ("NVIDIA H100 SXM", 989.0)),
    ("NVIDIA H100 80GB HBM3", "float32", ("NVIDIA H100 SXM", 67.0)),
    ("NVIDIA H100 PCIe", "bfloat16", ("NVIDIA H100 PCIe", 756.0)),
    ("NVIDIA H100 NVL", "bfloat16", ("NVIDIA H100 NVL", 835.0)),
    ("NVIDIA H200", "bfloat16", ("NVIDIA H200 SXM", 989.0)),
    ("NVIDIA GH200 480GB", "bfloat16", ("NVIDIA GH200", 989.0)),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", ("NVIDIA A100", 312.0)),
    ("NVIDIA A100-PCIE-40GB", "float32", ("NVIDIA A100", 19.5)),
    ("NVIDIA L40S", "bfloat16", ("NVIDIA L40S", 362.05)),
    ("NVIDIA B200", "bfloat16", ("NVIDIA B200", 2250.0)),
    ("AMD Instinct MI300X", "bfloat16", ("AMD Instinct MI300X", 1307.4)),
])
def test_datasheet_peak_of_real_device_names(device_name, dtype, expected):
    assert datasheet_peak_tflops(device_name, dtype) == expected


@pytest.mark.parametrize("device_name, dtype", [
    ("NVIDIA GeForce RTX 4090", "bfloat16"),  # not in the table
    ("NVIDIA L40", "bfloat16"),  # an L40S is not an L40
    ("NVIDIA H20", "bfloat16"),  # nor is an H20 an H200
    ("NVIDIA B200", "float32"),  # a dtype the table does not state
])
def test_no_datasheet_peak_for_what_the_table_does_not_know(device_name, dtype):
    assert datasheet_peak_tflops(device_name, dtype) is None


def test_run_peak_comes_from_the_config_then_the_device():
    notes = []
    cfg = load_config(MISTRAL)
    assert peak_flops(cfg, "NVIDIA A100-SXM4-80GB", notes.append) == 312e12
    assert peak_flops(load_config(MISTRAL, ["train.dtype=float32"]), "NVIDIA H200", notes.append) == 67e12
    overridden = load_config(MISTRAL, ["logging.peak_tflops=500"])
    assert peak_flops(overridden, "NVIDIA GeForce RTX 4090", notes.append) == 500e12
    assert peak_flops(cfg, None, notes.append) is None  # no GPU: no MFU, nothing to tell
    assert notes == []


def test_unknown_gpu_gets_no_mfu_and_one_note_naming_the_key():
    notes = []
    assert peak_flops(load_config(MISTRAL), "NVIDIA GeForce RTX 4090", notes.append) is None
    assert notes == ["MFU is not logged: no datasheet peak of NVIDIA GeForce RTX 4090 in bfloat16 is known here; "
                     "set logging.peak_tflops=<dense TFLOP/s of one GPU> to log it"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_of_this_gpu():
    name = torch.cuda.get_device_name()
    notes = []
    peak = peak_flops(load_config(MISTRAL), name, notes.append)
    found = datasheet_peak_tflops(name, "bfloat16")
    assert (peak, len(notes)) == ((found[1] * 1e12, 0) if found else (None, 1)), name


def test_plan_peak_is_the_flag_then_the_config_then_the_h100_named_as_such():
    cfg = load_config(MISTRAL)
    assert plan_peak_tflops(cfg, None) == (
        989.0, "NVIDIA H100 SXM datasheet, dense bfloat16; --peak-tflops or logging.peak_tflops for another GPU")
    assert plan_peak_tflops(load_config(MISTRAL, ["train.dtype=float32"]), None)[0] == 67.0
    configured = load_config(MISTRAL, ["logging.peak_tflops=312"])
    assert plan_peak_tflops(configured, None) == (312.0, "logging.peak_tflops")
    assert plan_peak_tflops(configured, 756.0) == (756.0, "--peak-tflops")


def test_plan_command_names_the_peak_it_divides_by():
    assert "at 50% of 989 TFLOP/s (NVIDIA H100 SXM datasheet, dense bfloat16;" in " ".join(_plan().split())
    assert "at 50% of 312 TFLOP/s (logging.peak_tflops)" in " ".join(_plan("logging.peak_tflops=312").split())
