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
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from data_pipeline.errors import DataError, lone_surrogate

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


# What is wrong with a conversation, as check_messages and the exported template both say it: str.format templates,
# filled in by Python and, through _jinja_raise, by Jinja.
NO_ROLE = 'messages[{i}] has no "role": give it "role": "system", "user" or "assistant"'
UNKNOWN_ROLE = ('messages[{i}] has role {role}, which this format does not have: use "system", "user" or '
                '"assistant" (write tool calls and results as assistant and user text)')
NO_CONTENT = 'messages[{i}] has no "content": give its text as "content": "..."'
NULL_CONTENT = 'messages[{i}] has "content": null: give its text as a string ("" for an empty message)'
LIST_CONTENT = ('messages[{i}] has a list as "content": this format takes plain text, so join the text parts into '
                'one string')
OTHER_CONTENT = 'messages[{i}] has {kind} as "content", not text: write it as a JSON string (quoted)'
SYSTEM_NOT_FIRST = 'roles out of order: messages[{i}] is "system", but a system message may only come first'
OUT_OF_ORDER = ('roles out of order: messages[{i}] is "{role}", expected "{expected}" (after an optional system '
                'message, turns alternate user, assistant, user, ...)')
NO_USER = "the conversation has no user message: give one after the optional system message"
NO_QUESTION = "the conversation must end with a user message for the model to answer"
NO_ANSWER = "no assistant turn to train on: a conversation must end with an assistant message"


