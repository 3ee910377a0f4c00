"""Instruction fine-tuning and guardrails: chat data with a loss mask, a fine-tune from imported weights in two
processes (dp=2), its exact resume, the export's chat template against transformers, chat and moderation.

The base model is a small random transformers Mistral brought in with `pretrain import` (a training run would cost
a process start); the fine-tune starts from it with train.init_from, as a fine-tune of a pretrained run does.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipeline.chat import GUARDRAIL_PROMPT, chat_template, encode
from data_pipeline.errors import DataError
from pretrain.config import ConfigError, check_paths, load_config
from tests.runs import QUICK, ROOT, losses, metrics, run_train
from tests.test_export import cli
from tests.test_training import TOLERANCE

SEQ_LEN = 128
STEPS, SAVED = 8, 4
FINE_TUNE = [*QUICK, f"train.steps={STEPS}", f"checkpoint.every_steps={SAVED}", "parallel.micro_batch=2",
             "optim.lr=3e-3", "optim.warmup_steps=2", f"train.eval_every={SAVED}", "train.eval_steps=2"]
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What does len do?"},
                {"role": "assistant", "content": "It returns the number of items."},
                {"role": "user", "content": "And abs?"},
                {"role": "assistant", "content": "The absolute value."}]


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_data) -> Path:
    return Path(next(o for o in tiny_data if o.startswith("data.tokenizer=")).split("=", 1)[1])


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from data_pipeline.tokenizer import Tokenizer

    return Tokenizer.load(tokenizer_dir)


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def stored_samples(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    from data_pipeline.loader import read_manifest, read_shard

    manifest = read_manifest(str(data_dir))
    n = manifest["sample_tokens"]
    samples = np.concatenate([read_shard(str(data_dir), s, 2 * n, manifest["dtype"]) for s in manifest["shards"]])
    return samples[:, :n], samples[:, n:]


# ------------------------------------------------------------------------------------------- data


def test_only_the_answers_and_their_eos_are_trained_on(tokenizer, tmp_path):
    from data_pipeline.loader import TokenLoader
    from data_pipeline.prepare import prepare_chat

    too_long = [CONVERSATION[1], {"role": "assistant", "content": "word " * 300}]
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]},
                                          {"messages": too_long}])
    manifest = prepare_chat([str(tmp_path / "chat.jsonl")], tokenizer, 64, tmp_path / "out", progress=False)
    assert manifest["loss_mask"] and manifest["documents"] == 3 and manifest["dropped_conversations"] == 1
    tokens, mask = stored_samples(tmp_path / "out")
    assert tokens.shape == (manifest["samples"], 65)
    first = encode(tokenizer, CONVERSATION)
    # The text of the trained tokens is exactly the answers, each ending with </s>.
    trained = [t for t, keep in zip(first.tokens, first.trained, strict=True) if keep]
    eos = tokenizer.eos_id
    assert [t for t in trained if t != eos] and trained.count(eos) == 2 and trained[-1] == eos
    answers = tokenizer.decode([t for t in trained if t != eos])
    assert answers.replace(" ", "") == "Itreturnsthenumberofitems.Theabsolutevalue."
    # Decoded (</s> is a control token, so it decodes to nothing; the span after it keeps its dummy-prefix space).
    rendered = tokenizer.decode(first.tokens)
    assert rendered == "[INST] Be brief.\n\nWhat does len do? [/INST] It returns the number of items." \
                       " [INST] And abs? [/INST] The absolute value.", rendered
    # Conversations are packed whole; the rest of a sample is </s> padding that is not trained on.
    flat_tokens, flat_mask = tokens.reshape(-1), mask.reshape(-1).astype(bool)
    assert flat_tokens[:len(first.tokens)].tolist() == first.tokens
    assert flat_mask[:len(first.tokens)].tolist() == first.trained
    assert manifest["trained_tokens"] == int(flat_mask.sum())
    # Each sample ends in its padding: untrained </s> after the last conversation's trained </s>.
    padded = 0
    for sample_tokens, sample_mask in zip(tokens, mask.astype(bool), strict=True):
        content = int(np.flatnonzero(sample_mask)[-1]) + 1
        assert (sample_tokens[content:] == eos).all() and not sample_mask[content:].any()
        padded += len(sample_tokens) - content
    assert padded == manifest["padding_tokens"] > 0
    # The loader hands the mask on beside the tokens.
    with iter(TokenLoader([(str(tmp_path / "out"), 1.0)], micro_batch=1)) as batches:
        batch = next(batches)
    assert batch["loss_mask"].dtype == torch.bool and batch["loss_mask"].shape == batch["tokens"].shape


def test_malformed_lines_stop_with_their_line_or_are_skipped_and_counted(tokenizer_dir, tmp_path):
    good = {"messages": CONVERSATION[1:3]}
    bad = ["{not json", {"messages": [CONVERSATION[2], CONVERSATION[1]]}, {"messages": CONVERSATION[1:2]},
           {"text": "plain"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [good, *bad, good])
    args = ("data", "prepare", "--chat", "--input", path, "--tokenizer", tokenizer_dir, "--seq-len", 32)
    code, _, err = cli(*args, "--out", tmp_path / "strict")
    assert code == 2 and err.count("\n") == 1
    assert f"{path}:2: is not valid JSON" in err and "--skip-bad" in err
    assert not (tmp_path / "strict" / "manifest.json").exists()
    code, out, err = cli(*args, "--out", tmp_path / "lenient", "--skip-bad")
    assert code == 0, err
    manifest = json.loads((tmp_path / "lenient" / "manifest.json").read_text())
    assert manifest["documents"] == 2 and manifest["bad_lines"] == 4
    assert f"skipped 4 bad lines:\n  {path}:2: is not valid JSON" in out
    assert f"  {path}:3: roles out of order" in out and f"  {path}:4: no assistant turn" in out
    assert "2 conversations (4 bad lines skipped)" in out


def test_skip_bad_counts_every_line_and_lists_the_first_five(tokenizer_dir, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION[1:3]}, *["{not json"] * 8])
    code, out, err = cli("data", "prepare", "--chat", "--input", path, "--tokenizer", tokenizer_dir, "--seq-len", 32,
                         "--out", tmp_path / "out", "--skip-bad")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    listed = [f"{path}:{line}: is not valid JSON (Expecting property name enclosed in double quotes)"
              for line in range(2, 7)] + ["and 3 more"]
    assert manifest["bad_lines"] == 8 and manifest["bad_line_examples"] == listed
    assert "skipped 8 bad lines:\n" + "".join(f"  {line}\n" for line in listed) in out
    assert "1 conversation (8 bad lines skipped)" in out and "0 conversations longer than" in out


def test_conversations_are_read_line_by_line(tmp_path):
    from data_pipeline.chat import SkippedLines, iter_conversations

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, "{not json"])
    conversations = iter_conversations(str(path), False, SkippedLines())
    assert next(conversations) == CONVERSATION  # before the bad line is read
    with pytest.raises(DataError, match=f"{path}:2: is not valid JSON"):
        next(conversations)


def test_each_malformed_conversation_gets_its_own_problem_and_fix():
    from data_pipeline.chat import ChatFormatError, check_messages

    system, user, assistant = CONVERSATION[:3]
    for messages, message in [
        ([assistant, user], 'roles out of order: messages[0] is "assistant", expected "user" (after an optional system '
                            'message, turns alternate user, assistant, user, ...)'),
        ([system, assistant], 'roles out of order: messages[1] is "assistant", expected "user"'),
        ([user, system, assistant], 'roles out of order: messages[1] is "system", but a system message may only come '
                                    'first'),
        ([system], "the conversation has no user message: give one after the optional system message"),
        ([{"content": "Hi"}, assistant], 'messages[0] has no "role": give it "role": "system", "user" or "assistant"'),
        ([user, {"role": "tool", "content": "42"}], 'messages[1] has role "tool", which this format does not have: use '
                                                    '"system", "user" or "assistant"'),
        ([{"role": "user"}, assistant], 'messages[0] has no "content": give its text as "content": "..."'),
        ([{"role": "user", "content": 42}, assistant], 'messages[0] has a number as "content", not text: write it as '
                                                       'a JSON string (quoted)'),
        ([{"role": "user", "content": None}, assistant], 'messages[0] has "content": null: give its text as a string '
                                                         '("" for an empty message)'),
        ([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}, assistant],
         'messages[0] has a list as "content": this format takes plain text, so join the text parts into one string'),
    ]:
        with pytest.raises(ChatFormatError) as error:
            check_messages(messages, needs_answer=True)
        assert str(error.value).startswith(message), (messages, str(error.value))


def test_inspect_show_special_marks_the_trained_tokens(tokenizer, tmp_path):
    import ast

    from data_pipeline.prepare import prepare_chat

    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    prepare_chat([str(tmp_path / "chat.jsonl")], tokenizer, 64, tmp_path / "out", progress=False)
    code, out, err = cli("data", "inspect", tmp_path / "out", "--show-special", "--samples", 1, "--chars", 1000)
    assert code == 0, err
    assert "(<s> and </s> written out, the trained tokens between ⟦ and ⟧)" in out
    shown = ast.literal_eval(out.split("sample 0    ")[1].split("\n")[0])
    conversation = ("<s>[INST] Be brief.\n\nWhat does len do? [/INST]⟦ It returns the number of items.</s>⟧ [INST] "
                    "And abs? [/INST]⟦ The absolute value.</s>⟧")
    padding = 65 - len(encode(tokenizer, CONVERSATION).tokens)
    assert shown == conversation + "</s>" * padding
    # Without --show-special, the decoded text as before.
    code, out, _ = cli("data", "inspect", tmp_path / "out", "--samples", 1, "--chars", 1000)
    assert ast.literal_eval(out.split("sample 0    ")[1].split("\n")[0]) == tokenizer.decode(
        encode(tokenizer, CONVERSATION).tokens)


def test_masked_and_unmasked_data_do_not_mix(tiny_data, tokenizer, tmp_path):
    from data_pipeline.loader import TokenLoader, build_loader
    from data_pipeline.prepare import prepare_chat

    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    prepare_chat([str(tmp_path / "chat.jsonl")], tokenizer, SEQ_LEN, tmp_path / "chat", progress=False)
    text = next(o for o in tiny_data if o.startswith("data.eval=")).split("=", 1)[1]
    with pytest.raises(DataError, match="carries a loss mask .* does not: train on chat data and plain text"):
        TokenLoader([(str(tmp_path / "chat"), 1.0), (text, 1.0)], micro_batch=1)
    cfg = load_config(ROOT / "configs" / "tiny-instruct.yaml", [*tiny_data, f"data.train=[{{path: {text}}}]"])
    with pytest.raises(DataError, match=r"carries no loss mask, data.loss_mask is true: prepare the data with "
                                        r"`pretrain data prepare --chat`"):
        build_loader(cfg.data, dp_rank=0, dp_size=1, micro_batch=1)
    with pytest.raises(ConfigError, match="model.document_masking=true with data.loss_mask=true"):
        load_config(ROOT / "configs" / "tiny-instruct.yaml", ["model.document_masking=true"])
    with pytest.raises(ConfigError, match="train.init_from=nowhere is not a directory"):
        check_paths(load_config(ROOT / "configs" / "tiny-instruct.yaml", [*tiny_data, "train.init_from=nowhere"]),
                    need_data=False)


def test_a_batch_without_answers_gives_zero_loss_and_gradient(single_process_group):
    from pretrain.config import ModelConfig
    from pretrain.model.mistral import IGNORE_INDEX, Mistral

    model = Mistral(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64,
                                vocab_size=64, max_seq_len=16, sliding_window=None))
    tokens = torch.randint(0, 64, (2, 9))
    labels = tokens[:, 1:].clone()
    labels[0, :5] = IGNORE_INDEX
    reference = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="sum")
    assert torch.allclose(model(tokens[:, :-1], labels), reference / 11, rtol=1e-6)
    assert torch.allclose(model(tokens[:, :-1], labels, loss_divisor=4.0), reference / 4, rtol=1e-6)
    for divisor in (None, 4.0):
        loss = model(tokens[:, :-1], torch.full_like(labels, IGNORE_INDEX), loss_divisor=divisor)
        loss.backward()
        assert loss.item() == 0.0
        assert all(p.grad is not None and torch.isfinite(p.grad).all() and not p.grad.any()
                   for p in model.parameters())
        model.zero_grad()


# ------------------------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def instruct(tiny_data, tokenizer_dir, tmp_path_factory):
    """The built-in instruction set as chat shards, a random imported base model, and the fine-tune of it (dp=2):
    (data overrides, base run directory, fine-tuned run directory)."""
    from data_pipeline.corpus import write_builtin_instruct
    from data_pipeline.prepare import prepare_chat

    root = tmp_path_factory.mktemp("instruct")
    write_builtin_instruct(root / "corpus", max_mb=0.2)
    for split in ("train", "eval"):
        prepare_chat([str(root / "corpus" / split / "instruct.jsonl")], tokenizer_dir, SEQ_LEN, root / split,
                     progress=False)
    data = [f"data.train=[{{path: {root / 'train'}}}]", f"data.eval={root / 'eval'}", f"data.tokenizer={tokenizer_dir}",
            f"data.seq_len={SEQ_LEN}"]
    code, _, err = cli("import", random_model(root / "hf", tokenizer_dir), *data, "--config",
                       ROOT / "configs" / "tiny-instruct.yaml", "--out", root / "base")
    assert code == 0, err
    tuned = fine_tune(root, data, "tuned")
    return data, root / "base", tuned


def random_model(out: Path, tokenizer_dir: Path) -> Path:
    """A small random transformers Mistral of max_seq_len SEQ_LEN with the tokenizer, saved in `out`."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=32, max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2))
    hf.save_pretrained(out)
    shutil.copyfile(tokenizer_dir / "tokenizer.model", out / "tokenizer.model")
    return out


