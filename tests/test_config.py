"""Config schema: presets load, overrides apply, and every validation rule fails with a one-line message
that names the key and the fix."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pretrain.config import (
    ConfigError,
    check_paths,
    check_zero_stage_for_dtype,
    load_config,
    resolve_world,
    save_resolved,
)

ROOT = Path(__file__).resolve().parents[1]
MISTRAL = ROOT / "configs" / "mistral-7b.yaml"
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert cfg.model.n_heads % cfg.parallel.tp == 0


def test_mistral_preset_is_the_paper_architecture():
    m = load_config(MISTRAL).model
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim) == (4096, 32, 32, 8, 128)
    assert (m.hidden_dim, m.vocab_size, m.sliding_window, m.rope_theta, m.norm_eps) == (14336, 32000, 4096, 1e4, 1e-5)


def test_tiny_preset_has_gqa_and_a_window_shorter_than_its_sequence():
    cfg = load_config(TINY)
    assert cfg.model.n_kv_heads < cfg.model.n_heads
    assert cfg.model.sliding_window < cfg.data.seq_len


def test_layout_presets_inherit_the_model():
    four = load_config(ROOT / "configs" / "mistral-7b-4gpu.yaml")
    assert four.model == load_config(MISTRAL).model
    assert (four.parallel.tp, four.slurm.gpus_per_node) == (2, 4)
    # Where tp is used, with sequence parallelism and its gathers and scatters fused with their matmuls (measured
    # faster than tp alone on 2 H200s).
    for preset in ("mistral-7b-4gpu.yaml", "mistral-7b-8x8.yaml"):
        parallel = load_config(ROOT / "configs" / preset).parallel
        assert parallel.sequence_parallel and parallel.async_tensor_parallel, preset


def test_overrides_are_typed():
    cfg = load_config(MISTRAL, ["optim.lr=1e-4", "parallel.tp=2", "model.sliding_window=null", "train.compile=false"])
    assert cfg.optim.lr == 1e-4 and cfg.parallel.tp == 2
    assert cfg.model.sliding_window is None and cfg.train.compile is False


def test_list_override():
    cfg = load_config(TINY, ["data.train=[{path: a, weight: 2}, {path: b}]"])
    assert [(s.path, s.weight) for s in cfg.data.train] == [("a", 2.0), ("b", 1.0)]


def _error(overrides, path=MISTRAL) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_the_nearest_valid_one():
    assert _error(["model.n_hedas=4"]) == "unknown config key model.n_hedas: did you mean model.n_heads?"
    assert "did you mean optim?" in _error(["optimm.lr=1"])


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"parallel": {"tensor_paralel": 2}}))
    assert "unknown config key parallel.tensor_paralel" in _error([], path)


def test_wrong_type():
    message = _error(["optim.lr=fast"])
    assert message.startswith("config key optim.lr='fast'") and "number" in message


def test_query_heads_not_divisible_by_tp():
    message = _error(["parallel.tp=3"])
    assert "model.n_heads=32 is not divisible by parallel.tp=3" in message and "[1, 2, 4, 8]" in message


def test_kv_heads_not_divisible_by_tp():
    assert "model.n_kv_heads=8 is not divisible by parallel.tp=16" in _error(["parallel.tp=16"])


def test_hidden_dim_not_divisible_by_tp():
    message = _error(["model.hidden_dim=14335", "parallel.tp=2"])
    assert message == ("model.hidden_dim=14335 is not divisible by parallel.tp=2: each tensor-parallel rank holds an "
                       "equal slice of the MLP; set hidden_dim to a multiple of 2 or choose tp from [1]")


def test_vocab_not_divisible_by_tp():
    message = _error(["model.vocab_size=32001", "parallel.tp=2"])
    assert "model.vocab_size=32001 is not divisible by parallel.tp=2" in message
    assert "pad vocab_size to a multiple of 2 or choose tp from [1]" in message


def test_tp_hint_lists_only_sizes_that_fit_every_dimension():
    # 32 and 8 heads allow tp 8, a hidden size of 14340 (4 x 3585) only 4.
    message = _error(["model.vocab_size=32004", "model.hidden_dim=14340", "parallel.tp=8"])
    assert message.startswith("model.hidden_dim=14340 is not divisible by parallel.tp=8")
    assert message.endswith("choose tp from [1, 2, 4]")


def test_odd_head_dim_is_refused():
    assert _error(["model.head_dim=127"]) == ("model.head_dim=127 is odd: rotary embeddings rotate pairs of "
                                               "dimensions; choose an even head_dim")


def test_document_masking_with_pipeline_is_refused():
    message = _error(["model.document_masking=true", "parallel.pp=2", "data.tokenizer=data/tokenizer"])
    assert message.startswith("model.document_masking=true with parallel.pp=2")
    assert message.endswith("set model.document_masking=false or parallel.pp=1")


def test_document_masking_needs_a_tokenizer():
    assert "model.document_masking=true needs data.tokenizer" in _error(["model.document_masking=true"])
    cfg = load_config(MISTRAL, ["model.document_masking=true", "data.tokenizer=data/tokenizer"])
    assert cfg.model.document_masking


def test_flash_attention_in_float32_is_refused():
    message = _error(["model.attention_backend=flash", "train.dtype=float32"])
    assert message.startswith("model.attention_backend=flash with train.dtype=float32")
    assert load_config(MISTRAL, ["model.attention_backend=flash", "train.dtype=bfloat16"]).train.dtype == "bfloat16"


@pytest.mark.parametrize("limit", ["90", "30:00", "48:00:00", "2-00:00:00"])
def test_slurm_time_limits_slurm_takes(limit):
    assert load_config(TINY, [f"slurm.time='{limit}'"]).slurm.time == limit


@pytest.mark.parametrize("limit", ["1h", "48:00:00:00", "", "2-"])
def test_slurm_time_that_slurm_would_refuse(limit):
    assert _error([f"slurm.time='{limit}'"], TINY) == (f"slurm.time={limit!r} is not a Slurm time: write HH:MM:SS, "
                                                       "D-HH:MM:SS or minutes")


def test_peak_tflops_must_be_positive():
    assert load_config(TINY, ["logging.peak_tflops=312"]).logging.peak_tflops == 312.0
    assert _error(["logging.peak_tflops=0"]).startswith("config key logging.peak_tflops=0")


def test_max_restarts_is_a_count():
    assert load_config(TINY).launch.max_restarts == 3
    assert load_config(TINY, ["launch.max_restarts=0"]).launch.max_restarts == 0
    assert _error(["launch.max_restarts=-1"]) == ("config key launch.max_restarts=-1: input should be greater than or "
                                                  "equal to 0; fix the value in the YAML or override")


def test_spike_guard_defaults_are_olmo_cores_and_its_values_are_checked():
    guard = load_config(TINY).train.spike_guard
    assert (guard.enabled, guard.window, guard.sigmas, guard.min_steps) == (True, 128, 6.0, 64)
    assert _error(["train.spike_guard.min_steps=200"]) == (
        "train.spike_guard.min_steps=200 exceeds window=128, which never holds that many steps: set min_steps <= "
        "window")
    assert _error(["train.spike_guard.sigmas=0"]).startswith("config key train.spike_guard.sigmas=0")
    assert "train.inject_spike_batches works with parallel.pp=1 only" in _error(["parallel.pp=2",
                                                                               "train.inject_spike_batches=[3]"])
    # Its earlier name, from when only non-finite steps were skipped, still reads.
    assert load_config(TINY, ["train.max_nonfinite_in_row=2"]).train.max_skipped_in_row == 2


def test_layers_not_divisible_by_pp():
    assert "model.n_layers=32 is not divisible by parallel.pp=3" in _error(["parallel.pp=3"])


def test_global_batch_not_divisible_by_micro_batch_times_dp():
    message = _error(["parallel.dp=3", "parallel.micro_batch=2", "train.global_batch=512"])
    assert "train.global_batch=512 is not divisible by parallel.micro_batch * dp = 2 * 3 = 6" in message


def test_window_larger_than_allowed():
    assert "model.sliding_window=9000 is larger than model.max_seq_len=8192" in _error(["model.sliding_window=9000"])


def test_sequence_longer_than_the_model_allows():
    assert "data.seq_len=16384 exceeds model.max_seq_len=8192" in _error(["data.seq_len=16384"])


def test_zero_2_with_pipeline_is_refused_with_the_reason():
    message = _error(["parallel.pp=2", "parallel.zero_stage=2"])
    assert "pipeline engine runs only ZeRO 0 or 1" in message


ZERO_0_IN_BF16 = ("DeepSpeed keeps float32 master weights and float32 gradient accumulation only under ZeRO (stage 1 "
                  "at dp=1 partitions nothing and costs nothing); set parallel.zero_stage=1 (or train.dtype=float32)")


@pytest.mark.parametrize("layout", [[], ["parallel.pp=2"]], ids=["pp1", "pp2"])
def test_zero_0_in_bfloat16_is_refused_with_the_fix(layout):
    """DeepSpeed 0.19 would stop in deepspeed.initialize with `NotImplementedError: unsupported mix`."""
    message = _error([*layout, "parallel.zero_stage=0", "train.dtype=bfloat16"], path=TINY)
    assert message == f"parallel.zero_stage=0 with bfloat16: {ZERO_0_IN_BF16}"


def test_zero_0_with_auto_dtype_is_refused_where_auto_is_bfloat16():
    """`auto` is float32 on CPU and bfloat16 on a GPU: the config loads, and the engine's build checks it there."""
    for dtype in ("float32", "auto"):
        assert load_config(TINY, ["parallel.zero_stage=0", f"train.dtype={dtype}"]).parallel.zero_stage == 0
    cfg = load_config(TINY, ["parallel.zero_stage=0"])
    check_zero_stage_for_dtype(cfg, "float32")
    with pytest.raises(ConfigError) as e:
        check_zero_stage_for_dtype(cfg, "bfloat16")
    assert str(e.value) == f"parallel.zero_stage=0 with bfloat16 (train.dtype=auto on a GPU): {ZERO_0_IN_BF16}"


