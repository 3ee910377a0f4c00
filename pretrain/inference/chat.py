"""Chat and self-reflection moderation with our own model in one process (inside parallel.single_process_group).

Both render conversations in the instruct format the model was fine-tuned on (data_pipeline.chat). A reply is
generated after the last `[/INST]` (pretrain.inference.generate); a moderation verdict is read from the logits: the
probability of each label's tokens and `</s>` after the self-reflection prompt, renormalized over the labels, with
nothing sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data_pipeline.chat import MODERATION_LABELS, check_messages, encode, moderation_messages
from data_pipeline.errors import DataError
from pretrain.inference.generate import generate
from pretrain.model.mistral import Mistral


@dataclass
class Reply:
    text: str
    prompt_ids: list[int]
    new_ids: list[int]
    at_max_seq_len: bool  # cut there, before </s> and max_new_tokens


def chat_reply(model: Mistral, tokenizer, messages: list[dict], max_new_tokens: int, *, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0) -> Reply:
    """The assistant's answer to a conversation that ends with a user message; it stops at </s>, after
    max_new_tokens, or at the model's max_seq_len (positions it was never trained at)."""
    prompt = encode(tokenizer, check_messages(messages, needs_answer=False)).tokens
    room = model.cfg.max_seq_len - len(prompt)
    if room <= 0:
        raise DataError(f"the conversation is {len(prompt)} tokens, which leaves no room for an answer within the "
                        f"model's max_seq_len {model.cfg.max_seq_len}: shorten the message or start a new chat")
    new = generate(model, prompt, min(max_new_tokens, room), temperature=temperature, top_p=top_p, seed=seed,
                   eos_id=tokenizer.eos_id, vocab_size=tokenizer.vocab_size)
    ended = bool(new) and new[-1] == tokenizer.eos_id
    answer = new[:-1] if ended else new
    return Reply(tokenizer.decode(answer), prompt, new, at_max_seq_len=not ended and len(new) == room < max_new_tokens)


@torch.no_grad()
def label_log_probs(model: Mistral, tokenizer, messages: list[dict], answers: tuple[str, ...]) -> list[float]:
    """log P(answer's tokens and its </s> | conversation) for each answer, teacher-forced in one forward pass each."""
    device = next(model.parameters()).device
    scores = []
    for answer in answers:
        encoded = encode(tokenizer, [*messages, {"role": "assistant", "content": answer}])
        if len(encoded.tokens) > model.cfg.max_seq_len:
            raise DataError(f"the prompt with the answer {answer!r} is {len(encoded.tokens)} tokens, past the "
                            f"model's max_seq_len {model.cfg.max_seq_len}: shorten the text to judge")
        tokens = torch.tensor([encoded.tokens], device=device)
        logits = model(tokens[:, :-1])[0, :, :tokenizer.vocab_size].float()  # (S, V)
        targets = torch.tensor(encoded.trained[1:], device=device)
        log_probs = torch.log_softmax(logits, dim=-1).gather(1, tokens[0, 1:, None])[:, 0]
        scores.append(float(log_probs[targets].sum()))
    return scores


def moderate(model: Mistral, tokenizer, text: str) -> dict:
    """{"label", "probability", "probabilities": {label: p}} for `text` under the self-reflection prompt."""
    scores = torch.tensor(label_log_probs(model, tokenizer, moderation_messages(text), MODERATION_LABELS))
    probabilities = torch.softmax(scores, dim=0).tolist()
    best = max(range(len(MODERATION_LABELS)), key=probabilities.__getitem__)
    return {"label": MODERATION_LABELS[best], "probability": probabilities[best],
            "probabilities": dict(zip(MODERATION_LABELS, probabilities, strict=True))}