def fine_tune(root: Path, data: list[str], run: str, overrides: list[str] = (), args: list[str] = ()) -> Path:
    """The imported model's config (configs/tiny-instruct.yaml's settings) fine-tuned in two processes from its
    weights (or what `args` say)."""
    result = run_train(root / run, data, [*FINE_TUNE, f"train.init_from={root / 'base'}", *overrides], nproc=2,
                       args=list(args), config=root / "base" / "config.yaml")
    assert result.returncode == 0, result.stderr[-4000:]
    return root / run


def test_fine_tune_in_two_processes_lowers_the_masked_loss(instruct):
    _, base, tuned = instruct
    got = losses(tuned)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[STEPS] < got[1] - 0.5, got
    evals = {r["step"]: r["loss"] for r in metrics(tuned) if r["kind"] == "eval"}
    assert sorted(evals) == [SAVED, STEPS] and evals[STEPS] < evals[SAVED]
    config = load_config(tuned / "config.yaml")
    assert config.data.loss_mask and config.train.init_from == str(base)


def test_fine_tune_resumes_bit_exact_in_the_middle(instruct):
    data, base, tuned = instruct
    root = base.parent
    resumed = fine_tune(root, data, "resumed", args=["--resume-from", str(tuned / "checkpoints" / f"step_{SAVED:08d}")])
    got, expected = losses(resumed), losses(tuned)
    assert sorted(got) == list(range(SAVED + 1, STEPS + 1))
    assert all(got[step] == expected[step] for step in got), (got, expected)
    evals = [{r["step"]: r["loss"] for r in metrics(run) if r["kind"] == "eval"}[STEPS] for run in (resumed, tuned)]
    assert evals[0] == evals[1]


