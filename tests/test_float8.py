"""FP8 training (`train.fp8`, pretrain/model/float8.py): the tensor-parallel linear layers multiply in float8 through
torchao, with tensor parallelism, compiled or not; it is refused in one line where it cannot run.

torch's CPU build multiplies float8 too (torch._scaled_mm), so the layers' numerics and their tensor-parallel
communication are checked here in real gloo processes; `pretrain train` itself refuses FP8 on CPU, where it would
only be slower. Tolerances, normwise against the bf16 model: activations and weights in float8 e4m3 keep 4
significant bits, so the logits differ by about 2 %; output gradients in e5m2 keep 3, so weight and norm gradients
differ by up to 10 % (tp=1 and tp=2 alike). Without the input gradient's tensor-parallel all-reduce the norms'
gradients were off by 70-79 %; a layer left in bf16 would not differ at all.
"""

from __future__ import annotations

import functools

import pytest
import torch

from pretrain import parallel
from pretrain.config import ConfigError, linear_layer_names, load_config
from pretrain.model.float8 import (
    E4M3,
    E5M2,
    TensorwiseFloat8Matmul,
    cast_to_float8_and_transpose,
    torchao_matmul,
    use_float8,
)
from pretrain.model.linear import linear_with_matmul
from pretrain.model.mistral import Mistral
from pretrain.model.sharding import load_full_state
from tests.devices import CPU_AND_CUDA
from tests.distributed import run_distributed
from tests.runs import ROOT, error_line, run_train
from tests.test_tensor_parallel import CFG, EOS_ID, one_batch, reference_full_state

pytest.importorskip("torchao")

FLOAT8_LOGITS, FLOAT8_GRADS = 0.05, 0.2  # normwise differences of float8 from bf16 (module docstring)


def float8_worker(tp: int, recipe: str, compile: bool = False, sequence_parallel: bool = False) -> dict | None:
    """The tensor-parallel test model in bf16 with its linear layers but the LM head in float8 (`recipe`; "off":
    bf16 throughout): full logits, loss and full gradients of one batch, on tensor-parallel rank 0 (on the host)."""
    parallel.init_distributed(tp=tp, pp=1)
    with torch.no_grad():
        weights = reference_full_state(CFG)
    model = Mistral(CFG, eos_id=EOS_ID, params_dtype=torch.bfloat16, sequence_parallel=sequence_parallel)
    load_full_state(model, weights, CFG)
    converted = []
    if recipe != "off":
        float8 = use_float8(model.named_modules(), recipe, ["head.lm_head"])
        float8.refresh_weights()
        converted = float8.names
    if compile:
        for layer in model.layers:
            layer.compile_computation()
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, CFG.vocab_size, (2, 40), generator=generator)
    labels = torch.randint(0, CFG.vocab_size, (2, 40), generator=generator)
    tokens[0, 12] = EOS_ID
    device = model.head.norm.weight.device
    result = {"converted": converted, **one_batch(model, tokens.to(device), labels.to(device))}
    return result if parallel.tp_rank() == 0 else None


def normwise(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(ours - reference) / torch.linalg.vector_norm(reference)).item()


@pytest.fixture(scope="module")
def bf16():
    return run_distributed(float8_worker, 1, 1, "off")[0]


@pytest.mark.parametrize(("tp", "recipe", "compile"),
                         [(1, "tensorwise", False), (1, "rowwise", False), (2, "tensorwise", False),
                          (2, "rowwise", False), (2, "tensorwise", True)])
def test_float8_layers_compute_the_bf16_model_within_float8_rounding(bf16, tp, recipe, compile):
    ours = run_distributed(float8_worker, tp, tp, recipe, compile)[0]
    expected = [name for name in linear_layer_names(CFG) if name != "head.lm_head"]
    assert ours["converted"] == expected
    logits = normwise(ours["logits"], bf16["logits"])
    assert 1e-3 < logits < FLOAT8_LOGITS, "float8 matmuls differ from bf16 ones, by float8's rounding"
    assert abs(ours["loss"] - bf16["loss"]) / bf16["loss"] < 1e-2
    for name, grad in bf16["grads"].items():
        assert normwise(ours["grads"][name], grad) < FLOAT8_GRADS, name


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (sequence parallelism runs on GPUs only)")
@pytest.mark.parametrize("compile", [False, True])
def test_float8_with_sequence_parallelism_computes_the_bf16_model(compile):
    """The sequence is gathered before each column-parallel float8 matmul and its gradient reduce-scattered after;
    against the bf16 model on one GPU (a float8 reference on the GPU differs from the CPU's float8 one)."""
    bf16 = run_distributed(float8_worker, 1, 1, "off")[0]
    ours = run_distributed(float8_worker, 2, 2, "tensorwise", compile, True)[0]
    assert 1e-3 < normwise(ours["logits"], bf16["logits"]) < FLOAT8_LOGITS
    for name, grad in bf16["grads"].items():
        assert normwise(ours["grads"][name], grad) < FLOAT8_GRADS, name


