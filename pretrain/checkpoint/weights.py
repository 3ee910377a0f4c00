"""Where trained weights come from, as a full state in our canonical names (those of the tp=1, pp=1 `Mistral`).

Two sources: a training checkpoint (verified against its manifest first; any tp/pp layout, `ShardReader` merges
the tensor-parallel shards) or a transformers `MistralForCausalLM` directory (config.json and safetensors,
sharded or not). Anything else is refused with a one-line CheckpointError naming the problem and the fix.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open

from pretrain.checkpoint.store import MANIFEST, CheckpointError, Verified, complete_steps, newest_valid, verify
from pretrain.config import Config, ConfigError, ModelConfig, validate
from pretrain.model.state_dict_adapter import from_hf, to_hf

HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
TOKENIZER_MODEL = "tokenizer.model"
RUN_CONFIG = "config.yaml"


@dataclass
class Weights:
    model: ModelConfig
    full_state: dict[str, torch.Tensor]  # canonical name -> float tensor
    tokenizer: Path | None  # a directory or file holding the sentencepiece tokenizer.model, if known
    origin: Path
    config: Config | None = None  # the whole training config (checkpoints only)
    trainer_state: dict | None = None  # trainer.json (checkpoints only)


# ------------------------------------------------------------------------------------------- checkpoints


def resolve_checkpoint(path: Path) -> Verified:
    """A checkpoint directory (verified) or a run directory's newest checkpoint that verifies."""
    if (path / MANIFEST).is_file() or path.name.startswith("step_"):
        return verify(path)
    root = path / "checkpoints"
    # A run directory (config.yaml) holds no checkpoint until its first save, and may not have checkpoints/ yet.
    if root.is_dir() or (path / RUN_CONFIG).is_file():
        if not complete_steps(root):
            raise CheckpointError(f"{root} holds no checkpoint yet: train until a checkpoint is saved "
                                  "(checkpoint.every_steps, or the end of the run), or pass a checkpoint directory")
        found, skipped = newest_valid(root)
        if found is None:
            raise CheckpointError(f"no checkpoint under {root} verifies ({len(complete_steps(root))} complete, all "
                                  "damaged): re-save from a run that still has its weights")
        for reason in skipped:
            print(f"note: skipped a newer checkpoint: {reason}; using step {found.step}", file=sys.stderr)
        return found
    raise CheckpointError(f"{path} is neither a checkpoint directory (with {MANIFEST}) nor a run directory (with "
                    "checkpoints/): pass RUN_DIR or RUN_DIR/checkpoints/step_N")


def read_checkpoint(path: Path) -> Weights:
    # Imported here: the checkpoint state module pulls in DeepSpeed, which HF-only uses do not need.
    from pretrain.checkpoint.state import ShardReader, read_trainer_state

    verified = resolve_checkpoint(path)
    state = read_trainer_state(verified.path)
    if "config" not in state:
        raise CheckpointError(f"{verified.path}/trainer.json holds no config: the checkpoint is damaged")
    try:
        cfg = validate(state["config"])
    except ConfigError as e:
        raise CheckpointError(f"{verified.path}/trainer.json has a config this version refuses ({e})") from None
    reader = ShardReader(verified.path, cfg.model)
    full = {key.split("/", 1)[1]: reader.full(key) for key in sorted(reader.index) if key.startswith("param/")}
    if not full:
        raise CheckpointError(f"{verified.path} holds no parameters: the checkpoint is damaged")
    tokenizer = Path(cfg.data.tokenizer) if cfg.data.tokenizer else None
    return Weights(cfg.model, full, tokenizer, verified.path, cfg, state)


