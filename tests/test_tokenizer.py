"""Tokenizer against Mistral's reference tokenizer and the streaming decoder against whole-string decode."""

import random

import pytest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

TEXTS = [
    "Hello, world!",
    " leading and trailing spaces ",
    "line one\nline two\n\n\ttabbed",
    "Emoji: 😀🦙🥷👍🏽 and CJK: 你好，世界。日本語のテキスト",
    "[INST] literal tags [/INST] </s> <s>",
    "",
]


@pytest.fixture(scope="module")
def reference():
    return MistralTokenizer.v1().instruct_tokenizer.tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_mistral_common(tokenizer, reference, text):
    assert tokenizer.encode(text) == reference.encode(text, bos=True, eos=False)
    assert tokenizer.eos_id == reference.eos_id == 2


@pytest.mark.parametrize("text", TEXTS)
def test_stream_of_real_text_joins_to_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    assert "".join(tokenizer.decode_stream(ids)) == tokenizer.decode(ids)


def test_stream_of_random_ids_joins_to_decode(tokenizer):
    rng = random.Random(0)
    byte_ids = list(range(3, 259))  # the <0xNN> byte-fallback pieces
    for _ in range(300):
        n = rng.randint(1, 40)
        ids = [rng.choice(byte_ids) if rng.random() < 0.3 else rng.randrange(tokenizer.vocab_size) for _ in range(n)]
        assert "".join(tokenizer.decode_stream(ids)) == tokenizer.decode(ids), ids


def test_stream_never_yields_half_a_character(tokenizer):
    ids = tokenizer.encode("a 🦙 b 🥷 c ꙮ 你好")
    assert any(tokenizer._sp.is_byte(i) for i in ids)  # the emoji really are split into byte tokens
    pieces = list(tokenizer.decode_stream(ids))
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_stream_yields_as_tokens_arrive(tokenizer):
    ids = tokenizer.encode("one two three four")
    seen, shown_at = [], []

    def feed():
        for i in ids:
            seen.append(i)
            yield i

    for piece in tokenizer.decode_stream(feed()):
        shown_at.append((len(seen), piece))
    # "two" was printed while tokens were still to come, and every piece before the end of the ids.
    assert any("two" in piece and n < len(ids) for n, piece in shown_at), shown_at
    assert len(shown_at) >= 3 and shown_at[0][0] < len(ids)
