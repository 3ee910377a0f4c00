"""Release a trained checkpoint: transformers' MistralForCausalLM layout, or Mistral's own reference layout.

`--format hf`: sharded safetensors with their index, config.json, generation_config.json, the tokenizer (the
sentencepiece model plus a tokenizer.json that encodes exactly as sentencepiece does) and a model card.
`--format mistral`: consolidated.safetensors under mistral-inference's names, params.json and tokenizer.model.

Either is written into a temporary directory next to the destination that takes its place only once complete
(durable.atomic_directory): an export that fails or is killed midway leaves what was there before (with --force,
a previous export) as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from durable import OutputError, atomic_directory, output_taken, sha256_file
from pretrain.checkpoint.weights import HF_INDEX, TOKENIZER_MODEL, Weights
from pretrain.config import ModelConfig
from pretrain.dtypes import DTYPES
from pretrain.model.state_dict_adapter import hf_config, to_hf

# ------------------------------------------------------------------------------------------ output


def check_output(out: Path, force: bool) -> None:
    """An export replaces its whole --out directory (durable.atomic_directory): only an empty one, or with --force."""
    if output_taken(out) and not force:
        raise OutputError(f"{out} exists and is not empty: choose another --out, or pass --force to replace it")


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, whose I/O errors (a full disk) come back as OSError like every other write's."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:  # the error number is only in its text: "... (os error 28)"
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------- tokenizer


def tokenizer_model_path(weights: Weights, override: Path | None = None) -> Path:
    """The sentencepiece tokenizer.model that goes with these weights (the training config names it)."""
    from data_pipeline.errors import DataError

    source = override or weights.tokenizer
    if source is None:
        raise DataError(f"{weights.origin} names no tokenizer (data.tokenizer is empty): pass --tokenizer DIR")
    path = source / TOKENIZER_MODEL if source.is_dir() or not source.suffix else source
    if not path.is_file():
        raise DataError(f"tokenizer {path} not found: pass --tokenizer DIR (a directory holding {TOKENIZER_MODEL})")
    return path


def _bpe_merges(sp) -> list[tuple[str, str]]:
    """The merge list that makes a `tokenizers` BPE reproduce sentencepiece's BPE: every split of a piece into two
    pieces, ranked by the merged piece's score (sentencepiece merges the best-scoring adjacent pair first)."""
    ids = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_unknown(i) or not sp.is_control(i)}
    merges = []
    for piece, piece_id in ids.items():
        if sp.is_unknown(piece_id) or sp.is_byte(piece_id):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                merges.append((-sp.get_score(piece_id), ids[left], ids[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def write_hf_tokenizer(model_path: Path, out: Path, model_max_length: int) -> None:
    """tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json for AutoTokenizer.

    transformers' LlamaTokenizer(Fast) class rebuilds its pipeline with a Metaspace pre-tokenizer that adds no
    dummy-prefix space to a text that already starts with one; sentencepiece (and so our training data) always
    adds it. The tokenizer.json below keeps sentencepiece's behaviour (Prepend + Replace normalizer, as Mistral's
    own tokenizer.json does) and tokenizer_config.json loads it as it is, through PreTrainedTokenizerFast.
    tokenizer_config.json carries the instruct format's chat template (data_pipeline.chat); so that the `<s>` and
    `</s>` it renders become the special tokens, the literal strings `<s>` and `</s>` in text do too, as with
    Mistral's own tokenizer (`split_special_tokens=True` encodes them as text, as sentencepiece does).
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    from data_pipeline.chat import chat_template

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    unk, bos, eos = (sp.id_to_piece(i) for i in (sp.unk_id(), sp.bos_id(), sp.eos_id()))
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=_bpe_merges(sp), unk_token=unk, fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                             special_tokens=[(bos, sp.bos_id())])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (unk, bos, eos)])
    tokenizer.save(str(out / "tokenizer.json"))
    shutil.copyfile(model_path, out / TOKENIZER_MODEL)
    special = {"bos_token": bos, "eos_token": eos, "unk_token": unk}
    _write_json(out / "special_tokens_map.json", special)
    _write_json(out / "tokenizer_config.json", {
        **special,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "split_special_tokens": False,
        "chat_template": chat_template(),
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    })


# ------------------------------------------------------------------------------------------- hf format


def _shards(hf_state: dict[str, torch.Tensor], max_shard_size: int | str) -> list[tuple[str, list[str]]]:
    """(file name, tensor names) per shard, in transformers' model-0000k-of-0000n naming."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(hf_state, max_shard_size=max_shard_size)
    groups = list(split.filename_to_tensors.values())
    return [(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors", names) for i, names in enumerate(groups)]


def _manifest_checksums(weights: Weights) -> list[tuple[str, str]]:
    """(path, sha256 of its manifest.json) of every training data source that is still on disk."""
    if weights.config is None:
        return []
    sums = []
    for source in weights.config.data.train:
        manifest = Path(source.path) / "manifest.json"
        sums.append((source.path, sha256_file(manifest) if manifest.is_file() else "not available"))
    return sums


def model_card(weights: Weights, dtype: str, tokenizer_path: Path, parameters: int) -> str:
    m = weights.model
    state = weights.trainer_state or {}
    loss = state.get("loss")
    rows = [("parameters", f"{parameters:,}"), ("layers", m.n_layers), ("hidden size (dim)", m.dim),
            ("SwiGLU hidden size", m.hidden_dim), ("query heads / kv heads", f"{m.n_heads} / {m.n_kv_heads}"),
            ("head dim", m.head_dim), ("vocabulary", m.vocab_size),
            ("sliding window", m.sliding_window or "none (full causal attention)"),
            ("trained context", weights.config.data.seq_len if weights.config else "unknown"),
            ("rotary theta", m.rope_theta), ("RMSNorm eps", m.norm_eps), ("weights dtype", dtype)]
    training = [("source checkpoint", weights.origin), ("optimizer steps", state.get("step", "unknown")),
                ("training tokens", f"{state['tokens']:,}" if "tokens" in state else "unknown"),
                ("final training loss", f"{loss:.4f}" if isinstance(loss, float) else "unknown"),
                ("code version", state.get("code_version", "unknown")),
                ("tokenizer sha256", sha256_file(tokenizer_path))]
    training += [(f"train data {path} (manifest.json sha256)", digest) for path, digest in _manifest_checksums(weights)]

    def table(pairs):
        return "\n".join(["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in pairs)])

    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- mistral
---

# Mistral-architecture language model

A decoder-only transformer in the Mistral 7B architecture (grouped-query attention, sliding-window attention,
SwiGLU, RMSNorm, rotary positions, untied embeddings), pretrained with mistral-pretrain.

## Architecture

{table(rows)}

## Training

{table(training)}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")
model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")
inputs = tokenizer("def fibonacci(n):", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0]))
```

{_USE_NOTE[bool(weights.config and weights.config.data.loss_mask)]}
"""


_USE_NOTE = {
    False: "This is a base model: it continues text and has not been tuned to follow instructions.",
    True: "This model was fine-tuned on conversations in Mistral's instruct format (`<s>[INST] question [/INST] "
          "answer</s>`); `tokenizer.apply_chat_template(messages, return_dict=False)` gives the token ids it was "
          "trained on.",
}


def export_hf(weights: Weights, out: Path, *, dtype: str = "float32", max_shard_size: int | str = "5GB",
              tokenizer: Path | None = None, force: bool = False) -> Path:
    tokenizer_path = tokenizer_model_path(weights, tokenizer)
    check_tokenizer_fits(tokenizer_path, weights.model)
    torch_dtype = DTYPES[dtype]
    parameters = sum(t.numel() for t in weights.full_state.values())
    # Copies: q/k/v and gate/up are views into our fused matrices, and safetensors refuses shared storage.
    hf_state = {name: tensor.to(torch_dtype, copy=True)
                for name, tensor in to_hf(weights.full_state, weights.model).items()}
    check_output(out, force)
    with atomic_directory(out) as tmp:
        weight_map = {}
        for file_name, names in _shards(hf_state, max_shard_size):
            _save_safetensors({name: hf_state[name] for name in names}, tmp / file_name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file_name))
            print(f"wrote {file_name} ({len(names)} tensors)", file=sys.stderr)
        total_size = sum(t.numel() * t.element_size() for t in hf_state.values())
        _write_json(tmp / HF_INDEX, {"metadata": {"total_size": total_size}, "weight_map": weight_map})
        _write_json(tmp / "config.json", hf_config_dict(weights.model, tokenizer_path, dtype))
        bos, eos = _special_ids(tokenizer_path)
        _write_json(tmp / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})
        write_hf_tokenizer(tokenizer_path, tmp, weights.model.max_seq_len)
        (tmp / "README.md").write_text(model_card(weights, dtype, tokenizer_path, parameters))
    return out


def hf_config_dict(cfg: ModelConfig, tokenizer_path: Path, dtype: str) -> dict:
    bos, eos = _special_ids(tokenizer_path)
    config = hf_config(cfg)
    config.architectures = ["MistralForCausalLM"]
    config.bos_token_id, config.eos_token_id = bos, eos
    # What differs from MistralConfig's defaults, plus every architecture key, as Mistral's own config.json has.
    data = config.to_diff_dict()
    full = config.to_dict()
    data.update({key: full[key] for key in _HF_ARCHITECTURE_KEYS if key in full})
    # transformers 5 reads "dtype", 4.x "torch_dtype"; 5 nests rope_theta in rope_parameters, 4.x does not.
    data.update(dtype=dtype, torch_dtype=dtype, rope_theta=cfg.rope_theta)
    return data


_HF_ARCHITECTURE_KEYS = ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
                         "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                         "max_position_embeddings", "rms_norm_eps", "sliding_window", "tie_word_embeddings",
                         "initializer_range", "bos_token_id", "eos_token_id")


def _special_ids(tokenizer_path: Path) -> tuple[int, int]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    return sp.bos_id(), sp.eos_id()


def check_tokenizer_fits(tokenizer_path: Path, cfg: ModelConfig) -> None:
    import sentencepiece as spm

    from data_pipeline.errors import DataError

    pieces = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).get_piece_size()
    if pieces > cfg.vocab_size:
        raise DataError(f"tokenizer {tokenizer_path} has {pieces} pieces, the model only {cfg.vocab_size} "
                        "embeddings: it is not this model's tokenizer; pass the right one with --tokenizer")


