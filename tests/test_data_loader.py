"""TokenLoader: exact resume (also across worker counts and dp sizes), every sample once per epoch over the
ranks, mixture weights, and shuffles that depend on (seed, epoch) only.

Ranks are separate TokenLoader objects in one process: the loader talks to no process group, each rank
derives its slice from (dp_rank, dp_size) alone, so this is the same computation torchrun's ranks do.
"""

import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.loader import TokenLoader
from tests.data_helpers import make_dataset, make_tokenizer, tar_samples, write_jsonl


def key(row) -> bytes:
    return np.asarray(row, dtype=np.int64).tobytes()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two small datasets of different text: A (~600 samples in ~13 shards, so ~4 windows of 4 shards) and B."""
    root = tmp_path_factory.mktemp("loader")
    tokenizer = make_tokenizer(root, max_mb=0.3)
    texts = [json.loads(line)["text"] for line in (root / "corpus" / "train" / "stdlib.jsonl").open()]
    sizes = np.cumsum([len(t) for t in texts])
    a_texts, b_texts = texts[:int(np.searchsorted(sizes, 60_000)) + 1], texts[-3:]
    a = make_dataset(root / "a", [str(write_jsonl(root / "a.jsonl", a_texts))], tokenizer, shard_mb=0.05)
    b = make_dataset(root / "b", [str(write_jsonl(root / "b.jsonl", b_texts))], tokenizer, shard_mb=0.05)
    samples = {name: Counter(key(s) for s in tar_samples(path)) for name, path in (("a", a), ("b", b))}
    assert not samples["a"].keys() & samples["b"].keys()
    assert 500 < sum(samples["a"].values()) < 2000 and len(json.loads((a / "manifest.json").read_text())["shards"]) > 8
    return {"a": str(a), "b": str(b), "samples": samples}


def take(loader: TokenLoader, steps: int) -> list[np.ndarray]:
    batches = []
    for batch in loader:
        batches.append(batch["tokens"].numpy())
        if len(batches) == steps:
            break
    return batches


def global_sequence(loaders: list[TokenLoader], steps: int) -> list[bytes]:
    """The samples of `steps` steps over all ranks, in global order (step, then rank, then row)."""
    per_rank = [take(loader, steps) for loader in loaders]
    return [key(row) for step in zip(*per_rank, strict=True) for rank_batch in step for row in rank_batch]


def rank_loaders(path: str, dp: int, micro_batch: int, **kwargs) -> list[TokenLoader]:
    return [TokenLoader([(path, 1.0)], micro_batch=micro_batch, dp_rank=r, dp_size=dp, **kwargs) for r in range(dp)]


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_ranks_cover_every_sample_once_per_epoch(data, dp):
    everything = data["samples"]["a"]
    total = sum(everything.values())
    micro_batch = 2
    steps = math.ceil(total / (dp * micro_batch)) + 2
    loaders = rank_loaders(data["a"], dp, micro_batch)
    sequence = global_sequence(loaders, steps)
    assert Counter(sequence[:total]) == everything
    # The ranks slice one global stream: the same stream whatever dp is.
    assert sequence == global_sequence(rank_loaders(data["a"], 1, micro_batch), steps * dp)
    assert all(loader.state_dict() == loaders[0].state_dict() for loader in loaders)


@pytest.mark.parametrize("dp_before,dp_after", [(2, 1), (1, 2), (3, 2)])
def test_resume_under_another_dp_size_neither_repeats_nor_skips(data, dp_before, dp_after):
    micro_batch = 2
    total = sum(data["samples"]["a"].values())
    before_steps = 97  # past the first window; the resumed part crosses into the second epoch
    after_steps = math.ceil((total - before_steps * dp_before * micro_batch) / (dp_after * micro_batch)) + 5
    loaders = rank_loaders(data["a"], dp_before, micro_batch)
    sequence = global_sequence(loaders, before_steps)
    state = json.loads(json.dumps(loaders[-1].state_dict()))  # as a checkpoint stores it
    resumed = rank_loaders(data["a"], dp_after, micro_batch)
    for loader in resumed:
        loader.load_state_dict(state)
    sequence += global_sequence(resumed, after_steps)
    assert Counter(sequence[:total]) == data["samples"]["a"]
    reference = global_sequence(rank_loaders(data["a"], 1, micro_batch), len(sequence) // micro_batch)
    assert sequence == reference


@pytest.fixture(scope="module")
def mixed_reference(data):
    """300 steps of rank 1 of 2 over A and B mixed 7:3, no workers: both sources pass an epoch boundary."""
    loader = TokenLoader([(data["a"], 7.0), (data["b"], 3.0)], micro_batch=3, dp_rank=1, dp_size=2, seed=11)
    batches = take(loader, 300)
    assert all(s["epoch"] >= 1 for s in loader.state_dict()["sources"])
    return batches


@pytest.mark.parametrize("workers", [(0, 0, 0), (1, 1, 1), (2, 2, 2), (0, 2, 1), (2, 1, 0), (1, 0, 2)])
def test_save_restore_gives_identical_batches(data, mixed_reference, workers):
    """Saved at two random steps and restored each time, with the worker counts given (before, between, after)."""
    rng = random.Random(str(workers))
    cuts = sorted(rng.sample(range(1, 300), 2))
    spans = [cuts[0], cuts[1] - cuts[0], 300 - cuts[1]]
    batches, state = [], None
    for count, steps in zip(workers, spans, strict=True):
        loader = TokenLoader([(data["a"], 7.0), (data["b"], 3.0)], micro_batch=3, dp_rank=1, dp_size=2, seed=11,
                             num_workers=count)
        if state is not None:
            loader.load_state_dict(state)
        batches += take(loader, steps)
        state = json.loads(json.dumps(loader.state_dict()))
        assert state["step"] == len(batches)
    assert len(batches) == len(mixed_reference)
    assert all(np.array_equal(a, b) for a, b in zip(batches, mixed_reference, strict=True))


def test_mixture_weights_are_honoured(data):
    """Each step draws its source; the count from B is Binomial(n, 0.25). Bound: 4 standard deviations
    (sqrt(n p (1-p)) = 27.4 for n = 4000, so +-110 steps, +-2.7 % of the weight); a wrong weight (e.g. 0.3, 200
    steps off) or a source drawn per sample instead of per step would fall outside."""
    n, p = 4000, 0.25
    loader = TokenLoader([(data["a"], 3.0), (data["b"], 1.0)], micro_batch=2, seed=5)
    from_b = 0
    for batch in take(loader, n):
        rows = {key(row) for row in batch}
        assert rows <= data["samples"]["b"].keys() or rows <= data["samples"]["a"].keys()  # one source per step
        from_b += rows <= data["samples"]["b"].keys()
    assert abs(from_b - n * p) <= 4 * math.sqrt(n * p * (1 - p)), from_b


def test_shuffle_depends_on_seed_and_epoch_only(data):
    total = sum(data["samples"]["a"].values())

    def two_epochs(seed: int) -> list[bytes]:
        loader = TokenLoader([(data["a"], 1.0)], micro_batch=1, seed=seed)
        return [key(b[0]) for b in take(loader, 2 * total)]

    seed0, again, seed1 = two_epochs(0), two_epochs(0), two_epochs(1)
    assert seed0 == again
    epochs = [seed0[:total], seed0[total:], seed1[:total], seed1[total:]]
    assert all(Counter(e) == data["samples"]["a"] for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4
    # Shuffled, not merely rotated: the first epoch is not in file order.
    in_file_order = [key(s) for s in tar_samples(Path(data["a"]))]
    assert epochs[0] != in_file_order


def test_reads_shards_through_a_url_template(data):
    """A `{name}` source is opened with webdataset's gopen: here a `pipe:` command, as for object stores."""
    local = take(TokenLoader([(data["a"], 1.0)], micro_batch=4), 200)
    piped = take(TokenLoader([(f"pipe:cat {data['a']}/{{name}}", 1.0)], micro_batch=4), 200)
    assert all(np.array_equal(a, b) for a, b in zip(local, piped, strict=True))


