"""ByteTokenizer and StreamDecoder: lossless bytes, and streaming that never splits a character.

What is proven here
-------------------
* encode/decode round-trips any Unicode text (hypothesis over all of Unicode, surrogates excluded
  since UTF-8 cannot encode them), and the ids are exactly the UTF-8 bytes.
* StreamDecoder fed one byte at a time emits text that concatenates (with flush) to the decoded
  text, for valid UTF-8 and for arbitrary bytes (invalid sequences become U+FFFD exactly as a
  one-shot decode does), and it never emits half a character: every emitted piece is whole.
* Ids that are not bytes (256, -1, 3.7, True) are an InvalidInputError naming the id, not a silent
  truncation (int(3.7) == 3) or a bare ValueError.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minikv.errors import InvalidInputError
from minikv.tokenizer import ByteTokenizer, StreamDecoder, tokenizer_for

tok = ByteTokenizer()
unicode_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(text=unicode_text)
def test_round_trip_for_any_unicode_text(text):
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids, dtype=np.int64)) == text  # NumPy ids, as generate() produces


def stream(ids) -> list[str]:
    decoder = tok.stream_decoder()
    assert isinstance(decoder, StreamDecoder)
    return [decoder.feed(i) for i in ids] + [decoder.flush()]


@settings(max_examples=200, deadline=None)
@given(text=unicode_text)
def test_stream_decoding_byte_by_byte_concatenates_to_the_text(text):
    pieces = stream(tok.encode(text))
    assert "".join(pieces) == text
    # Never half a character: each piece is itself whole text (no replacement character appears).
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=40))
def test_stream_decoding_of_arbitrary_bytes_equals_one_shot_decoding(data):
    assert "".join(stream(list(data))) == data.decode("utf-8", errors="replace") == tok.decode(list(data))


def test_a_multibyte_character_is_held_back_until_complete():
    ids = tok.encode("é€😀")   # 2, 3 and 4 bytes
    assert stream(ids) == ["", "é", "", "", "€", "", "", "", "😀", ""]


def test_flush_emits_an_incomplete_tail_as_a_replacement():
    decoder = tok.stream_decoder()
    assert decoder.feed(0xE2) == "" and decoder.feed(0x82) == ""
    assert decoder.flush() == "\ufffd"


@pytest.mark.parametrize("bad", [256, -1, 1000, 3.7, "a", True, None])
def test_ids_that_are_not_bytes_are_refused(bad):
    with pytest.raises(InvalidInputError, match="token id"):
        tok.decode([65, bad])
    with pytest.raises(InvalidInputError, match="token id"):
        tok.stream_decoder().feed(bad)


def test_numpy_integer_ids_are_accepted():
    assert tok.decode([np.int64(72), np.uint8(105)]) == "Hi"
    assert tok.stream_decoder().feed(np.int32(65)) == "A"


def test_tokenizer_for_a_folder_without_tokenizer_json(tmp_path):
    assert isinstance(tokenizer_for(tmp_path, 256), ByteTokenizer)
    assert tokenizer_for(tmp_path, 97) is None   # no way to turn text into ids: generate() needs ids
