"""Streaming text out of token ids: stop strings, held-back text, SentencePiece word boundaries."""

from grokserve.model.tokenizer import Tokenizer
from grokserve.serving.detokenize import TextStream
from grokserve.serving.loading import DEMO_CHECKPOINT, ByteTokenizer
from testkit.tokenizers import GROK_SPECIAL

BYTES = ByteTokenizer(256, GROK_SPECIAL)


def stream(tokenizer, text, stop=(), prefix=()):
    ids = tokenizer.encode(text)
    out = TextStream(tokenizer, stop, prefix=prefix)
    pieces = []
    for token in ids:
        pieces.append(out.push(token))
        if out.stopped:
            break
    pieces.append(out.flush())
    return pieces, out.stopped


def test_stop_string_split_across_tokens_is_never_emitted():
    pieces, stopped = stream(BYTES, "hello\n\nUser: more", stop=["\n\nUser:"])
    assert stopped and "".join(pieces) == "hello"
    assert all("\n" not in p for p in pieces), "a partial stop string was streamed"


def test_incomplete_utf8_is_held_back():
    pieces, _ = stream(BYTES, "a✓b")
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) == "a✓b"


def test_sentencepiece_keeps_the_space_of_the_first_new_word():
    tokenizer = Tokenizer(DEMO_CHECKPOINT / "tokenizer.model", GROK_SPECIAL)
    prompt = tokenizer.encode("Return the")
    generated = tokenizer.encode("Return the value of the object")[len(prompt) :]
    out = TextStream(tokenizer, prefix=prompt[-4:])
    text = "".join(out.push(token) for token in generated) + out.flush()
    assert text == " value of the object"


class CountingDecoder:
    """The tokenizer, noting the longest id list it was asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.longest = 0

    def decode(self, ids):
        self.longest = max(self.longest, len(ids))
        return self.tokenizer.decode(ids)


def test_a_long_stream_is_the_full_decode_decoding_only_recent_tokens():
    tokenizer = Tokenizer(DEMO_CHECKPOINT / "tokenizer.model", GROK_SPECIAL)
    words = "Return the héllo ✓ 日本語 value 🙂 of  the object, naïve café"
    ids = tokenizer.encode((words + "\n") * 60)
    split = [tokenizer.piece(i) for i in ids if tokenizer.piece(i).startswith("<0x")]
    assert len(split) > 500, "the text should have characters split into byte tokens"
    prompt, generated = ids[:7], ids[7:]
    decoder = CountingDecoder(tokenizer)
    out = TextStream(decoder, stop=["\nUser:"], prefix=prompt[-4:])
    pieces = [out.push(token) for token in generated] + [out.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)[len(tokenizer.decode(prompt)) :]
    assert all("\ufffd" not in piece for piece in pieces)
    assert decoder.longest <= 16, "each token should decode a short window, not the sequence"