def test_sequence_parallel_combinations_that_cannot_work_are_refused():
    assert _error(["parallel.sequence_parallel=true"]).startswith(
        "parallel.sequence_parallel=true needs parallel.tp > 1")
    assert _error(["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"]).endswith(
        "set parallel.sequence_parallel=false or parallel.pp=1")
    message = _error(["parallel.tp=4", "parallel.sequence_parallel=true", "data.seq_len=8190"])
    assert message.startswith("data.seq_len=8190 is not divisible by parallel.tp=4: with parallel.sequence_parallel")
    cfg = load_config(MISTRAL, ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.zero_stage=3"])
    assert cfg.parallel.sequence_parallel


def test_context_parallel_combinations_that_cannot_work_are_refused():
    assert _error(["parallel.cp=2", "parallel.pp=2"]) == (
        "parallel.cp=2 with parallel.pp=2: DeepSpeed's pipeline engine passes whole sequences between stages; set "
        "parallel.cp=1 or parallel.pp=1")
    assert _error(["parallel.cp=3"]).startswith("data.seq_len=8192 is not divisible by parallel.cp=3: each ")
    assert _error(["parallel.cp=2", "parallel.tp=8", "parallel.sequence_parallel=true", "data.seq_len=8120"]) \
        .startswith("data.seq_len=8120 (its chunk of 4060 tokens at parallel.cp=2) is not divisible by parallel.tp=8")
    cfg = resolve_world(load_config(MISTRAL, ["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true"]), 8)
    assert (cfg.parallel.dp, cfg.model_parallel_size) == (2, 4)


def test_async_tensor_parallel_without_its_prerequisites_is_refused():
    assert _error(["parallel.tp=2", "parallel.async_tensor_parallel=true"]).startswith(
        "parallel.async_tensor_parallel=true needs parallel.sequence_parallel=true")
    assert _error(["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.async_tensor_parallel=true",
                   "train.compile=false"]).startswith("parallel.async_tensor_parallel=true needs train.compile=true")


def test_world_size_not_divisible_by_model_parallel_size():
    cfg = load_config(MISTRAL, ["parallel.tp=2", "parallel.pp=2"])
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by parallel.tp \* parallel.pp \* "
                                          r"parallel.cp = 2 \* 2 \* 1 = 4"):
        resolve_world(cfg, 6)


