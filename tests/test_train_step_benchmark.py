import importlib.util
import json
from pathlib import Path

import pytest

# benchmarks/ is a folder of scripts, not a package: load the script by path.
_spec = importlib.util.spec_from_file_location(
    "train_step_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"
)
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)


def test_kernel_time_is_split_by_kind_per_step(tmp_path):
    """Kernel names as an H100/H200 torch.profiler trace spells them; CPU operators are not kernels."""
    kernels = {
        "ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)": 300,
        "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)": 150,
        "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, bf16>>": 600,
        "fmha_cutlassB_bf16_aligned_64x64_k128_sm80(PyTorchMemEffAttention::AttentionBackwardKernel)": 900,
        "triton_tem_fused_0": 1200,
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN": 3000,
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off": 1500,
        "triton_poi_fused__to_copy_mul_rsqrt_0": 450,
    }
    events = [{"ph": "X", "cat": "kernel", "name": name, "dur": us} for name, us in kernels.items()]
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 10_000})
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    assert benchmark.device_ms_by_kind(trace, steps=3) == pytest.approx(
        {"communication (NCCL)": 0.15, "attention": 0.9, "matmul": 1.5, "other": 0.15})
