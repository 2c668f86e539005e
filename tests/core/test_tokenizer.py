"""The byte-level tokenizer: round trips, specials, streaming and save/load beside a checkpoint."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mamba_ssm_core import ByteTokenizer


def test_bytes_are_their_own_ids():
    tok = ByteTokenizer()
    assert tok.vocab_size == 258
    assert tok.encode("A\n").tolist() == [65, 10]
    assert tok.encode("é").tolist() == [0xC3, 0xA9]
    assert tok.encode(b"\xff\x00").tolist() == [255, 0]
    assert tok.encode("").dtype == np.int32
    assert tok.encode("x", add_bos=True, add_eos=True).tolist() == [256, 120, 256]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 256, 257)


@given(st.text())
def test_round_trip_any_text(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_decode_specials_and_invalid_utf8():
    tok = ByteTokenizer()
    ids = [*tok.encode("ab"), 256, *tok.encode("c"), 257]
    assert tok.decode(ids) == "abc"
    assert tok.decode(ids, skip_special_tokens=False) == "ab<|endoftext|>c<|pad|>"
    # A lone continuation byte and a truncated character decode to U+FFFD.
    assert tok.decode([0x80, 0x41, 0xE2, 0x82]) == "\ufffdA\ufffd"
    with pytest.raises(ValueError, match="ids must lie in 0..257"):
        tok.decode([258])


@given(st.text(min_size=1), st.integers(1, 7))
def test_stream_decoder_matches_whole_decode(text, piece):
    tok = ByteTokenizer()
    ids = tok.encode(text).tolist()
    dec = tok.decoder()
    streamed = "".join(dec.feed(ids[i : i + piece]) for i in range(0, len(ids), piece))
    assert streamed + dec.flush() == text


def test_stream_decoder_holds_back_partial_characters():
    tok = ByteTokenizer()
    dec = tok.decoder()
    euro = tok.encode("€").tolist()  # three bytes
    assert dec.feed(euro[0]) == ""
    assert dec.feed(euro[1]) == ""
    assert dec.feed(euro[2]) == "€"


def test_save_and_load_beside_a_checkpoint(tmp_path):
    tok = ByteTokenizer(("<|endoftext|>", "<|pad|>", "<|sep|>"))
    assert not ByteTokenizer.saved_in(tmp_path)
    path = tok.save(tmp_path / "ckpt")
    assert path.name == "byte_tokenizer.json"
    assert ByteTokenizer.saved_in(tmp_path / "ckpt")
    back = ByteTokenizer.load(tmp_path / "ckpt")
    assert back == tok and back.vocab_size == 259
    assert json.loads(path.read_text())["special_tokens"]["<|sep|>"] == 258


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no byte_tokenizer.json"):
        ByteTokenizer.load(tmp_path)
    (tmp_path / "byte_tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ByteTokenizer.load(tmp_path)
    path = ByteTokenizer().save(tmp_path)
    spec = json.loads(path.read_text())
    spec["special_tokens"] = {"<|endoftext|>": 256, "<|pad|>": 300}
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="without gaps"):
        ByteTokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="distinct"):
        ByteTokenizer(("<a>", "<a>"))