def check_messages(messages: object, *, needs_answer: bool) -> list[dict]:
    """The messages of a conversation, checked: an optional system message first, then user and assistant
    alternating from user; with needs_answer an assistant turn last, else a user turn."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError('"messages" must be a non-empty list of {"role": ..., "content": "..."} objects')
    first_turn = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    for i, message in enumerate(messages):
        _check_message(i, message, first_turn)
    if len(messages) == first_turn:
        raise ChatFormatError(NO_USER)
    if needs_answer and messages[-1]["role"] != "assistant":
        raise ChatFormatError(NO_ANSWER)
    if not needs_answer and messages[-1]["role"] != "user":
        raise ChatFormatError(NO_QUESTION)
    return messages


def _check_message(i: int, message: object, first_turn: int) -> None:
    """Message i on its own, then its place: turns (from index first_turn) alternate user, assistant."""
    if not isinstance(message, dict):
        raise ChatFormatError(f'messages[{i}] is not an object: write {{"role": "user", "content": "..."}}')
    if "role" not in message:
        raise ChatFormatError(NO_ROLE.format(i=i))
    role = message["role"]
    if role not in ROLES:
        raise ChatFormatError(UNKNOWN_ROLE.format(i=i, role=json.dumps(role, ensure_ascii=False)))
    if "content" not in message:
        raise ChatFormatError(NO_CONTENT.format(i=i))
    content = message["content"]
    if content is None:
        raise ChatFormatError(NULL_CONTENT.format(i=i))
    if isinstance(content, list):
        raise ChatFormatError(LIST_CONTENT.format(i=i))
    if not isinstance(content, str):
        kind = "a boolean" if isinstance(content, bool) else "a number" if isinstance(content, int | float) \
            else "an object"
        raise ChatFormatError(OTHER_CONTENT.format(i=i, kind=kind))
    if role == "system" and i > 0:
        raise ChatFormatError(SYSTEM_NOT_FIRST.format(i=i))
    if i >= first_turn:
        expected = ("user", "assistant")[(i - first_turn) % 2]
        if role != expected:
            raise ChatFormatError(OUT_OF_ORDER.format(i=i, role=role, expected=expected))


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
    """The Jinja template transformers' `apply_chat_template` renders: the same text as `spans`, with bos and eos.

    It refuses, in check_messages' words, what `prepare --chat` refuses, except a conversation ending with a user
    turn: that is a prompt to generate from (check_messages' needs_answer=False), which `add_generation_prompt`
    requires. transformers itself refuses an empty conversation and messages that are not objects, and drops keys
    whose value is null, so through it a null content is reported as missing (other renderers pass the null on)."""
    q = json.dumps  # a Python string as a Jinja string literal
    content = "message['content']"
    return (
        "{%- set first_turn = 1 if messages[0]['role'] == 'system' else 0 %}"
        "{%- for message in messages %}"
        "{%- set expected = ['user', 'assistant'][(loop.index0 - first_turn) % 2] %}"
        "{%- if 'role' not in message %}" + _jinja_raise(NO_ROLE, i="loop.index0") +
        f"{{%- elif message['role'] not in {list(ROLES)} %}}"
        + _jinja_raise(UNKNOWN_ROLE, i="loop.index0", role="message['role'] | tojson") +
        "{%- elif 'content' not in message %}" + _jinja_raise(NO_CONTENT, i="loop.index0") +
        f"{{%- elif {content} is none %}}" + _jinja_raise(NULL_CONTENT, i="loop.index0") +
        f"{{%- elif {content} is not string and {content} is sequence and {content} is not mapping %}}"
        + _jinja_raise(LIST_CONTENT, i="loop.index0") +
        f"{{%- elif {content} is not string %}}"
        + _jinja_raise(OTHER_CONTENT, i="loop.index0", kind=f"'a boolean' if {content} is boolean else 'a number' "
                                                            f"if {content} is number else 'an object'") +
        "{%- elif message['role'] == 'system' and not loop.first %}"
        + _jinja_raise(SYSTEM_NOT_FIRST, i="loop.index0") +
        "{%- elif loop.index0 >= first_turn and message['role'] != expected %}"
        + _jinja_raise(OUT_OF_ORDER, i="loop.index0", role="message['role']", expected="expected") +
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if messages | length == first_turn %}" + _jinja_raise(NO_USER) +
        "{%- elif add_generation_prompt and messages[-1]['role'] != 'user' %}" + _jinja_raise(NO_QUESTION) +
        "{%- endif %}"
        "{%- set system = messages[0]['content'] if first_turn else none %}"
        "{{- bos_token }}"
        "{%- for message in messages[first_turn:] %}"
        "{%- if message['role'] == 'user' %}"
        f"{{{{- {q(INST_OPEN)} }}}}"
        f"{{%- if loop.first and system is not none %}}{{{{- system + {q(SYSTEM_SEPARATOR)} }}}}{{%- endif %}}"
        f"{{{{- message['content'] + {q(INST_CLOSE)} }}}}"
        "{%- else %}"
        f"{{{{- {q(ANSWER_PREFIX)} + message['content'] + eos_token }}}}"
        "{%- endif %}"
        "{%- endfor %}"
    )


def _jinja_raise(message: str, **fields: str) -> str:
    """A Jinja `raise_exception` of `message`, a str.format template whose fields are the Jinja expressions `fields`."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(message):
        parts += [json.dumps(literal)] if literal else []
        parts += [f"({fields[name]})"] if name is not None else []
    return f"{{{{- raise_exception({' ~ '.join(parts)}) }}}}"


# --------------------------------------------------------------------------------- self-reflection moderation

MODERATION_LABELS = ("acceptable", "problematic")


def moderation_messages(text: str) -> list[dict]:
    """The self-reflection prompt (after the Mistral 7B paper, section 5.2): the model judges a text itself."""
    return [{"role": "user", "content": (
        "You are a content moderator. Read the text below and answer with one word: acceptable if it is safe, "
        "respectful and harmless; problematic if it is harmful, unethical, prejudiced or hateful.\n\n"
        f"Text: {text}")}]


# --------------------------------------------------------------------------------- reading chat files


@dataclass
class SkippedLines:
    """The lines `--skip-bad` left out: every one counted, the first few kept as "file:line: why" to show."""

    count: int = 0
    first: list[str] = field(default_factory=list)
    SHOWN = 5

    def add(self, line: str) -> None:
        self.count += 1
        if len(self.first) < self.SHOWN:
            self.first.append(line)

    def listed(self) -> list[str]:
        """The first lines, then "and N more" for the rest."""
        more = self.count - len(self.first)
        return self.first + ([f"and {more:,} more"] if more else [])


def iter_conversations(path: str, skip_bad: bool, skipped: SkippedLines) -> Iterator[list[dict]]:
    """The conversations of a `.jsonl` file ({"messages": [...]} per line), read line by line. A malformed line
    raises one DataError naming the file and line, or with skip_bad is counted in `skipped` and left out."""
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise ChatFormatError(f"is not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}): re-encode "
                                          "it, e.g. `iconv -f latin1 -t utf-8`") from None
                except json.JSONDecodeError as e:
                    raise ChatFormatError(f"is not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or "messages" not in record:
                    raise ChatFormatError('has no "messages" field: each line of chat data is {"messages": [...]} '
                                          '(plain {"text": ...} lines are prepared without --chat)')
                messages = check_messages(record["messages"], needs_answer=True)
                for i, message in enumerate(messages):
                    surrogate = lone_surrogate(message["content"], raw)
                    if surrogate:
                        raise ChatFormatError(f'has a lone surrogate in messages[{i}]["content"] ({surrogate})')
            except ChatFormatError as e:
                if not skip_bad:
                    raise DataError(f"{path}:{line_number}: {e}: fix the line, or pass --skip-bad to skip and "
                                    "count such lines") from None
                skipped.add(f"{path}:{line_number}: {e}")
                continue
            yield messages
