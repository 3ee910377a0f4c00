"""Export, import, generation and evaluation against transformers, Mistral's reference rotary and the trainer itself.

Tolerances: 1e-5 relative on logits and losses between implementations that compute the same float32 function
with different kernels and summation orders (a few ulps per operation over four layers); a wrong weight, rotary
convention or window edge moves them by 1e-2 or more. Tensor round trips are compared bit for bit.
"""

import io
import json
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from launch.cli import main
from pretrain.config import ModelConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 16
TRAIN_COMMON = ["train.global_batch=8", "checkpoint.every_steps=0", "data.num_workers=0", "logging.tensorboard=false",
                "logging.every_steps=1", f"model.sliding_window={WINDOW}"]
PROMPT = ("def read_manifest(source):\n    url = shard_url(source, MANIFEST)\n    try:\n"
          "        raw = _read_url(url)\n    except DataError:\n        raise\n")


def cli(*args) -> tuple[int, str, str]:
    """`pretrain ARGS` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def train(run_dir: Path, overrides: list[str], nproc: int = 1, config: Path = ROOT / "configs" / "tiny.yaml") -> None:
    command = [sys.executable, "-m", "launch.cli", "train", str(config), *overrides, "--nproc", str(nproc),
               "--run-dir", str(run_dir)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def metrics(run_dir: Path, kind: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == kind}


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def hf_loss(model, tokens: torch.Tensor) -> float:
    """Mean next-token loss of a transformers model on packed rows of seq_len + 1 tokens, as the trainer counts."""
    logits = model(tokens[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).item()


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_data) -> Path:
    return Path(next(o for o in tiny_data if o.startswith("data.tokenizer=")).split("=", 1)[1])


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory) -> Path:
    """configs/tiny.yaml, one process, three steps, evaluated at the end."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    train(run_dir, [*tiny_data, *TRAIN_COMMON, "train.steps=3", "parallel.micro_batch=4", "train.eval_every=3",
                    "train.eval_steps=2"])
    return run_dir


