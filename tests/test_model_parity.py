"""Our Mistral against transformers' MistralForCausalLM on the same weights: logits, loss and gradients.

The window (16) is shorter than the sequence (48) so the sliding window matters, and 4 query heads share
2 kv heads. Norm weights are randomised so that swapping two norms in the adapter would show.
"""

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.model.mistral import IGNORE_INDEX, Mistral
from pretrain.model.sharding import gather_full_state, load_full_state
from pretrain.model.state_dict_adapter import from_hf, hf_config, to_hf

SEQ_LEN = 48
CFG = ModelConfig(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    hidden_dim=96,
    vocab_size=128,
    sliding_window=16,
    max_seq_len=64,
    rope_theta=10000.0,
    attention_backend="sdpa",
)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def shifted_labels(tokens: torch.Tensor) -> torch.Tensor:
    """Our labels are pre-shifted targets; transformers shifts `labels=tokens` internally."""
    return torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], IGNORE_INDEX)], dim=1)


def make_hf_model(attn_implementation: str):
    from transformers import MistralForCausalLM

    torch.manual_seed(0)
    config = hf_config(CFG)
    config._attn_implementation = attn_implementation
    model = MistralForCausalLM(config).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, CFG.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("hf_attention", ["eager", "sdpa"])
@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_sdpa_forward_backward_matches_transformers(
    single_process_group, tokens, hf_attention, checkpointing
):
    hf_model = make_hf_model(hf_attention)
    hf_out = hf_model(input_ids=tokens, labels=tokens)
    hf_out.loss.backward()
    hf_grads = {name: param.grad for name, param in hf_model.named_parameters()}

    model = Mistral(CFG, activation_checkpointing=checkpointing)
    load_full_state(model, from_hf(hf_model.state_dict()), CFG)
    logits = model(tokens)
    loss = model(tokens, shifted_labels(tokens))
    loss.backward()

    assert logits.shape == hf_out.logits.shape
    assert relative_error(logits, hf_out.logits) < 1e-5
    assert loss.dtype == torch.float32
    assert abs(loss.item() - hf_out.loss.item()) / hf_out.loss.item() < 1e-5
    our_grads = to_hf(gather_full_state(model, CFG, grads=True), CFG)
    assert our_grads.keys() == hf_grads.keys()
    for name, grad in hf_grads.items():
        assert relative_error(our_grads[name], grad) < 1e-5, name


def test_flex_forward_matches_transformers(single_process_group, tokens):
    hf_model = make_hf_model("eager")
    with torch.no_grad():
        hf_logits = hf_model(input_ids=tokens).logits
        model = Mistral(CFG.model_copy(update={"attention_backend": "flex"}))
        load_full_state(model, from_hf(hf_model.state_dict()), CFG)
        logits = model(tokens)
    assert relative_error(logits, hf_logits) < 1e-5


def test_adapter_round_trip_is_exact(single_process_group):
    hf_state = make_hf_model("eager").state_dict()
    assert set(to_hf(from_hf(hf_state), CFG)) == set(hf_state)
    for name, tensor in to_hf(from_hf(hf_state), CFG).items():
        assert torch.equal(tensor, hf_state[name]), name


def test_init_statistics(single_process_group):
    cfg = CFG.model_copy(update={"dim": 256, "hidden_dim": 512, "init_std": 0.02})
    full = gather_full_state(Mistral(cfg, seed=5), cfg)
    output_std = 0.02 / (2 * cfg.n_layers) ** 0.5
    for name, tensor in full.items():
        if name.endswith("norm.weight"):
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        else:
            expected = output_std if name.endswith(("out_proj.weight", "down_proj.weight")) else 0.02
            assert abs(tensor.std().item() - expected) / expected < 0.05, name
            assert abs(tensor.mean().item()) < 0.1 * expected, name
    again = gather_full_state(Mistral(cfg, seed=5), cfg)
    other = gather_full_state(Mistral(cfg, seed=6), cfg)
    assert all(torch.equal(full[name], again[name]) for name in full)
    assert not torch.equal(
        full["layers.0.attention.qkv_proj.weight"], other["layers.0.attention.qkv_proj.weight"]
    )


def test_bfloat16_parameters_train_close_to_float32(single_process_group, tokens):
    reference = Mistral(CFG, seed=1)
    model = Mistral(CFG, seed=1, params_dtype=torch.bfloat16)
    assert {param.dtype for param in model.parameters()} == {torch.bfloat16}
    loss = model(tokens, shifted_labels(tokens))
    loss.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - reference(tokens, shifted_labels(tokens)).item()) < 1e-2 * loss.item()
    assert all(param.grad is not None and param.grad.dtype == torch.bfloat16 for param in model.parameters())


def test_document_masking_makes_packed_documents_independent(single_process_group):
    """With masking, a packed document's logits equal those of the document run alone.

    Rotary attention depends only on relative positions, so global positions do not change that.
    """
    eos_id = 0
    cfg = CFG.model_copy(update={"document_masking": True})
    model = Mistral(cfg, eos_id=eos_id, seed=2)
    unmasked = Mistral(CFG, seed=2)
    generator = torch.Generator().manual_seed(4)
    first = torch.randint(1, cfg.vocab_size, (1, 20), generator=generator)
    second = torch.randint(1, cfg.vocab_size, (1, 28), generator=generator)
    first[0, -1] = eos_id
    packed = torch.cat([first, second], dim=1)
    with torch.no_grad():
        packed_logits = model(packed)
        alone = model(second)
        assert relative_error(packed_logits[:, 20:], alone) < 1e-5
        assert relative_error(packed_logits[:, :20], model(first)) < 1e-5
        assert relative_error(unmasked(packed)[:, 20:], alone) > 1e-2


def test_export_to_transformers_loads_strictly_and_matches(single_process_group, tokens):
    from transformers import MistralForCausalLM

    model = Mistral(CFG, seed=3)
    hf_model = MistralForCausalLM(hf_config(CFG)).float()
    hf_model.load_state_dict(to_hf(gather_full_state(model, CFG), CFG), strict=True)
    with torch.no_grad():
        assert relative_error(model(tokens), hf_model(input_ids=tokens).logits) < 1e-5


@pytest.mark.parametrize(("checkpointing", "calls_per_layer"), [("none", 1), ("selective", 2), ("full", 2)])
def test_checkpointing_recomputes_attention_in_backward(
    single_process_group, tokens, monkeypatch, checkpointing, calls_per_layer
):
    from pretrain.model import mistral

    calls = []

    def counting_attention(*args):
        calls.append(torch.is_grad_enabled())
        return mistral_attention(*args)

    mistral_attention = mistral.attention
    monkeypatch.setattr(mistral, "attention", counting_attention)
    model = Mistral(CFG, activation_checkpointing=checkpointing)
    model(tokens, shifted_labels(tokens)).backward()
    assert len(calls) == calls_per_layer * CFG.n_layers