# ------------------------------------------------------------------------------------------- mistral format

# transformers name (inside model.layers.N.) -> mistral-inference name (inside layers.N.)
_MISTRAL_LAYER_NAMES = {
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}
_MISTRAL_GLOBAL_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                         "lm_head.weight": "output.weight"}


def rotary_interleave(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from the rotate-half convention (ours, transformers') to Mistral's interleaved complex one.

    Rotate-half pairs dimension i of a head with i + D/2; mistral-inference rotates adjacent pairs (2i, 2i + 1)
    as one complex number. transformers' conversion script moves row 2i + j of a Mistral head to j * D/2 + i;
    this is its inverse.
    """
    rows, cols = weight.shape
    head_dim = rows // heads
    return weight.view(heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_mistral(full_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    hf = to_hf(full_state, cfg)
    out = {mistral: hf[name] for name, mistral in _MISTRAL_GLOBAL_NAMES.items()}
    for i in range(cfg.n_layers):
        for name, mistral in _MISTRAL_LAYER_NAMES.items():
            tensor = hf[f"model.layers.{i}.{name}"]
            if name == "self_attn.q_proj.weight":
                tensor = rotary_interleave(tensor, cfg.n_heads)
            elif name == "self_attn.k_proj.weight":
                tensor = rotary_interleave(tensor, cfg.n_kv_heads)
            out[f"layers.{i}.{mistral}"] = tensor
    return out


def mistral_params(cfg: ModelConfig) -> dict:
    """params.json as mistral-inference reads it."""
    return {"dim": cfg.dim, "n_layers": cfg.n_layers, "head_dim": cfg.head_dim, "hidden_dim": cfg.hidden_dim,
            "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "norm_eps": cfg.norm_eps,
            "vocab_size": cfg.vocab_size, "rope_theta": cfg.rope_theta, "sliding_window": cfg.sliding_window}


def export_mistral(weights: Weights, out: Path, *, dtype: str = "float32", tokenizer: Path | None = None,
                   force: bool = False) -> Path:
    tokenizer_path = tokenizer_model_path(weights, tokenizer)
    check_tokenizer_fits(tokenizer_path, weights.model)
    state = {name: t.to(DTYPES[dtype], copy=True) for name, t in to_mistral(weights.full_state, weights.model).items()}
    check_output(out, force)
    with atomic_directory(out) as tmp:
        _save_safetensors(state, tmp / "consolidated.safetensors")
        _write_json(tmp / "params.json", mistral_params(weights.model))
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER_MODEL)
    return out