@pytest.fixture(scope="module")
def tuned_export(instruct) -> Path:
    _, _, tuned = instruct
    out = tuned.parent / "hf-tuned"
    code, _, err = cli("export", tuned, "--out", out)
    assert code == 0, err
    return out


def test_pipeline_layout_gives_the_same_masked_loss(instruct):
    """pp=2 with dp=1 runs each global batch as 4 micro-batches on one replica instead of 2 on each of 2: the loss is
    the mean over the global batch's trained tokens either way (TOLERANCE as in tests/test_training.py)."""
    data, base, tuned = instruct
    piped = fine_tune(base.parent, data, "pp2", ["parallel.pp=2"])
    for kind in ("train", "eval"):
        got, expected = ({r["step"]: r["loss"] for r in metrics(run) if r["kind"] == kind} for run in (piped, tuned))
        assert sorted(got) == sorted(expected)
        assert all(abs(got[step] - expected[step]) <= TOLERANCE * expected[step] for step in got), (got, expected)


def test_init_from_a_trained_run_takes_its_weights_not_its_optimizer_schedule_or_data_position(instruct):
    data, base, tuned = instruct
    again = fine_tune(base.parent, data, "again", ["train.steps=1"], ["--init-from", str(tuned)])
    first, tuned_first = (next(r for r in metrics(run) if r["kind"] == "train") for run in (again, tuned))
    # Step 1 of a fresh schedule on the first batch of a fresh data order, with the tuned weights: the loss is the
    # tuned model's, lower than the base's on the same batch.
    assert first["step"] == 1 and first["lr"] == tuned_first["lr"] and first["tokens"] == tuned_first["tokens"]
    assert first["loss"] < tuned_first["loss"] - 0.5