def tensorwise_matmul_and_grads(matmul, device: str) -> tuple[torch.Tensor, ...]:
    """matmul(x, w) of a sequence-first input (S, B, K) and a weight (N, K), and its gradients for one output
    gradient; sizes that are multiples of 16 (cuBLAS's float8 matmul needs them, the 208 tokens too, the weight
    gradient's inner size) but not of the cast kernel's tiles."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(104, 2, 80, generator=generator).to(device, torch.bfloat16).requires_grad_()
    w = (torch.randn(144, 80, generator=generator) * 0.05).to(device, torch.bfloat16).requires_grad_()
    grad_output = torch.randn(104, 2, 144, generator=generator).to(device, torch.bfloat16)
    output = matmul(x, w)
    output.backward(grad_output)
    return output.detach(), x.grad, w.grad


def torchao_tensorwise():
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_training_tensor import LinearMMConfig

    return functools.partial(torchao_matmul, mm_config=LinearMMConfig(),
                             config=Float8LinearConfig.from_recipe_name("tensorwise"))




@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("compile", [False, True])
def test_tensorwise_matmul_is_torchaos(device, compile):
    """The tensorwise recipe's own matmul (casts in both layouts at once, float8 tensors kept for the backward pass)
    computes what torchao's does: on the CPU bit for bit; on a GPU to bf16's rounding, as cuBLAS may sum the weight
    gradient in another order (ours is dy.T @ x, torchao's (x.T @ dy).T)."""
    ours = tensorwise_matmul_and_grads(
        torch.compile(TensorwiseFloat8Matmul.apply) if compile else TensorwiseFloat8Matmul.apply, device)
    theirs = tensorwise_matmul_and_grads(torchao_tensorwise(), device)
    for name, a, b in zip(["output", "input gradient", "weight gradient"], ours, theirs, strict=True):
        assert b.abs().amax() > 0.1, name
        if device == "cpu":
            assert torch.equal(a, b), f"{name}: {(a.float() - b.float()).abs().amax()}"
        else:
            torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-3 * b.abs().amax().item(), msg=name)


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("compile", [False, True])
def test_weights_kept_in_float8_multiply_as_weights_cast_at_each_use(single_process_group, device, compile):
    """Each weight cast once per refresh (the trainer's, before each step) gives the model what casting it at each
    matmul gives, bit for bit, compiled (one graph for both layers) or not; changed weights (an optimizer step)
    give the stale casts until the next refresh. Compiled on a GPU, the two models' graphs differ (casts inside
    or outside them) and inductor fuses their bf16 arithmetic differently; float8 casts turn a last-bit
    difference of bf16 into one of float8 (0.013 at most in the logits on one H200), so there they agree to
    float8's rounding."""
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        weights = {name: weight.to(device) for name, weight in reference_full_state(CFG).items()}
    models, float8 = {}, {}
    for keep in (True, False):
        models[keep] = Mistral(CFG, eos_id=EOS_ID, params_dtype=torch.bfloat16).to(device)
        load_full_state(models[keep], weights, CFG)
        float8[keep] = use_float8(models[keep].named_modules(), "tensorwise", ["head.lm_head"], keep_weights=keep)
        if compile:
            for layer in models[keep].layers:
                layer.compile_computation()
    assert len(float8[True].kept_weights) == len(float8[True].names) and not float8[False].kept_weights
    generator = torch.Generator().manual_seed(5)
    tokens, labels = (torch.randint(0, CFG.vocab_size, (2, 40), generator=generator).to(device) for _ in range(2))

    def logits_and_grads(keep: bool) -> dict[str, torch.Tensor]:
        models[keep].zero_grad(set_to_none=True)
        result = one_batch(models[keep], tokens, labels)
        return {"logits": result["logits"], **result["grads"]}

    def assert_equal(kept: dict, cast_each_use: dict) -> None:
        for name, tensor in cast_each_use.items():
            if device == "cpu" or not compile:
                assert torch.equal(kept[name], tensor), f"{name}: {(kept[name] - tensor).abs().amax()}"
            else:
                assert normwise(kept[name], tensor) < (FLOAT8_LOGITS if name == "logits" else FLOAT8_GRADS), name

    if not compile:  # compiled, dynamo would give up on the layer whose trace raised
        with pytest.raises(RuntimeError, match="used before its first refresh"):
            models[True](tokens)
    float8[True].refresh_weights()
    assert_equal(logits_and_grads(True), logits_and_grads(False))
    with torch.no_grad():  # new weights, written as DeepSpeed's optimizer step writes them: into their data
        generator = torch.Generator().manual_seed(7)
        for kept, cast_each_use in zip(models[True].parameters(), models[False].parameters(), strict=True):
            if any(kept is weight for weight in float8[True].kept_weights):
                new = torch.randn(kept.shape, generator=generator) * kept.float().std().item()
                kept.data.copy_(new), cast_each_use.data.copy_(new)
    updated = logits_and_grads(False)
    assert normwise(logits_and_grads(True)["logits"], updated["logits"]) > 0.3  # stale until refreshed
    float8[True].refresh_weights()
    assert_equal(logits_and_grads(True), updated)
    if compile:  # one graph for the layers of each model
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("shape", [(8192, 4096), (1000, 72), (3, 200)])
def test_the_cuda_cast_kernel_is_torchs_cast(dtype, shape):
    """The tiled Triton kernel (one read, two coalesced writes) rounds and saturates as torch's own cast does."""
    limit = torch.finfo(dtype).max
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    scale = torch.tensor(limit / 2, device="cuda")  # values from float8's smallest (subnormal) to beyond its largest
    cast, cast_t = cast_to_float8_and_transpose(x, scale, dtype)
    expected = (x.float() * scale).clamp(-limit, limit).to(dtype)
    assert (x.float() * scale).abs().amax() > limit, "some values saturate"
    assert torch.equal(cast.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(cast_t.view(torch.uint8), expected.t().contiguous().view(torch.uint8))


def test_the_models_linear_layers_are_the_ones_the_config_names(single_process_group):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    model = Mistral(CFG, eos_id=EOS_ID)
    linear = [name for name, module in model.named_modules()
              if isinstance(module, ColumnParallelLinear | RowParallelLinear)]
    assert linear == linear_layer_names(CFG)


def test_layers_kept_in_bf16_by_pattern(single_process_group):
    model = Mistral(CFG, eos_id=EOS_ID)
    converted = use_float8(model.named_modules(), "rowwise", ["head.lm_head", "layers.0.*", "*.down_proj"])
    assert converted.names == ["layers.1.attention.qkv_proj", "layers.1.attention.out_proj",
                               "layers.1.mlp.gate_up_proj"]
    swapped = model.layers[1].mlp.gate_up_proj._forward_impl
    assert swapped.func is linear_with_matmul and swapped.keywords["matmul"].func is torchao_matmul
    assert "_forward_impl" not in vars(model.layers[0].mlp.gate_up_proj)  # megatron's own method


def test_converters_take_each_linear_layer_once_in_their_order(single_process_group):
    """The trainer's order: float8 takes every linear layer but those kept in bf16, the float32 weight gradients
    those (by the converters' record, not by a look at the layers' matmuls). The other way round, the float32 weight
    gradients would take them all and leave float8 none."""
    from pretrain.model.linear import matmul_into_float32_gradient
    from pretrain.training.converters import Float8Training, Float32WeightGradients, ModelConverters

    linear = linear_layer_names(CFG)
    for float8_first in (True, False):
        model = Mistral(CFG, eos_id=EOS_ID, params_dtype=torch.bfloat16)
        float8, float32 = Float8Training("tensorwise", ["head.lm_head"], keep_weights=True), Float32WeightGradients()
        converters = ModelConverters([float8, float32] if float8_first else [float32, float8])
        converters.convert(model.named_modules())
        in_float8 = linear[:-1] if float8_first else []
        assert converters.taken == {name: "float8" if name in in_float8 else "float32 weight gradients"
                                    for name in linear}
        assert converters.float8.names == float8.layers.names == in_float8
        assert model.head.lm_head._forward_impl.keywords["matmul"] is matmul_into_float32_gradient
        assert float32.weights[-1] is model.head.lm_head.weight


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.fp8=tensorwise", "train.dtype=float32"],
     "train.fp8=tensorwise with train.dtype=float32: float8 training casts bfloat16 activations; set "
     "train.dtype=bfloat16 (or auto, on GPUs) or train.fp8=off"),
    (["train.fp8=rowwise", "train.fp8_bf16_layers=[lm_head]"],
     "train.fp8_bf16_layers: 'lm_head' matches no linear layer; they are named layers.N.{attention.qkv_proj,"
     "attention.out_proj,mlp.gate_up_proj,mlp.down_proj} (N from 0 to 3) and head.lm_head: fix the pattern"),
    (["train.fp8=tensorwise", "data.seq_len=250"],
     "train.fp8=tensorwise: parallel.micro_batch x data.seq_len / parallel.cp (the tokens of a matmul) is 1000, and "
     "float8 matmuls take only multiples of 16: change it, or set train.fp8=off"),
    (["train.fp8=rowwise", "model.hidden_dim=680", "parallel.tp=2"],
     "train.fp8=rowwise: model.hidden_dim / parallel.tp is 340, and float8 matmuls take only multiples of 16: "
     "change it, or set train.fp8=off"),
])
def test_float8_config_mistakes_are_refused_with_the_fix(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "tiny.yaml", overrides)
    assert str(e.value) == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_pretrain_train_with_fp8_on_cpu_is_refused_in_one_line(tmp_path, tiny_data):
    run_dir = tmp_path / "run"
    result = run_train(run_dir, tiny_data, ["train.fp8=tensorwise", "train.dtype=auto", "train.steps=2"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_line(result) == (
        "[pretrain] rank 0: error: train.fp8=tensorwise needs an NVIDIA GPU with float8 tensor cores (compute "
        "capability 8.9 or newer: Ada, Hopper, Blackwell) and this machine has none: set train.fp8=off")
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
    assert "Traceback" not in result.stderr