@pytest.fixture(scope="module")
def hf_export(trained_run) -> Path:
    out = trained_run.parent / "hf"
    code, _, err = cli("export", trained_run, "--format", "hf", "--out", out)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def random_hf(tokenizer_dir, tmp_path_factory) -> Path:
    """A random transformers MistralForCausalLM (GQA, window 16, rotary theta 5000, random norm gains), saved in
    several safetensors shards, with our tokenizer beside it."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                           max_position_embeddings=256, rope_theta=5000.0, rms_norm_eps=1e-5, initializer_range=0.1,
                           tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = MistralForCausalLM(config).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    out = tmp_path_factory.mktemp("random_hf") / "model"
    model.save_pretrained(out, max_shard_size="300KB")
    shutil.copyfile(tokenizer_dir / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def imported_random(random_hf, tiny_data) -> Path:
    run_dir = random_hf.parent / "imported"
    code, _, err = cli("import", random_hf, *tiny_data, "parallel.tp=2", "--out", run_dir)
    assert code == 0, err
    return run_dir


# ------------------------------------------------------------------------------------------- round trip


def test_export_in_a_fresh_process_prints_no_library_noise(trained_run, tmp_path):
    """megatron-core's and DeepSpeed's start-up notices stay off the terminal of `pretrain export`."""
    result = subprocess.run([sys.executable, "-m", "launch.cli", "export", str(trained_run), "--out",
                             str(tmp_path / "hf")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warn" not in (result.stdout + result.stderr).lower(), result.stdout + result.stderr


def test_import_then_export_is_bit_identical(random_hf, imported_random):
    assert len(list(random_hf.glob("model-*.safetensors"))) > 1  # the import read a sharded directory
    assert sorted(p.name for p in (imported_random / "checkpoints" / "step_00000000" / "model").iterdir()) == [
        "tp00-pp00-dp0000.safetensors", "tp01-pp00-dp0000.safetensors"]
    out = imported_random.parent / "reexported"
    code, _, err = cli("export", imported_random, "--out", out, "--max-shard-size", "300KB")
    assert code == 0, err
    original, exported = tensors(random_hf), tensors(out)
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    config, source = (json.loads((d / "config.json").read_text()) for d in (out, random_hf))
    for key in ("sliding_window", "num_key_value_heads", "head_dim", "rms_norm_eps", "intermediate_size"):
        assert config[key] == source[key], key
    assert config["rope_theta"] == 5000.0 and config["architectures"] == ["MistralForCausalLM"]


# ------------------------------------------------------------------------------------------- hf export


def test_hf_export_loads_in_transformers_with_our_logits(trained_run, hf_export, tiny_data, single_process_group):
    from transformers import AutoModelForCausalLM

    from data_pipeline.loader import TokenLoader
    from pretrain.checkpoint.weights import load_weights
    from pretrain.inference.generate import build_model

    model, info = AutoModelForCausalLM.from_pretrained(hf_export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32 and model.config.sliding_window == WINDOW
    eval_dir = next(o for o in tiny_data if o.startswith("data.eval=")).split("=", 1)[1]
    tokens = next(iter(TokenLoader([(eval_dir, 1.0)], micro_batch=2)))["tokens"][:, :-1]
    ours = build_model(load_weights(trained_run), torch.float32)
    with torch.no_grad():
        assert relative_error(ours(tokens), model(tokens).logits) < 1e-5

    config = json.loads((hf_export / "config.json").read_text())
    for key in ("sliding_window", "rope_theta", "num_key_value_heads", "torch_dtype", "architectures"):
        assert key in config, key
    assert json.loads((hf_export / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    state = json.loads((trained_run / "checkpoints" / "step_00000003" / "trainer.json").read_text())
    card = (hf_export / "README.md").read_text()
    train_manifest = Path(next(o for o in tiny_data if o.startswith("data.train=")).split("path: ")[1].rstrip("}]"))
    from durable import sha256_file

    for fact in ("| optimizer steps | 3 |", f"| training tokens | {state['tokens']:,} |",
                 f"| final training loss | {state['loss']:.4f} |", sha256_file(train_manifest / "manifest.json"),
                 "| query heads / kv heads | 8 / 2 |", f"| sliding window | {WINDOW} |"):
        assert fact in card, fact


def test_exported_tokenizer_encodes_like_ours(hf_export, tokenizer_dir):
    from transformers import AutoTokenizer

    from data_pipeline.tokenizer import Tokenizer

    theirs, ours = AutoTokenizer.from_pretrained(hf_export), Tokenizer.load(tokenizer_dir)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.unk_token_id) == (ours.bos_id, ours.eos_id, ours.unk_id)
    texts = ["Hello world", " leading space", "  two leading spaces\n\nand\ttabs", "trailing  ", "", "a\n b",
             "digits 1234567", "ünïcödé 漢字 🙂", "literal <s> and </s> are text", PROMPT]
    for path in sorted((tokenizer_dir.parent / "corpus").glob("*/*.jsonl")):
        for line in path.read_text().splitlines():
            document = json.loads(line)["text"]
            texts += [document[i:i + 2000] for i in range(0, len(document), 2000)]
    assert len(texts) > 300
    for text in texts:
        ids = ours.encode(text, bos=True)
        assert theirs(text, split_special_tokens=True)["input_ids"] == ids, text[:80]
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids), text[:80]
        if "<s>" not in text and "</s>" not in text:
            assert theirs(text)["input_ids"] == ids, text[:80]
    # By default a literal <s> or </s> is the special token, as the chat template needs (README: export).
    assert theirs("a </s>", add_special_tokens=False)["input_ids"][-1] == ours.eos_id


# ------------------------------------------------------------------------------------------- generation


def test_rolling_cache_and_chunked_prefill_match_the_full_forward(single_process_group):
    from pretrain.model.kv_cache import RollingKVCache
    from pretrain.model.mistral import Mistral

    for window in (WINDOW, None):
        cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, vocab_size=128,
                          sliding_window=window, max_seq_len=128, attention_backend="sdpa")
        model = Mistral(cfg, seed=3).eval()
        tokens = torch.randint(0, cfg.vocab_size, (2, 75), generator=torch.Generator().manual_seed(0))
        cache = RollingKVCache(cfg, local_kv_heads=2, batch=2, max_positions=75, dtype=torch.float32,
                               device=torch.device("cpu"))
        assert cache.size == (WINDOW if window else 75)
        chunks, start = [], 0
        with torch.no_grad():
            full = model(tokens)
            for length in (16, 16, 7, 1, 1, 16, 1, 16, 1):  # prefill chunks of W, then decoding, then more chunks
                chunks.append(model(tokens[:, start:start + length], cache=cache))
                start += length
        assert start == 75 and relative_error(torch.cat(chunks, dim=1), full) < 1e-5, window


def test_generate_greedy_matches_transformers(random_hf, imported_random):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(random_hf)
    for source in (imported_random, random_hf):  # a run directory and a transformers directory
        code, out, err = cli("generate", source, "--prompt", PROMPT, "--greedy", "--max-new-tokens", 30, "--json")
        assert code == 0, err
        result = json.loads(out)
        prompt = torch.tensor([result["prompt_ids"]])
        assert prompt.shape[1] > 2 * WINDOW  # chunked prefill and a wrapped rolling buffer
        expected = reference.generate(prompt, max_new_tokens=30, do_sample=False)[0, prompt.shape[1]:].tolist()
        assert result["new_ids"] == expected, source
        assert len(set(expected)) > 5  # a sequence that tests something, not one repeated token


def test_sampling_is_seeded(imported_random):
    runs = [cli("generate", imported_random, "--prompt", "x = ", "--temperature", 1.0, "--top-p", 0.9, "--seed", seed,
                "--max-new-tokens", 12, "--json") for seed in (1, 1, 2)]
    assert all(code == 0 for code, _, _ in runs)
    first, again, other = (json.loads(out)["new_ids"] for _, out, _ in runs)
    assert first == again and first != other


def test_a_run_trained_with_a_gpu_only_attention_kernel_runs_here_computing_the_same(random_hf, tiny_data, tmp_path):
    """A run whose attention_backend is cudnn (a CUDA kernel for half precision) evaluates, generates, chats and
    moderates in float32 on this machine through the kernel that runs here, with a one-line note, and gives what
    the same run with sdpa gives."""
    runs = {}
    for backend in ("cudnn", "sdpa"):
        runs[backend] = tmp_path / backend
        code, _, err = cli("import", random_hf, *tiny_data, f"model.attention_backend={backend}", "--out",
                           runs[backend])
        assert code == 0, err
    eval_dir = next(o for o in tiny_data if o.startswith("data.eval=")).split("=", 1)[1]
    commands = {
        "eval": ["--data", eval_dir, "--batches", 2, "--batch-size", 2],
        "generate": ["--prompt", PROMPT, "--greedy", "--max-new-tokens", 8],
        "chat": ["--message", "What does os.path.join do?", "--greedy", "--max-new-tokens", 8],
        "moderate": ["--text", "Return the number of items in a container."],
    }
    # As a user types them, each in its own process (started together: most of their time is imports).
    processes = {command: subprocess.Popen([sys.executable, "-m", "launch.cli", command, str(runs["cudnn"]),
                                            *map(str, options), "--dtype", "float32", "--json"],
                                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for command, options in commands.items()}
    for command, options in commands.items():
        out, err = processes[command].communicate(timeout=300)
        assert processes[command].returncode == 0 and "Traceback" not in err, (command, err[-3000:])
        assert err.count("note: the run trained with attention_backend=cudnn, which needs a CUDA GPU") == 1, err
        code, reference, reference_err = cli(command, runs["sdpa"], *options, "--dtype", "float32", "--json")
        assert code == 0 and "note:" not in reference_err, (command, reference_err)
        ours, theirs = json.loads(out), json.loads(reference)
        if command == "eval":
            assert ours["tokens"] == theirs["tokens"] and ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
        elif command == "moderate":
            assert ours["label"] == theirs["label"]
            assert ours["probability"] == pytest.approx(theirs["probability"], rel=1e-6)
        else:
            assert (ours["prompt_ids"], ours["new_ids"]) == (theirs["prompt_ids"], theirs["new_ids"]), command


# ------------------------------------------------------------------------------------------- mistral format


def permute_for_rope(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' convert_mistral_weights_to_hf.py: Mistral's q/k rows to transformers' (rotate-half) order."""
    rows, cols = tensor.shape
    return tensor.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def mistral_reference_logits(state: dict[str, torch.Tensor], params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """mistral-inference's reference forward (one_file_ref.py): q/k rotated as complex numbers of adjacent pairs.
    The window mask follows transformers' count (W keys); that edge is tested against transformers elsewhere."""
    head_dim, heads, kv_heads = params["head_dim"], params["n_heads"], params["n_kv_heads"]
    seq = tokens.shape[1]
    freqs = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    freqs_cis = torch.polar(torch.ones(seq, head_dim // 2), torch.outer(torch.arange(seq).float(), freqs))

    def rotate(x):
        x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(x_ * freqs_cis[None, :, None, :]).flatten(3)

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + params["norm_eps"]) * weight

    position = torch.arange(seq)
    visible = position[None, :] <= position[:, None]
    visible &= position[None, :] > position[:, None] - params["sliding_window"]
    h = state["tok_embeddings.weight"][tokens]
    for i in range(params["n_layers"]):
        w = {k.split(f"layers.{i}.", 1)[1]: v for k, v in state.items() if k.startswith(f"layers.{i}.")}
        x = norm(h, w["attention_norm.weight"])
        q = rotate((x @ w["attention.wq.weight"].T).view(1, seq, heads, head_dim))
        k = rotate((x @ w["attention.wk.weight"].T).view(1, seq, kv_heads, head_dim))
        v = (x @ w["attention.wv.weight"].T).view(1, seq, kv_heads, head_dim)
        k, v = (torch.repeat_interleave(t, heads // kv_heads, dim=2) for t in (k, v))
        scores = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3)) / head_dim**0.5
        attn = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v.transpose(1, 2)
        h = h + attn.transpose(1, 2).reshape(1, seq, heads * head_dim) @ w["attention.wo.weight"].T
        x = norm(h, w["ffn_norm.weight"])
        h = h + (F.silu(x @ w["feed_forward.w1.weight"].T) * (x @ w["feed_forward.w3.weight"].T)) @ \
            w["feed_forward.w2.weight"].T
    return norm(h, state["norm.weight"]) @ state["output.weight"].T


def test_mistral_export_matches_reference_rotary(trained_run, hf_export, single_process_group):
    from pretrain.checkpoint.weights import load_weights
    from pretrain.inference.generate import build_model

    out = trained_run.parent / "mistral"
    code, _, err = cli("export", trained_run, "--format", "mistral", "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.safetensors", "params.json", "tokenizer.model"]
    params = json.loads((out / "params.json").read_text())
    assert params == {"dim": 256, "n_layers": 4, "head_dim": 32, "hidden_dim": 688, "n_heads": 8, "n_kv_heads": 2,
                      "norm_eps": 1e-5, "vocab_size": 4096, "rope_theta": 10000.0, "sliding_window": WINDOW}
    state = load_file(out / "consolidated.safetensors")
    layer_names = {"attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                   "feed_forward.w2", "feed_forward.w3", "attention_norm", "ffn_norm"}
    assert set(state) == {"tok_embeddings.weight", "norm.weight", "output.weight"} | {
        f"layers.{i}.{name}.weight" for i in range(4) for name in layer_names}
    # transformers' own conversion of these Mistral weights gives back exactly the transformers export.
    hf = tensors(hf_export)
    for ours, theirs, heads in (("wq", "q_proj", 8), ("wk", "k_proj", 2)):
        assert torch.equal(permute_for_rope(state[f"layers.2.attention.{ours}.weight"], heads),
                           hf[f"model.layers.2.self_attn.{theirs}.weight"])

    tokens = torch.randint(0, 4096, (1, 40), generator=torch.Generator().manual_seed(4))
    ours = build_model(load_weights(trained_run), torch.float32)
    with torch.no_grad():
        assert relative_error(mistral_reference_logits(state, params, tokens), ours(tokens)) < 1e-5


# ------------------------------------------------------------------------------------------- layouts


def test_tp2_pp2_checkpoint_exports_what_its_run_computed_and_imports_for_more_training(tiny_data, tmp_path):
    """A real tp=2 x pp=2 run's checkpoint (four shard files) exported; transformers on that export reproduces the
    run's own evaluation loss; imported back at tp=1 (one file) it exports bit-identically; and `pretrain train`
    continues from the imported weights (its first loss is transformers' loss on that batch)."""
    from transformers import AutoModelForCausalLM

    from data_pipeline.loader import build_loader

    run_dir = tmp_path / "tp2pp2"
    train(run_dir, [*tiny_data, *TRAIN_COMMON, "train.steps=2", "parallel.micro_batch=2", "parallel.tp=2",
                    "parallel.pp=2", "train.eval_every=2", "train.eval_steps=1"], nproc=4)
    step_dir = run_dir / "checkpoints" / "step_00000002"
    assert len(list((step_dir / "model").glob("tp*-pp*.safetensors"))) == 4
    exported = tmp_path / "exported"
    assert cli("export", run_dir, "--out", exported)[0] == 0
    model = AutoModelForCausalLM.from_pretrained(exported)
    cfg = load_config(run_dir / "config.yaml")
    batches = iter(build_loader(cfg.data, split="eval", dp_rank=0, dp_size=1, micro_batch=2, vocab_size=4096))
    with torch.no_grad():
        eval_loss = sum(hf_loss(model, next(batches)["tokens"]) for _ in range(4)) / 4  # eval_steps x accumulation
    assert abs(eval_loss - metrics(run_dir, "eval")[2]) < 1e-5 * eval_loss

    imported = tmp_path / "imported"
    code, _, err = cli("import", exported, *tiny_data, "--out", imported, "--config", ROOT / "configs" / "tiny.yaml")
    assert code == 0, err
    assert [p.name for p in (imported / "checkpoints" / "step_00000000" / "model").iterdir()] == [
        "tp00-pp00-dp0000.safetensors"]
    again = tmp_path / "again"
    assert cli("export", imported, "--out", again)[0] == 0
    first, second = tensors(exported), tensors(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    train(imported, ["train.steps=1", "train.global_batch=8", "parallel.micro_batch=4", "train.eval_every=0",
                     "data.num_workers=0", "logging.tensorboard=false"], config=imported / "config.yaml")
    cfg = load_config(imported / "config.yaml")
    batches = iter(build_loader(cfg.data, dp_rank=0, dp_size=1, micro_batch=4, vocab_size=4096))
    with torch.no_grad():
        first_loss = sum(hf_loss(model, next(batches)["tokens"]) for _ in range(2)) / 2
    assert abs(metrics(imported, "train")[1] - first_loss) < 1e-5 * first_loss
    assert (imported / "checkpoints" / "step_00000001" / "manifest.json").is_file()


# ------------------------------------------------------------------------------------------- eval


def test_eval_gives_the_trainers_and_our_models_loss(trained_run, tiny_data, single_process_group):
    from pretrain.checkpoint.weights import load_weights
    from pretrain.inference.evaluate import eval_loader
    from pretrain.inference.generate import build_model

    eval_dir = next(o for o in tiny_data if o.startswith("data.eval=")).split("=", 1)[1]
    # The trainer evaluated eval_steps (2) x accumulation (8 / 4) micro-batches of 4 at step 3.
    code, out, err = cli("eval", trained_run, "--data", eval_dir, "--batches", 4, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["batches"] == 4 and result["tokens"] == 4 * 4 * 128
    assert abs(result["loss"] - metrics(trained_run, "eval")[3]) < 1e-5 * result["loss"]
    model = build_model(load_weights(trained_run), torch.float32)
    seed = load_config(trained_run / "config.yaml").data.seed
    loader = iter(eval_loader(eval_dir, model, micro_batch=4, seed=seed, tokenizer_sha256=None))
    with torch.no_grad():
        direct = []
        for _ in range(4):
            tokens = next(loader)["tokens"]
            logits = model(tokens[:, :-1])
            direct.append(F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item())
    assert abs(result["loss"] - sum(direct) / 4) < 1e-6 * result["loss"]
    assert abs(result["perplexity"] - torch.tensor(result["loss"]).exp().item()) < 1e-3


# ------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_with_one_line(trained_run, random_hf, tmp_path):
    broken_run = tmp_path / "broken_run"
    shutil.copytree(trained_run, broken_run)
    shard = broken_run / "checkpoints" / "step_00000003" / "model" / "tp00-pp00-dp0000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(random_hf, no_tokenizer)
    (no_tokenizer / "tokenizer.model").unlink()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")

    cases = [
        (["export", broken_run / "checkpoints" / "step_00000003", "--out", tmp_path / "a"], "does not match its"),
        (["export", broken_run, "--out", tmp_path / "b"], "no checkpoint under"),
        (["import", llama, "--out", tmp_path / "c"], "LlamaForCausalLM, not MistralForCausalLM"),
        (["import", tmp_path, "--out", tmp_path / "d"], "has no config.json"),
        (["import", no_tokenizer, "--out", tmp_path / "e"], "has no tokenizer.model and data.tokenizer is not set"),
        (["export", trained_run, "--out", tmp_path / "f", "--tokenizer", tmp_path / "nowhere"], "not found"),
        (["export", trained_run, "--out", taken], "exists and is not empty"),
        (["import", random_hf, "--out", taken], "exists and is not empty"),
        (["import", random_hf, "model.dim=128", "--out", tmp_path / "g"], "contradicts the imported weights"),
        (["generate", tmp_path / "missing", "--prompt", "x"], "does not exist"),
        (["generate", trained_run, "--prompt", "x", "--greedy", "--temperature", 0.5], "--greedy"),
        (["eval", trained_run, "--data", tmp_path], "manifest.json"),
    ]
    for args, message in cases:
        code, out, err = cli(*args)
        assert code == 2, (args, err[-2000:])
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"pretrain {args[0]}: error: ") and message in last, (args, err[-2000:])
    assert (taken / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken_run", "llama", "no_tokenizer", "taken"]
    code, _, err = cli("export", trained_run, "--out", taken, "--force")
    assert code == 0 and (taken / "config.json").is_file() and not (taken / "keep.txt").exists()


def test_a_run_without_a_checkpoint_yet_says_so_in_one_line(imported_random, tiny_data, tmp_path):
    """A run directory that has not saved yet (no checkpoints/, an empty one, or only a save in progress) is named
    as such, not as damaged checkpoints or as no run directory at all."""
    never_saved, empty, saving = (tmp_path / name for name in ("never_saved", "empty", "saving"))
    for run in (never_saved, empty, saving):
        run.mkdir()
        shutil.copyfile(imported_random / "config.yaml", run / "config.yaml")
    (empty / "checkpoints").mkdir()
    (saving / "checkpoints" / ".tmp-step_00000010").mkdir(parents=True)
    eval_dir = next(o for o in tiny_data if o.startswith("data.eval=")).split("=", 1)[1]
    for run in (never_saved, empty, saving):
        for args in (["generate", run, "--prompt", "x"], ["eval", run, "--data", eval_dir],
                     ["chat", run, "--message", "x"], ["moderate", run, "--text", "x"],
                     ["export", run, "--out", tmp_path / "out"]):
            code, out, err = cli(*args)
            assert code == 2 and not out, (args, err)
            assert err == (f"pretrain {args[0]}: error: {run / 'checkpoints'} holds no checkpoint yet: train until a "
                           "checkpoint is saved (checkpoint.every_steps, or the end of the run), or pass a checkpoint "
                           "directory\n"), (args, err)
    assert not (tmp_path / "out").exists()
