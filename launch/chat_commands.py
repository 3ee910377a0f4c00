"""`pretrain chat` and `pretrain moderate`: an instruction-tuned model in one process, in Mistral's instruct
format (data_pipeline.chat), with the paper's guardrails: a system prompt, and self-reflection moderation."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launch.errors import UserError
from launch.export_commands import add_dtype_arg, add_sampling_args, load_with_tokenizer, sampling_options


def _system_prompt(args: argparse.Namespace) -> str | None:
    from data_pipeline.chat import GUARDRAIL_PROMPT

    if args.guardrails and args.system_prompt is not None:
        raise UserError("--guardrails sets the paper's system prompt: drop --system-prompt, or drop --guardrails")
    return GUARDRAIL_PROMPT if args.guardrails else args.system_prompt


def cmd_chat(args: argparse.Namespace) -> int:
    from pretrain.dtypes import resolve_dtype
    from pretrain.inference.chat import chat_reply
    from pretrain.inference.generate import build_model
    from pretrain.parallel import single_process_group

    temperature, top_p = sampling_options(args)
    system = _system_prompt(args)
    if args.message is None and args.json:
        raise UserError("--json prints one turn: pass --message TEXT with it")
    weights, tokenizer = load_with_tokenizer(args)
    messages = [{"role": "system", "content": system}] if system is not None else []
    with single_process_group():
        model = build_model(weights, resolve_dtype(args.dtype), tokenizer.eos_id)

        def answer(text: str):
            messages.append({"role": "user", "content": text})
            reply = chat_reply(model, tokenizer, messages, args.max_new_tokens, temperature=temperature,
                               top_p=top_p, seed=args.seed)
            messages.append({"role": "assistant", "content": reply.text})
            if reply.at_max_seq_len:
                print(f"(the answer was cut at the model's max_seq_len, {model.cfg.max_seq_len} tokens with the "
                      "conversation)", file=sys.stderr)
            return reply

        if args.message is not None:
            reply = answer(args.message)
            if args.json:
                print(json.dumps({"messages": messages, "reply": reply.text, "prompt_ids": reply.prompt_ids,
                                  "new_ids": reply.new_ids}))
            else:
                print(reply.text)
            return 0
        print(f"chatting with {args.model}" + (" (system prompt set)" if system else "")
              + "; an empty line or Ctrl-D ends", file=sys.stderr)
        while True:
            try:
                text = input("you> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            if not text.strip():
                return 0
            print(f"model> {answer(text).text}", flush=True)


def cmd_moderate(args: argparse.Namespace) -> int:
    from data_pipeline.chat import MODERATION_LABELS
    from pretrain.dtypes import resolve_dtype
    from pretrain.inference.chat import moderate
    from pretrain.inference.generate import build_model
    from pretrain.parallel import single_process_group

    if (args.text is None) == (args.file is None):
        raise UserError("pass the texts to judge with --text TEXT ... or --file FILE (one text per line)")
    if args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise UserError(f"--file {path} does not exist: pass a text file with one text per line")
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        texts = args.text
    weights, tokenizer = load_with_tokenizer(args)
    with single_process_group():
        model = build_model(weights, resolve_dtype(args.dtype), tokenizer.eos_id)
        for text in texts:
            verdict = moderate(model, tokenizer, text)
            if args.json:
                print(json.dumps({"text": text, **verdict}))
            else:
                print(f"{verdict['label']:<{max(map(len, MODERATION_LABELS))}}  p={verdict['probability']:.3f}  "
                      f"{text[:100]}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk to an instruction-tuned model in Mistral's instruct format")
    p.add_argument("model", help="run directory, checkpoint directory, or `pretrain export --format hf` output")
    p.add_argument("--message", help="one user message: print the answer and exit (default: interactive)")
    p.add_argument("--system-prompt", help="a system prompt, placed before the first user message")
    p.add_argument("--guardrails", action="store_true",
                   help="the Mistral 7B paper's guardrail system prompt (\"Always assist with care, respect, and "
                        "truth. ...\")")
    add_sampling_args(p)
    p.add_argument("--json", action="store_true", help="with --message: the conversation, reply and token ids")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("moderate", help="self-reflection moderation: the model labels texts acceptable or "
                                        "problematic, with the probability read from its logits")
    p.add_argument("model", help="run directory, checkpoint directory, or `pretrain export --format hf` output")
    p.add_argument("--text", nargs="+", help="texts to judge")
    p.add_argument("--file", help="a file of texts to judge, one per line")
    add_dtype_arg(p)
    p.add_argument("--json", action="store_true", help="one JSON object per text: label, probability, both labels'")
    p.set_defaults(func=cmd_moderate)
