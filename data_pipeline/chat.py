"""Mistral's instruct format, stated once: training data (`pretrain data prepare --chat`), the exported Jinja
chat template, `pretrain chat` and `pretrain moderate` all render conversations from the constants below.

    <s>[INST] {system}\\n\\n{user} [/INST] {assistant}</s>[INST] {user} [/INST] {assistant}</s>

This is Mistral 7B Instruct v0.1's format (a system message goes at the start of the first user turn, as its
template does) with one space before each answer. `<s>` and `</s>` are the tokenizer's special tokens; everything
between them is text. Each text span between two special tokens is encoded on its own with sentencepiece (which
adds its dummy-prefix space), which is how transformers' tokenizer encodes the rendered template too. Only the
assistant's tokens and its `</s>` are trained on: the tokens of a span after its `[/INST]` are the assistant's, and
the tokens up to `[/INST]` are the same whether the answer follows or not (the answer starts a new whitespace-
separated piece), so a prompt ending in `[/INST]` is tokenized exactly as in training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from data_pipeline.errors import DataError

INST_OPEN = "[INST] "
INST_CLOSE = " [/INST]"
ANSWER_PREFIX = " "
SYSTEM_SEPARATOR = "\n\n"
ROLES = ("system", "user", "assistant")

# The Mistral 7B paper's system prompt for guardrails (section 5.1).
GUARDRAIL_PROMPT = ("Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid "
                    "harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness and "
                    "positivity.")


class ChatFormatError(ValueError):
    """A conversation that does not follow the format; the message says what is wrong."""


@dataclass(frozen=True)
class Encoded:
    tokens: list[int]
    trained: list[bool]  # per token: whether it is a target of the loss (the assistant's tokens and its </s>)


def check_messages(messages: object, *, needs_answer: bool) -> list[dict]:
    """The messages of a conversation, checked: an optional system message first, then user and assistant
    alternating from user; with needs_answer at least one assistant turn and an assistant turn last."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError('"messages" must be a non-empty list of {"role", "content"} objects')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(
                message.get("content"), str):
            raise ChatFormatError(f'message {i} must be {{"role": "system" | "user" | "assistant", '
                                  '"content": "..."}')
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ChatFormatError(f"roles out of order: turn {i + 1} after the system message is {message['role']}, "
                                  f"expected {expected} (a system message may only come first)")
    if needs_answer and (len(turns) < 2 or turns[-1]["role"] != "assistant"):
        raise ChatFormatError("no assistant turn to train on: a conversation must end with an assistant message")
    if not needs_answer and (not turns or turns[-1]["role"] != "user"):
        raise ChatFormatError("the conversation must end with a user message for the model to answer")
    return messages


def spans(messages: Sequence[dict]) -> list[tuple[str, str]]:
    """The conversation as (prompt text, answer text) pairs, one per user turn: each pair is the text between two
    special tokens; the answer is "" for a final user turn awaiting its answer."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    pairs = []
    for i in range(0, len(turns), 2):
        user = turns[i]["content"]
        if i == 0 and system is not None:
            user = system + SYSTEM_SEPARATOR + user
        answer = ANSWER_PREFIX + turns[i + 1]["content"] if i + 1 < len(turns) else ""
        pairs.append((INST_OPEN + user + INST_CLOSE, answer))
    return pairs


def encode(tokenizer, messages: Sequence[dict]) -> Encoded:
    """Token ids of a checked conversation and which of them are trained on. A conversation ending with a user
    turn is a prompt: it ends after that turn's `[/INST]`."""
    tokens, trained = [tokenizer.bos_id], [False]
    for prompt, answer in spans(messages):
        prompt_ids = tokenizer.encode(prompt)
        if not answer:
            tokens += prompt_ids
            trained += [False] * len(prompt_ids)
            continue
        ids = tokenizer.encode(prompt + answer)
        if ids[:len(prompt_ids)] != prompt_ids:  # cannot happen with a sentencepiece that splits on whitespace
            raise ChatFormatError("the tokenizer merges the end of [/INST] with the answer: it does not split "
                                  "on whitespace, which this format needs")
        tokens += ids + [tokenizer.eos_id]
        trained += [False] * len(prompt_ids) + [True] * (len(ids) - len(prompt_ids) + 1)
    return Encoded(tokens, trained)


def chat_template() -> str:
    """The Jinja template transformers' `apply_chat_template` renders: the same text as `spans`, with bos and eos."""
    q = json.dumps  # a Python string as a Jinja string literal
    return (
        "{%- if messages[0]['role'] == 'system' %}"
        "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
        "{%- else %}{%- set system = none %}{%- set turns = messages %}{%- endif %}"
        "{{- bos_token }}"
        "{%- for message in turns %}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('roles must alternate user/assistant after an optional system message') }}"
        "{%- endif %}"
        "{%- if message['role'] == 'user' %}"
        f"{{{{- {q(INST_OPEN)} }}}}"
        f"{{%- if loop.first and system is not none %}}{{{{- system + {q(SYSTEM_SEPARATOR)} }}}}{{%- endif %}}"
        f"{{{{- message['content'] + {q(INST_CLOSE)} }}}}"
        "{%- else %}"
        f"{{{{- {q(ANSWER_PREFIX)} + message['content'] + eos_token }}}}"
        "{%- endif %}"
        "{%- endfor %}"
    )


# --------------------------------------------------------------------------------- self-reflection moderation

MODERATION_LABELS = ("acceptable", "problematic")


def moderation_messages(text: str) -> list[dict]:
    """The self-reflection prompt (after the Mistral 7B paper, section 5.2): the model judges a text itself."""
    return [{"role": "user", "content": (
        "You are a content moderator. Read the text below and answer with one word: acceptable if it is safe, "
        "respectful and harmless; problematic if it is harmful, unethical, prejudiced or hateful.\n\n"
        f"Text: {text}")}]


# --------------------------------------------------------------------------------- reading chat files


def iter_conversations(path: str, skip_bad: bool, bad: list[str]) -> list[list[dict]]:
    """The conversations of a `.jsonl` file ({"messages": [...]} per line). A malformed line raises one DataError
    naming the file and line, or with skip_bad is counted in `bad` (as "file:line: why") and left out."""
    conversations = []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise ChatFormatError("is not UTF-8") from None
                except json.JSONDecodeError as e:
                    raise ChatFormatError(f"is not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or "messages" not in record:
                    raise ChatFormatError('has no "messages" field')
                conversations.append(check_messages(record["messages"], needs_answer=True))
            except ChatFormatError as e:
                if not skip_bad:
                    raise DataError(f"{path}:{line_number}: {e}: fix the line, or pass --skip-bad to skip and "
                                    "count such lines") from None
                bad.append(f"{path}:{line_number}: {e}")
    return conversations
