"""Streaming text out of token ids: stop strings, held-back text, SentencePiece word boundaries."""

from grokserve.model.tokenizer import Tokenizer
from grokserve.serving.detokenize import TextStream
from grokserve.serving.loading import DEMO_CHECKPOINT, ByteTokenizer

BYTES = ByteTokenizer(256)


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
    tokenizer = Tokenizer(DEMO_CHECKPOINT / "tokenizer.model")
    prompt = tokenizer.encode("Return the")
    generated = tokenizer.encode("Return the value of the object")[len(prompt) :]
    out = TextStream(tokenizer, prefix=prompt[-4:])
    text = "".join(out.push(token) for token in generated) + out.flush()
    assert text == " value of the object"
