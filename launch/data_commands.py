"""`pretrain tokenizer train|show` and `pretrain data corpus|prepare|inspect`: thin commands over data_pipeline.

Bad input raises DataError (one line naming the file and the fix, exit 2 from launch.cli); progress goes to
stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

DEFAULT_EXAMPLE = "Mistral 7B was released in 2023: 7.24 B parameters, sliding-window attention (W=4096). ✓"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------- tokenizer


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from data_pipeline.tokenizer import META_FILE, MODEL_FILE, train_tokenizer

    _log(f"training a {args.vocab_size}-piece BPE tokenizer on a sample of up to {args.sample_mb:g} MB "
         "of the input (one sentencepiece thread)")
    start = time.perf_counter()
    tokenizer = train_tokenizer(args.input, args.out, vocab_size=args.vocab_size,
                                sample_bytes=int(args.sample_mb * 1e6))
    _log(f"trained in {time.perf_counter() - start:.1f} s")
    print(f"sha256 {tokenizer.sha256}")
    print(f"wrote {Path(args.out) / MODEL_FILE} (vocab {tokenizer.vocab_size}) and {Path(args.out) / META_FILE}")
    return 0


def _special(tokenizer, token_id: int) -> str:
    return "none" if token_id < 0 else f"{token_id} {tokenizer.id_to_piece(token_id)!r}"


def cmd_tokenizer_show(args: argparse.Namespace) -> int:
    from data_pipeline.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.path)
    ids = tokenizer.encode(args.text, bos=True, eos=True)
    decoded = tokenizer.decode(ids)
    print(f"tokenizer {tokenizer.path}")
    print(f"  sha256      {tokenizer.sha256}")
    print(f"  vocab size  {tokenizer.vocab_size}")
    print(f"  special     unk {_special(tokenizer, tokenizer.unk_id)}, bos {_special(tokenizer, tokenizer.bos_id)}, "
          f"eos {_special(tokenizer, tokenizer.eos_id)}, pad {_special(tokenizer, tokenizer.pad_id)}")
    print(f"  text        {args.text!r}")
    print(f"  ids ({len(ids)})    {ids}")
    print(f"  pieces      {[tokenizer.id_to_piece(i) for i in ids]}")
    print(f"  decoded     {decoded!r} ({'round trip exact' if decoded == args.text else 'differs from the text'})")
    return 0


# ---------------------------------------------------------------- data


def cmd_data_corpus(args: argparse.Namespace) -> int:
    from data_pipeline.corpus import write_builtin_corpus

    counts = write_builtin_corpus(args.out, max_mb=args.max_mb)
    out = Path(args.out)
    for split, c in counts.items():
        print(f"{split}: {c['documents']} documents, {c['bytes'] / 1e6:.2f} MB -> {out / split / 'stdlib.jsonl'}")
    return 0


def cmd_data_instruct(args: argparse.Namespace) -> int:
    from data_pipeline.corpus import write_builtin_instruct

    counts = write_builtin_instruct(args.out, max_mb=args.max_mb)
    out = Path(args.out)
    for split, c in counts.items():
        print(f"{split}: {_count(c['documents'], 'conversation')}, {c['bytes'] / 1e6:.2f} MB of text -> "
              f"{out / split / 'instruct.jsonl'}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from data_pipeline.errors import DataError
    from data_pipeline.prepare import MANIFEST, prepare, prepare_chat

    if args.chat:
        if args.keep_documents or args.workers:
            raise DataError("--chat keeps each conversation whole in one process: drop --keep-documents/--workers")
        m = prepare_chat(args.input, args.tokenizer, args.seq_len, args.out, shard_mb=args.shard_mb,
                         skip_bad=args.skip_bad)
        if m["bad_lines"]:
            print(f"skipped {_count(m['bad_lines'], 'bad line')}:")
            for line in m["bad_line_examples"]:
                print(f"  {line}")
        print(f"{_count(m['documents'], 'conversation')} ({_count(m['bad_lines'], 'bad line')} skipped), "
              f"{m['tokens']:,} tokens, {m['trained_tokens']:,} of them trained on (answers and their </s>) -> "
              f"{m['samples']:,} samples of {m['sample_tokens']} tokens in {len(m['shards'])} shard(s); "
              f"{_count(m['dropped_conversations'], 'conversation')} longer than {m['sample_tokens']} tokens dropped "
              f"({m['dropped_tokens']:,} tokens), {m['padding_tokens']:,} padding tokens")
        print(f"wrote {Path(args.out) / MANIFEST}")
        return 0
    if args.skip_bad:
        raise DataError("--skip-bad applies to chat data: add --chat, or drop --skip-bad")
    m = prepare(args.input, args.tokenizer, args.seq_len, args.out, shard_mb=args.shard_mb, workers=args.workers,
                keep_documents=args.keep_documents)
    dropped = m["dropped_tokens"] / max(m["tokens"], 1)
    print(f"{m['documents']:,} documents, {m['tokens']:,} tokens -> {m['samples']:,} samples of "
          f"{m['sample_tokens']} tokens in {len(m['shards'])} shard(s); {m['dropped_tokens']:,} tokens "
          f"({dropped:.2%}) dropped")
    print(f"wrote {Path(args.out) / MANIFEST}")
    return 0


def _tokenizer_for(manifest: dict, override: str | None):
    """The tokenizer that made the data, if it can be found and is the same one (by sha256); else None."""
    from data_pipeline.errors import DataError
    from data_pipeline.tokenizer import Tokenizer

    path = override or manifest.get("tokenizer_path")
    if not path:
        return None, "the manifest names no tokenizer: pass --tokenizer to decode samples"
    try:
        tokenizer = Tokenizer.load(path)
    except DataError as e:
        if override:
            raise
        return None, f"{e}; pass --tokenizer to decode samples"
    if tokenizer.sha256 != manifest["tokenizer_sha256"]:
        raise DataError(f"tokenizer {path} (sha256 {tokenizer.sha256[:12]}...) is not the one that prepared the "
                        f"data ({manifest['tokenizer_sha256'][:12]}...): pass the right --tokenizer")
    return tokenizer, None


def _decoded_with_special(tokenizer, tokens, trained) -> str:
    """`tokens` decoded with <s> and </s> written out and, where `trained` (a loss mask, or empty) marks them, the
    trained tokens between ⟦ and ⟧. Each run of text is what the sample's prefix up to its end decodes to beyond
    the previous run's prefix, so spaces come out as in a decode of the whole sample."""
    special = {tokenizer.bos_id, tokenizer.eos_id}
    is_trained = [bool(t) for t in trained] or [False] * len(tokens)
    shown, decoded = [], ""
    for in_training, stretch in itertools.groupby(range(len(tokens)), key=is_trained.__getitem__):
        text = ""
        for is_special, run in itertools.groupby(stretch, key=lambda i: tokens[i] in special):
            run = list(run)
            if is_special:
                text += "".join(tokenizer.id_to_piece(tokens[i]) for i in run)
            else:
                prefix = tokenizer.decode(tokens[:run[-1] + 1])
                text += prefix[len(decoded):]
                decoded = prefix
        shown.append(f"⟦{text}⟧" if in_training else text)
    return "".join(shown)


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import track

    from data_pipeline.errors import DataError
    from data_pipeline.loader import read_manifest, read_shard, values_per_sample

    m = read_manifest(args.dir)
    print(f"dataset {args.dir}: {len(m['shards'])} shard(s), {m['samples']:,} samples of {m['sample_tokens']} "
          f"tokens (seq_len {m['seq_len']} + 1), {m['dtype']}")
    print(f"  tokens      {m['tokens']:,} from {m['documents']:,} documents, {m['dropped_tokens']:,} dropped"
          + (" (documents kept apart)" if m["keep_documents"] else ""))
    if m.get("loss_mask"):
        print(f"  loss mask   conversations in {m['chat_format']} format, {m['trained_tokens']:,} tokens trained on")
    print(f"  tokenizer   vocab {m['vocab_size']}, bos {m['bos_id']}, eos {m['eos_id']}, "
          f"sha256 {m['tokenizer_sha256']}")
    for source in m["sources"]:
        print(f"  source      {source['path']} ({source['bytes']:,} bytes)")

    failed = []
    shards = track(m["shards"], description="verify", console=Console(stderr=True), transient=True,
                   disable=not sys.stderr.isatty())
    first_samples = None
    for shard in shards:
        try:
            values = values_per_sample(m["sample_tokens"], bool(m.get("loss_mask")))
            samples = read_shard(args.dir, shard, values, m["dtype"])  # the tokens, then any loss mask
        except DataError as e:
            failed.append(shard["name"])
            print(f"  FAILED      {e}")
            continue
        if first_samples is None:
            first_samples = samples[:args.samples]
    print(f"  verified    {len(m['shards']) - len(failed)}/{len(m['shards'])} shards (size, sha256, tar layout)")

    if first_samples is not None and args.samples > 0:
        tokenizer, why_not = _tokenizer_for(m, args.tokenizer)
        if args.show_special and tokenizer:
            print("  (<s> and </s> written out" + (", the trained tokens between ⟦ and ⟧)" if m.get("loss_mask")
                                                  else ")"))
        for i, values in enumerate(first_samples):
            sample, mask = values[:m["sample_tokens"]], values[m["sample_tokens"]:]
            if not tokenizer:
                text = " ".join(map(str, sample[:64]))
            elif args.show_special:
                text = _decoded_with_special(tokenizer, sample, mask)
            else:
                text = tokenizer.decode(sample)
            print(f"  sample {i}    {text[:args.chars]!r}{' ...' if len(text) > args.chars else ''}")
        if why_not:
            print(f"  (token ids shown: {why_not})")
    if failed:
        raise DataError(f"{len(failed)} of {len(m['shards'])} shards of {args.dir} failed verification "
                        f"({', '.join(failed)}): re-copy them or re-run `pretrain data prepare`")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    tok = sub.add_parser("tokenizer", help="train a sentencepiece BPE tokenizer, or show an existing one")
    actions = tok.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("train", help="train a Mistral-shaped BPE tokenizer (byte fallback, split digits)")
    p.add_argument("--input", nargs="+", required=True, metavar="GLOB",
                   help="input files or quoted globs: .txt (one document each), .jsonl or .parquet ('text' field)")
    p.add_argument("--vocab-size", type=int, default=32000, help="number of pieces (default 32000, Mistral's)")
    p.add_argument("--out", required=True, help="directory for tokenizer.model and tokenizer_meta.json")
    p.add_argument("--sample-mb", type=float, default=100,
                   help="train on a deterministic sample of about this many MB spread over the input (default 100)")
    p.set_defaults(func=cmd_tokenizer_train)
    p = actions.add_parser("show", help="load any sentencepiece tokenizer.model (e.g. Mistral's) and describe it")
    p.add_argument("path", help="a tokenizer.model file or a directory holding one")
    p.add_argument("--text", default=DEFAULT_EXAMPLE, help="text to encode and decode as the example")
    p.set_defaults(func=cmd_tokenizer_show)

    data = sub.add_parser("data", help="make, prepare (tokenize into shards) and inspect training data")
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("corpus", help="write the built-in corpus (this Python's standard library sources) "
                                          "as OUT/train/stdlib.jsonl and OUT/eval/stdlib.jsonl")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-mb", type=float, help="stop after about this many MB (default: all, about 11 MB)")
    p.set_defaults(func=cmd_data_corpus)
    p = actions.add_parser("instruct", help="write the built-in instruction set (questions about standard-library "
                                            "functions, answered by their docstrings) as OUT/{train,eval}/"
                                            "instruct.jsonl")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-mb", type=float, help="cap the train split at about this many MB of text (default: all)")
    p.set_defaults(func=cmd_data_instruct)
    p = actions.add_parser("prepare", help="tokenize text into packed, checksummed webdataset shards")
    p.add_argument("--input", nargs="+", required=True, metavar="GLOB",
                   help="input files or quoted globs: .txt (one document each), .jsonl or .parquet ('text' field)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or .model file")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per training sequence (samples hold one more)")
    p.add_argument("--out", required=True, help="output directory (its old shards and manifest are replaced)")
    p.add_argument("--shard-mb", type=float, default=64, help="shard size in MB (default 64)")
    p.add_argument("--workers", type=int, help="tokenizing processes (default: all CPU cores)")
    p.add_argument("--keep-documents", action="store_true",
                   help="no sample spans two documents: each is cut on its own and its tail (and any document "
                        "shorter than seq_len+1) dropped")
    p.add_argument("--chat", action="store_true",
                   help='conversations ({"messages": [...]} per .jsonl line) in Mistral\'s instruct format, with a '
                        "loss mask over the assistant's answers; conversations are packed whole and one longer than "
                        "seq_len+1 tokens is dropped")
    p.add_argument("--skip-bad", action="store_true",
                   help="with --chat: skip and count malformed lines instead of stopping at the first")
    p.set_defaults(func=cmd_data_prepare)
    p = actions.add_parser("inspect", help="manifest summary, verification of every shard, decoded samples")
    p.add_argument("dir", help="a directory written by `pretrain data prepare`")
    p.add_argument("--samples", type=int, default=3, help="samples to decode (default 3)")
    p.add_argument("--chars", type=int, default=200, help="characters shown per sample (default 200)")
    p.add_argument("--tokenizer", help="tokenizer to decode with (default: the one the manifest names)")
    p.add_argument("--show-special", action="store_true",
                   help="write out <s> and </s> in the decoded samples and, for chat data, put the tokens the loss "
                        "is on (answers and their </s>) between ⟦ and ⟧")
    p.set_defaults(func=cmd_data_inspect)
