"""The main job (`pretrain demo`, which `bash run.sh` runs) at a small size: a 1.5 MB corpus, 128-token sequences,
16 steps in two processes (dp=2, ZeRO-1) stopped by SIGTERM after step 8 and resumed, export, generation.

The run is configured exactly as tests/runs.py trains, so an uninterrupted run of the same config is the reference:
the interrupted and resumed run must reproduce its every loss, to the last bit (tests/test_training.py explains
why this holds). Takes about 80 s on 2 CPU cores.
"""

import json
import subprocess
import sys

import pytest
import torch

from tests.runs import QUICK, ROOT, losses, train

STEPS = 16
INTERRUPT_AT = 8


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`pretrain demo` run once: (its --out, the data overrides, its combined output, summary.json)."""
    root = tmp_path_factory.mktemp("main_job")
    data = [f"data.train=[{{path: {root / 'data' / 'train'}}}]", f"data.eval={root / 'data' / 'eval'}",
            f"data.tokenizer={root / 'data' / 'tokenizer'}", "data.seq_len=128"]
    command = [sys.executable, "-m", "launch.cli", "demo", *data, *QUICK, f"train.steps={STEPS}",
               "--out", str(root / "out"), "--corpus-mb", "1.5", "--interrupt-at", str(INTERRUPT_AT)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = json.loads((root / "out" / "summary.json").read_text())
    return root / "out", data, result.stdout + result.stderr, summary


def test_interrupted_run_resumes_from_its_save_and_matches_an_uninterrupted_run(demo, tmp_path):
    out, data, output, summary = demo
    run_dir = out / "run"
    saved = summary["interrupted_at"]
    assert INTERRUPT_AT <= saved < STEPS
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{saved:08d}'} at step {saved}," in output
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    uninterrupted = train(tmp_path / "uninterrupted", data, [f"train.steps={STEPS}"], nproc=2)
    assert losses(run_dir) == uninterrupted


def test_loss_falls_and_the_plot_and_summary_are_written(demo):
    out, _, output, summary = demo
    run_losses = losses(out / "run")
    assert run_losses[STEPS] < run_losses[1] - 1.0, run_losses
    assert summary["first_loss"] == [1, run_losses[1]] and summary["final_loss"] == [STEPS, run_losses[STEPS]]
    plot = out / "run" / "loss.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 1000
    for path in (summary["run_dir"], summary["loss_plot"], summary["metrics"], summary["export"]):
        assert path in output  # where everything is, printed at the end
    assert "9/9" in output and "total" in output


def test_export_loads_in_transformers_with_our_logits(demo, single_process_group):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_pipeline.loader import TokenLoader
    from pretrain.checkpoint.weights import load_weights
    from pretrain.inference.generate import build_model

    out, _, _, summary = demo
    theirs = AutoModelForCausalLM.from_pretrained(out / "export")
    assert AutoTokenizer.from_pretrained(out / "export").eos_token_id == 2
    tokens = next(iter(TokenLoader([(summary["data"]["eval"], 1.0)], micro_batch=2)))["tokens"][:, :-1]
    ours = build_model(load_weights(out / "run"), torch.float32)
    with torch.no_grad():
        expected, got = ours(tokens), theirs(tokens).logits
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_both_generators_wrote_text(demo):
    _, _, output, summary = demo
    texts = [*summary["transformers_samples"].values(), *summary["pretrain_generate"].values()]
    assert len(texts) == 3 and all(text.strip() for text in texts), texts
    assert all(text in output for text in texts)


def test_refuses_an_output_directory_it_did_not_make(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = subprocess.run([sys.executable, "-m", "launch.cli", "demo", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"pretrain demo: error: {tmp_path} exists and was not made by `pretrain demo`: pass another --out, or "
        "remove it")
    assert (tmp_path / "mine.txt").read_text() == "keep me"
