"""The sentencepiece tokenizer: deterministic training, Mistral's special ids, byte fallback, split digits, and
loading a .model that this project did not train."""

import hashlib
import io
import json
import pickle

import pytest
import sentencepiece as spm

from data_pipeline.errors import DataError
from data_pipeline.tokenizer import MODEL_FILE, Tokenizer, train_tokenizer
from tests.data_helpers import make_tokenizer

UNUSUAL = [
    "emoji 🤖🧪, math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, CJK 中文字, RTL עברית",
    "zero\u200bwidth, combining e\u0301, NUL \x00 and bell \x07",
    "  leading and trailing whitespace\t\n\n  ",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_training_is_deterministic(trained, tmp_path):
    again = train_tokenizer([str(trained.parent / "corpus" / "train" / "*.jsonl")], tmp_path / "again",
                            vocab_size=1000)
    first = (trained / MODEL_FILE).read_bytes()
    assert (tmp_path / "again" / MODEL_FILE).read_bytes() == first
    assert again.sha256 == Tokenizer.load(trained).sha256 == hashlib.sha256(first).hexdigest()
    other = train_tokenizer([str(trained.parent / "corpus" / "train" / "*.jsonl")], tmp_path / "other",
                            vocab_size=1100)
    assert other.sha256 != again.sha256


def test_special_ids_match_mistral(trained):
    tok = Tokenizer.load(trained)
    assert tok.vocab_size == 1000
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, -1)
    assert [tok.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    ids = tok.encode("hello", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]


@pytest.mark.parametrize("text", UNUSUAL)
def test_byte_fallback_round_trips_unusual_unicode(trained, text):
    tok = Tokenizer.load(trained)
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_byte_fallback_uses_byte_pieces(trained):
    tok = Tokenizer.load(trained)
    pieces = [tok.id_to_piece(i) for i in tok.encode("🤖")]
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0xA4>", "<0x96>"]


def test_digits_are_split(trained):
    tok = Tokenizer.load(trained)
    pieces = [tok.id_to_piece(i) for i in tok.encode("in 2023 there were 1000000 tokens, 3.14159")]
    with_digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert with_digits and all(sum(c.isdigit() for c in p) == 1 for p in with_digits)
    assert "".join(with_digits) == "2023100000031415" + "9"


def test_loads_a_model_it_did_not_train(tmp_path):
    # A unigram model trained by sentencepiece directly, with other special ids and a pad piece: like loading
    # Mistral's own tokenizer.model, nothing about it comes from our trainer.
    model = io.BytesIO()
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, model_type="unigram",
                                   vocab_size=120, pad_id=3, minloglevel=2)
    path = tmp_path / "foreign.model"
    path.write_bytes(model.getvalue())
    reference = spm.SentencePieceProcessor(model_file=str(path))

    tok = Tokenizer.load(path)
    assert tok.sha256 == hashlib.sha256(model.getvalue()).hexdigest()
    assert (tok.vocab_size, tok.pad_id) == (120, 3)
    text = "the lazy fox 42"
    assert tok.encode(text) == reference.encode(text)
    assert tok.decode(tok.encode(text)) == reference.decode(reference.encode(text))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / MODEL_FILE).write_bytes(model.getvalue())
    assert Tokenizer.load(tmp_path / "dir").sha256 == tok.sha256


def test_pickles_for_worker_processes(trained):
    tok = Tokenizer.load(trained)
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.sha256 == tok.sha256
    assert copy.encode_batch(UNUSUAL) == [tok.encode(t) for t in UNUSUAL]


@pytest.fixture
def cjk_text(tmp_path):
    """A small text of 220 distinct CJK characters: its vocabulary needs 220 + 256 byte + 3 special pieces."""
    lines = ["".join(chr(0x4E00 + i + j) for j in range(20)) + " abc def" for i in range(0, 200, 2)]
    path = tmp_path / "cjk.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    return str(path)


def test_too_small_a_vocabulary_is_told_the_size_it_needs(cjk_text, tmp_path):
    with pytest.raises(DataError) as error:
        train_tokenizer([cjk_text], tmp_path / "small", vocab_size=300)
    message = str(error.value)
    assert "\n" not in message
    assert "--vocab-size 300 is smaller than the 484 pieces this text needs" in message
    assert message.endswith("pass --vocab-size 484 or more")
    # The advice holds: the size it names trains.
    assert train_tokenizer([cjk_text], tmp_path / "enough", vocab_size=484).vocab_size == 484


def test_too_large_a_vocabulary_is_told_the_most_it_can_have(cjk_text, tmp_path):
    with pytest.raises(DataError) as error:
        train_tokenizer([cjk_text], tmp_path / "large", vocab_size=5000)
    message = str(error.value)
    assert "--vocab-size 5000 is more pieces than this text yields: pass --vocab-size " in message
    most = int(message.split("pass --vocab-size ")[1].split()[0])
    assert train_tokenizer([cjk_text], tmp_path / "most", vocab_size=most).vocab_size == most