def test_chat_template_of_the_export_gives_the_trained_tokens(instruct, tuned_export, tokenizer):
    from transformers import AutoTokenizer

    _, base, _ = instruct
    theirs = AutoTokenizer.from_pretrained(tuned_export)
    assert theirs.chat_template == chat_template()
    conversations = [json.loads(line)["messages"]
                     for line in (base.parent / "corpus" / "eval" / "instruct.jsonl").read_text().splitlines()]
    conversations += [CONVERSATION, CONVERSATION[:4], CONVERSATION[1:2],
                      [{"role": "system", "content": GUARDRAIL_PROMPT}, {"role": "user", "content": " two  spaces\n"},
                       {"role": "assistant", "content": "\n\tindented"}, {"role": "user", "content": "ünï 🙂"}]]
    assert len(conversations) > 50
    for messages in conversations:
        assert theirs.apply_chat_template(messages, return_dict=False) == encode(tokenizer, messages).tokens, messages
    assert "apply_chat_template" in (tuned_export / "README.md").read_text()


def test_chat_generate_and_moderate_on_the_fine_tuned_model(instruct, tuned_export, tokenizer):
    from transformers import AutoModelForCausalLM

    from data_pipeline.chat import moderation_messages

    _, _, tuned = instruct
    question = "Explain what this function of the Python module os does:\ndef makedirs(name, mode=511)"
    # The guardrail conversation is 118 tokens: with 8 new ones it stays within max_seq_len (SEQ_LEN), as chat requires.
    code, out, err = cli("chat", tuned, "--message", question, "--guardrails", "--greedy", "--max-new-tokens", 12,
                         "--json")
    assert code == 0, err
    turn = json.loads(out)
    assert turn["messages"][:2] == [{"role": "system", "content": GUARDRAIL_PROMPT},
                                    {"role": "user", "content": question}]
    assert turn["messages"][2] == {"role": "assistant", "content": turn["reply"]}
    assert turn["prompt_ids"] == encode(tokenizer, turn["messages"][:2]).tokens and 1 <= len(turn["new_ids"]) <= 8
    # Without a system prompt the chat prompt is the rendered text itself: `pretrain generate` on it (greedy, from
    # the export) continues with the same tokens.
    code, out, err = cli("chat", tuned, "--message", question, "--greedy", "--max-new-tokens", 8, "--json")
    assert code == 0, err
    plain = json.loads(out)
    code, out, err = cli("generate", tuned_export, "--prompt", f"[INST] {question} [/INST]", "--greedy",
                         "--max-new-tokens", 8, "--json")
    assert code == 0, err
    assert json.loads(out)["prompt_ids"] == plain["prompt_ids"] and json.loads(out)["new_ids"] == plain["new_ids"]

    texts = ["Return the sum of two numbers.", "You are all worthless."]
    code, out, err = cli("moderate", tuned, "--text", *texts, "--json")
    assert code == 0, err
    verdicts = [json.loads(line) for line in out.splitlines()]
    assert [v["text"] for v in verdicts] == texts
    # The probabilities are transformers' own: each label's tokens and </s> teacher-forced after the self-reflection
    # prompt, renormalized over the two labels.
    hf = AutoModelForCausalLM.from_pretrained(tuned_export)
    for text, verdict in zip(texts, verdicts, strict=True):
        scores = {}
        for label in ("acceptable", "problematic"):
            encoded = encode(tokenizer, [*moderation_messages(text), {"role": "assistant", "content": label}])
            tokens = torch.tensor([encoded.tokens])
            with torch.no_grad():
                log_probs = torch.log_softmax(hf(tokens[:, :-1]).logits[0].float(), dim=-1)
            picked = log_probs.gather(1, tokens[0, 1:, None])[:, 0]
            scores[label] = picked[torch.tensor(encoded.trained[1:])].sum()
        expected = torch.softmax(torch.stack(list(scores.values())), dim=0).tolist()
        got = [verdict["probabilities"][label] for label in scores]
        assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-4, (got, expected)
        assert verdict["label"] == max(verdict["probabilities"], key=verdict["probabilities"].get)
        assert verdict["probability"] == max(got)
    code, _, err = cli("moderate", tuned)
    assert code == 2 and "--text TEXT" in err