@pytest.mark.gpu
def test_batches_reach_the_gpu_from_pinned_memory(data):
    """The loader pins its batches on a GPU machine; they must reach the GPU from there, whole (asynchronous copies):
    slicing them into inputs and labels on the host first copied them into pageable memory, which the GPU copy then
    read synchronously."""
    import torch

    from pretrain.model.mistral import inputs_and_labels

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    with iter(TokenLoader([(data["a"], 1.0)], micro_batch=4, num_workers=1)) as batches:
        batch = next(batches)
    assert batch["tokens"].is_pinned()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        inputs_and_labels(batch, torch.device("cuda"))
        torch.cuda.synchronize()
    copies = [event.name for event in profile.events() if "Memcpy HtoD" in event.name]
    assert copies and all("Pinned" in name for name in copies), copies


def test_evaluation_reads_while_another_thread_holds_a_lock_that_a_forked_worker_needs(data):
    """The pipelined evaluation hang (issue 43), made deterministic. Evaluation had a DataLoader worker of its own,
    forked anew at each evaluation from a rank that runs other threads (gloo's, the watchdog, a checkpoint writer); a
    fork copies their locks as they are at that moment, and the worker takes torch.storage's _share_memory_lock for
    every batch it sends (its tensors travel through shared memory): a fork while another thread held it left the
    worker's copy held forever, and the evaluation waited for its first batch forever. Evaluation now reads in the
    rank itself, whatever data.num_workers says."""
    import threading
    from types import SimpleNamespace

    import torch.storage

    from data_pipeline.loader import build_loader

    seq_len = json.loads((Path(data["a"]) / "manifest.json").read_text())["seq_len"]
    data_cfg = SimpleNamespace(train=[], eval=data["a"], tokenizer=None, num_workers=1, seed=0,
                               skip_corrupt_shards=False, loss_mask=False, seq_len=seq_len)
    held, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:  # a thread in the middle of sharing a tensor while the evaluation starts
        with torch.storage._share_memory_lock:
            held.set()
            release.wait()

    threading.Thread(target=hold_the_lock, daemon=True).start()
    held.wait()
    try:
        loader = build_loader(data_cfg, split="eval", dp_rank=0, dp_size=1, micro_batch=4)
        first = []
        reader = threading.Thread(target=lambda: first.append(next(iter(loader))), daemon=True)
        reader.start()
        reader.join(timeout=30)
        assert first, "no evaluation batch within 30 s while another thread held torch.storage's _share_memory_lock"
    finally:
        release.set()
