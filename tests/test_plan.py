"""Parameter, FLOP and memory counts against values computed by hand."""

import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import load_config, resolve_world
from pretrain.plan import (
    count_parameters,
    flops_per_token,
    mean_attended_keys,
    memory_per_gpu,
    parameters_per_rank,
)

ROOT = Path(__file__).resolve().parents[1]
MISTRAL = ROOT / "configs" / "mistral-7b.yaml"


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
    assert (z1.weights, z1.gradients, z1.optimizer) == (2 * n, 2 * n, 12 * n / 8)
    z3 = memory_per_gpu(resolve_world(load_config(MISTRAL, ["parallel.zero_stage=3"]), 8), 8)
    assert (z3.weights, z3.gradients, z3.optimizer) == (2 * n / 8, 2 * n / 8, 12 * n / 8)
    # Full recomputation keeps one bf16 hidden state per layer: 8192 tokens * 4096 * 2 bytes * 32 layers.
    assert z1.activations == 8192 * 4096 * 2 * 32


def test_plan_command_prints_7_24_b():
    out = subprocess.run([sys.executable, "-m", "launch.cli", "plan", str(MISTRAL)],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "7.24 B (7,241,732,096)" in out
    assert "tokens/s/GPU" in out and "memory per GPU" in out