# ------------------------------------------------------------------------------------------- a random model's export


@pytest.fixture(scope="module")
def random_export(tokenizer_dir, tmp_path_factory) -> Path:
    """random_model imported and exported as a user would: a transformers directory whose tokenizer carries the chat
    template."""
    root = tmp_path_factory.mktemp("random")
    code, _, err = cli("import", random_model(root / "hf", tokenizer_dir), "--out", root / "run")
    assert code == 0, err
    code, _, err = cli("export", root / "run", "--out", root / "export")
    assert code == 0, err
    return root / "export"


def test_chat_template_refuses_what_prepare_refuses_in_the_same_words(random_export, tokenizer):
    from jinja2 import TemplateError
    from transformers import AutoTokenizer

    from data_pipeline.chat import NO_CONTENT, ChatFormatError, check_messages

    theirs = AutoTokenizer.from_pretrained(random_export)
    system, user, assistant = CONVERSATION[:3]
    refused = [[user, {"role": "tool", "content": "42"}], [user, assistant, system, user], [system], [user, user],
               [assistant, user], [system, assistant], [{"content": "Hi"}], [{"role": "user"}],
               [{"role": "user", "content": 42}], [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]]
    for messages in refused:
        with pytest.raises(ChatFormatError) as ours:
            check_messages(messages, needs_answer=False)
        with pytest.raises(TemplateError) as error:
            theirs.apply_chat_template(messages, return_dict=False)
        assert str(error.value) == str(ours.value), messages
    # transformers drops the keys whose value is null, so the template sees a null content as none.
    with pytest.raises(TemplateError) as error:
        theirs.apply_chat_template([{"role": "user", "content": None}], return_dict=False)
    assert str(error.value) == NO_CONTENT.format(i=0)
    # A conversation ending with a user turn is a prompt to answer, which add_generation_prompt requires.
    with pytest.raises(ChatFormatError) as ours:
        check_messages([user, assistant], needs_answer=False)
    with pytest.raises(TemplateError) as error:
        theirs.apply_chat_template([user, assistant], add_generation_prompt=True, return_dict=False)
    assert str(error.value) == str(ours.value)
    for messages in ([user], CONVERSATION[:4]):
        prompt = theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert prompt == encode(tokenizer, messages).tokens
    assert theirs.apply_chat_template(CONVERSATION, return_dict=False) == encode(tokenizer, CONVERSATION).tokens


