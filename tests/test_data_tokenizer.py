"""Tokenizer specs: byte, hf:PATH, bpe training, and clear errors for anything needing the network."""
import importlib.util

import pytest

from pretrain.data.tokenizer import (ByteTokenizer, load_tokenizer, parse_bpe_spec, train_bpe)
from pretrain.errors import UserError

TEXTS = ["Hello, world!", "日本語のテキスト", "emoji 🎉🚀 and ünïcödé", "  spaces\tand\nnewlines  ", ""]


def test_byte_roundtrip():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (258, 256, 257)
    for t in TEXTS:
        ids = tok.encode(t)
        assert ids == list(t.encode("utf-8"))
        assert tok.decode(ids + [tok.eos_id]) == t
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    flat, lengths = tok.encode_arrays(TEXTS)
    assert lengths.tolist() == [len(t.encode()) for t in TEXTS] and flat.size == lengths.sum()


def test_bpe_train_and_hf_load(tmp_path):
    corpus = [f"the quick brown fox {i} jumps over the lazy dog. 日本語 🎉" for i in range(200)]
    path = tmp_path / "tokenizer.json"
    tok = train_bpe(iter(corpus), 400, str(path))
    assert tok.vocab_size <= 400 and tok.eos_id == 0 and tok.bos_id is None
    for spec in (f"hf:{path}", f"hf:{tmp_path}"):
        t2 = load_tokenizer(spec)
        assert t2.vocab_size == tok.vocab_size
        for t in TEXTS + corpus[:3]:
            ids = t2.encode(t)
            assert t2.decode(ids + [t2.eos_id]) == t
        assert t2.encode_batch(TEXTS) == [t2.encode(t) for t in TEXTS]
        flat, lengths = t2.encode_arrays(TEXTS)
        assert flat.tolist() == [i for t in TEXTS for i in t2.encode(t)]


def test_hf_name_needing_network_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="Nothing is downloaded.*hf:/path/to/tokenizer.json"):
        load_tokenizer("hf:gpt2")
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(f"hf:{tmp_path / 'd'}")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid"):
        load_tokenizer(f"hf:{tmp_path / 'junk.json'}")


def test_tiktoken_spec(tmp_path):
    f = tmp_path / "x.tiktoken"
    f.write_text("YQ== 0\nYg== 1\n")
    if importlib.util.find_spec("tiktoken") is None:
        with pytest.raises(UserError, match=r"pretrain\[tiktoken\]"):
            load_tokenizer(f"tiktoken:{f}")
    with pytest.raises(UserError, match="Nothing is downloaded"):
        load_tokenizer("tiktoken:cl100k_base")


@pytest.mark.parametrize("spec", ["", "gpt2", "sentencepiece:x", "bpe:abc", "bpe:10"])
def test_bad_specs(spec):
    with pytest.raises(UserError):
        if spec.startswith("bpe:"):
            parse_bpe_spec(spec)
        else:
            load_tokenizer(spec)


def test_bpe_spec_is_trained_by_prep():
    assert parse_bpe_spec("bpe:32000") == 32000
    assert parse_bpe_spec("byte") is None
    with pytest.raises(UserError, match="trained by pretrain-prep"):
        load_tokenizer("bpe:1000")