# ------------------------------------------------------------------------------------------- transformers


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / HF_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{hf_dir} has no {HF_CONFIG}: pass a transformers model directory "
                              "(what save_pretrained writes)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): re-download or re-save the model") from None
    architectures = config.get("architectures") or []
    if config.get("model_type") != "mistral" or (architectures and "MistralForCausalLM" not in architectures):
        found = ", ".join(architectures) or config.get("model_type") or "an unknown architecture"
        raise CheckpointError(f"{hf_dir} holds {found}, not MistralForCausalLM: only Mistral models can be imported")
    return config


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or {}  # transformers 5 nests it; 4.x has rope_theta and rope_scaling
    if config.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise CheckpointError("the model uses rotary scaling (rope_scaling/rope_type), which this trainer does not "
                        "implement: import a model with plain rotary embeddings")
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def model_fields_from_hf(config: dict) -> dict:
    """Our `model.*` config keys for a transformers MistralConfig dict (the inverse of state_dict_adapter.hf_config)."""
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act={config['hidden_act']!r}: our SwiGLU uses silu; this model cannot be "
                              "imported")
    if config.get("tie_word_embeddings", False):
        raise CheckpointError("tie_word_embeddings=true: Mistral's input and output embeddings are separate, and so "
                              "are ours; untie them in transformers before importing")
    try:
        heads = config["num_attention_heads"]
        return {
            "dim": config["hidden_size"],
            "n_layers": config["num_hidden_layers"],
            "n_heads": heads,
            "n_kv_heads": config.get("num_key_value_heads") or heads,
            "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
            "hidden_dim": config["intermediate_size"],
            "vocab_size": config["vocab_size"],
            "norm_eps": config.get("rms_norm_eps", 1e-6),
            "rope_theta": _rope_theta(config),
            "sliding_window": config.get("sliding_window"),
            "max_seq_len": config.get("max_position_embeddings", 32768),
            "init_std": config.get("initializer_range", 0.02),
        }
    except KeyError as e:
        raise CheckpointError(f"config.json lacks {e.args[0]}: it is not a complete MistralConfig") from None


def model_config_from_hf(config: dict) -> ModelConfig:
    try:
        return ModelConfig.model_validate(model_fields_from_hf(config))
    except ValidationError as e:
        error = e.errors()[0]
        raise CheckpointError(f"config.json describes a model this trainer cannot build "
                              f"({'.'.join(map(str, error['loc']))}: {error['msg']})") from None


def read_hf_state(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (sharded) safetensors checkpoint under its transformers name."""
    index = hf_dir / HF_INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / HF_SINGLE).is_file():
        files = [HF_SINGLE]
    else:
        hint = " (only PyTorch .bin weights: re-save with safe_serialization)" if any(hf_dir.glob("*.bin")) else ""
        raise CheckpointError(f"{hf_dir} has neither {HF_SINGLE} nor {HF_INDEX}{hint}: "
                              "pass a safetensors model directory")
    state = {}
    for name in files:
        path = hf_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path} named in {HF_INDEX} is missing: the download is incomplete")
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


def read_hf_dir(hf_dir: Path) -> Weights:
    cfg = model_config_from_hf(read_hf_config(hf_dir))
    hf_state = read_hf_state(hf_dir)
    # Old transformers saved the rotary tables as buffers; they are recomputed, never learned.
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith("rotary_emb.inv_freq")}
    try:
        full = from_hf(hf_state)
    except KeyError as e:
        raise CheckpointError(f"{hf_dir} lacks the weight {e.args[0]}: the checkpoint is incomplete or not a "
                              "Mistral") from None
    _check_shapes(full, cfg, hf_dir)
    extra = sorted(hf_state.keys() - to_hf(full, cfg).keys())[:3]
    if extra:
        raise CheckpointError(f"{hf_dir} has weights a Mistral does not ({', '.join(extra)}...): it is another "
                              "architecture")
    tokenizer = hf_dir if (hf_dir / TOKENIZER_MODEL).is_file() else None
    return Weights(cfg, full, tokenizer, hf_dir)


def _check_shapes(full: dict[str, torch.Tensor], cfg: ModelConfig, where: Path) -> None:
    q_rows = cfg.n_heads * cfg.head_dim
    expected = {"embedding.token_embedding.weight": (cfg.vocab_size, cfg.dim),
                "head.lm_head.weight": (cfg.vocab_size, cfg.dim),
                "layers.0.attention.qkv_proj.weight": (q_rows + 2 * cfg.n_kv_heads * cfg.head_dim, cfg.dim),
                "layers.0.mlp.gate_up_proj.weight": (2 * cfg.hidden_dim, cfg.dim)}
    for name, shape in expected.items():
        if tuple(full[name].shape) != shape:
            raise CheckpointError(f"{where}: {name} has shape {tuple(full[name].shape)}, config.json implies {shape}: "
                            "the weights and config.json do not belong together")
    layers = sum(1 for name in full if name.endswith(".attention_norm.weight"))
    if layers != cfg.n_layers:
        raise CheckpointError(f"{where} has weights for {layers} layers, config.json says {cfg.n_layers}")


def load_weights(path: Path) -> Weights:
    """A checkpoint, a run directory or a transformers directory (an `pretrain export --format hf` output)."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass a run directory, a checkpoint or an exported model "
                              "directory")
    if (path / HF_CONFIG).is_file():
        return read_hf_dir(path)
    return read_checkpoint(path)