def test_chat_and_moderate_refuse_prompts_longer_than_max_seq_len(random_export):
    long_message = "word " * SEQ_LEN
    code, _, err = cli("chat", random_export, "--message", long_message, "--greedy", "--max-new-tokens", 4)
    assert code == 2 and err.count("\n") == 1, err
    assert f"leaves no room for an answer within the model's max_seq_len {SEQ_LEN}: shorten the message" in err
    code, out, err = cli("chat", random_export, "--message", "Hi", "--greedy", "--max-new-tokens", 2 * SEQ_LEN,
                         "--json")
    assert code == 0, err
    reply = json.loads(out)
    assert len(reply["prompt_ids"]) + len(reply["new_ids"]) <= SEQ_LEN  # the answer stops at max_seq_len
    if reply["new_ids"][-1] != 2:  # </s> (id 2) did not come first
        assert f"cut at the model's max_seq_len, {SEQ_LEN} tokens" in err
    code, _, err = cli("moderate", random_export, "--text", "Fine.", long_message)
    assert code == 2 and err.count("\n") == 1, err
    assert f"past the model's max_seq_len {SEQ_LEN}: shorten the text to judge" in err


def test_chat_moderate_and_data_options_have_help_with_their_defaults():
    import argparse

    from launch.cli import build_parser

    def actions(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    commands = actions(build_parser())
    parsers = [commands[name] for name in ("chat", "moderate", "generate", "eval")]
    parsers += [*actions(commands["data"]).values(), *actions(commands["tokenizer"]).values()]
    for parser in parsers:
        assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]
    shown = " ".join(commands["chat"].format_help().split())
    assert "or at </s> (default 64)" in shown and "unused with --greedy (default 0)" in shown