def test_world_size_derives_dp_and_checks_the_batch():
    cfg = load_config(MISTRAL, ["parallel.tp=2", "train.global_batch=24"])
    assert resolve_world(cfg, 8).parallel.dp == 4
    message = r"train.global_batch=24 is not divisible by parallel.micro_batch \* dp = 1 \* 5"
    with pytest.raises(ConfigError, match=message):
        resolve_world(cfg, 10)


def test_missing_data_and_tokenizer_paths(tmp_path):
    cfg = load_config(TINY, [f"data.tokenizer={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="data.tokenizer=.*does not exist: train one with `pretrain tokenizer train`"):
        check_paths(cfg)
    cfg = load_config(TINY, [f"data.tokenizer={tmp_path}", f"data.train=[{{path: {tmp_path / 'shards'}}}]"])
    with pytest.raises(ConfigError, match=r"data.train\[0\].path=.*has no manifest.json"):
        check_paths(cfg)


def test_missing_config_file_and_bad_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such.yaml")
    assert "is not KEY=VALUE" in _error(["optim.lr"])


def test_resolved_config_round_trips(tmp_path):
    cfg = resolve_world(load_config(TINY, ["optim.lr=1e-3"]), 2)
    save_resolved(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_cli_refuses_a_hidden_dim_tp_cannot_split_in_one_line_with_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", "plan", str(TINY), "model.hidden_dim=689", "parallel.tp=2"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pretrain plan: error: model.hidden_dim=689 is not divisible by parallel.tp=2: each tensor-parallel rank "
        "holds an equal slice of the MLP; set hidden_dim to a multiple of 2 or choose tp from [1]"
    ]


def test_cli_reports_bad_tp_in_one_line_with_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", "plan", str(MISTRAL), "parallel.tp=3"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pretrain plan: error: model.n_heads=32 is not divisible by parallel.tp=3: each tensor-parallel rank holds "
        "whole heads; choose tp from [1, 2, 4, 8]"
    ]
