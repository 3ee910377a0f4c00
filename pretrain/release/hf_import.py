"""`pretrain import`: a transformers MistralForCausalLM directory becomes a run directory that `pretrain train`
continues from those weights.

The run directory gets config.yaml (the model from config.json, everything else from an optional base config and
overrides), the tokenizer, and a complete, verified checkpoint at step 0 written by the trainer's own checkpoint
writer: float32 weights in the requested tensor-parallel layout, no optimizer moments, no data position, so
training starts its optimizer, schedule and data order fresh. It is assembled in a temporary directory and renamed
into place, like an export.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from data_pipeline.errors import DataError
from durable import atomic_directory
from pretrain.checkpoint.state import (
    LAYOUT_ONLY_MODEL_KEYS,
    code_version,
    shard_file_name,
    write_rank_state,
)
from pretrain.checkpoint.store import CheckpointStore, mark_rank_done
from pretrain.checkpoint.weights import TOKENIZER_MODEL, Weights, model_fields_from_hf, read_hf_config, read_hf_dir
from pretrain.config import Config, ConfigError, DataConfig, apply_override, load_config, save_resolved, validate
from pretrain.model.sharding import shard_parameter
from pretrain.release.export import check_output, check_tokenizer_fits, tokenizer_model_path


def import_config(fields: dict, run_dir: Path, base_config: Path | None, overrides: list[str],
                  has_tokenizer: bool) -> Config:
    """config.yaml for the run: `fields` (our model.* keys from config.json) over the base config, then overrides;
    overrides may change only keys that do not change the weights."""
    data = load_config(base_config).model_dump(mode="json") if base_config else {}
    data.setdefault("model", {}).update(fields)
    # The base's sequence length, capped at the imported model's context (the built-in default is 2048).
    data_section = data.setdefault("data", {})
    data_section["seq_len"] = min(data_section.get("seq_len", DataConfig().seq_len), fields["max_seq_len"])
    if has_tokenizer:
        data_section["tokenizer"] = str(run_dir / "tokenizer")
    data.setdefault("train", {})["run_dir"] = str(run_dir)
    for item in overrides:
        apply_override(data, item)
    cfg = validate(data)
    for key, value in fields.items():
        if key not in LAYOUT_ONLY_MODEL_KEYS and getattr(cfg.model, key) != value:
            raise ConfigError(f"model.{key}={getattr(cfg.model, key)!r} contradicts the imported weights "
                              f"({value!r}): drop that override")
    return cfg


def write_weights_checkpoint(root: Path, weights: Weights, cfg: Config, trainer_state: dict) -> Path:
    """A step-0 checkpoint of `weights` in cfg.parallel.tp shards, through CheckpointStore's atomic finalize.

    Every parameter goes into pipeline stage 0's files: loading reads parameters by name, whatever file holds them.
    """
    store = CheckpointStore(root, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)
    tmp = store.prepare(0)
    tp = cfg.parallel.tp
    snapshot: dict[str, object] = {"trainer": trainer_state}
    for rank in range(tp):
        snapshot[shard_file_name(rank, 0)] = {
            f"param/{name}": shard_parameter(name, full, cfg.model, rank, tp).to(torch.float32).contiguous()
            for name, full in sorted(weights.full_state.items())
        }
    mark_rank_done(tmp, 0, write_rank_state(tmp, 0, snapshot))
    return store.finalize(0, world_size=1, meta={"tokens": 0, "loss": None, "imported_from": str(weights.origin)})


def import_hf(hf_dir: Path, run_dir: Path, *, base_config: Path | None = None, overrides: list[str] = (),
              force: bool = False) -> Config:
    weights = read_hf_dir(hf_dir)
    fields = model_fields_from_hf(read_hf_config(hf_dir))
    cfg = import_config(fields, run_dir, base_config, list(overrides), has_tokenizer=weights.tokenizer is not None)
    own_tokenizer = cfg.data.tokenizer == str(run_dir / "tokenizer")
    if not own_tokenizer and cfg.data.tokenizer is None:
        raise DataError(f"{hf_dir} has no {TOKENIZER_MODEL} and data.tokenizer is not set: copy the model's "
                        f"sentencepiece {TOKENIZER_MODEL} into {hf_dir} or pass data.tokenizer=DIR")
    tokenizer = tokenizer_model_path(weights, None if own_tokenizer else Path(cfg.data.tokenizer))
    check_tokenizer_fits(tokenizer, cfg.model)
    check_output(run_dir, force)
    with atomic_directory(run_dir) as tmp:
        if own_tokenizer:
            (tmp / "tokenizer").mkdir()
            shutil.copyfile(tokenizer, tmp / "tokenizer" / TOKENIZER_MODEL)
        trainer_state = {"step": 0, "tokens": 0, "loss": None, "adam_step": 0.0, "imported_from": str(hf_dir),
                         "config": cfg.model_dump(mode="json"), "code_version": code_version()}
        write_weights_checkpoint(tmp / "checkpoints", weights, cfg, trainer_state)
        save_resolved(cfg, tmp / "config.yaml")
    return cfg
