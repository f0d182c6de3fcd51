"""Property-based tests (hypothesis): the chat format against mistral-common, streaming decode
against a whole decode, the sampler's kept sets, and Chat driven through random sessions."""

import copy
import os

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import chat
import mixtral
from synthetic import TOKENIZER

# Derandomized: the same examples on every run, so CI cannot pass once and fail the next time.
# HUNT=50 python3 -m pytest tests/test_properties.py: 50x the examples, new ones each run.
HUNT = int(os.environ.get("HUNT", 0))
settings.register_profile("project", derandomize=not HUNT, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile("project")
examples = lambda n: n * max(HUNT, 1)

TOK = mixtral.Tokenizer(TOKENIZER)
REFERENCE = MistralTokenizer.v1()

# Text users type: any unicode, with whitespace, newlines and the format's own markers mixed in.
text = st.one_of(
    st.text(min_size=1, max_size=40),
    st.lists(
        st.sampled_from([" ", "\n", "\t", "\r\n", "a", "é", "😀", "你", "[INST]", "[/INST]", "</s>", "<s>"]),
        min_size=1,
        max_size=12,
    ).map("".join),
    st.just("word " * 300),
)


@st.composite
def conversations(draw):
    n = draw(st.integers(1, 5)) * 2 - 1  # ends with a user turn, as a request does
    turns = [("user" if i % 2 == 0 else "assistant", draw(text)) for i in range(n)]
    system = draw(st.one_of(st.none(), text))
    return ([("system", system)] if system is not None else []) + turns


@settings(max_examples=examples(60))
@given(conversations())
def test_encode_messages_equals_mistral_common(conv):
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    try:
        reference = REFERENCE.encode_chat_completion(
            ChatCompletionRequest(messages=[kinds[r](content=c) for r, c in conv])
        ).tokens
    except Exception:  # mistral-common refuses some requests (e.g. blank messages): nothing to compare
        assume(False)
    assert chat.encode_messages(TOK, [{"role": r, "content": c} for r, c in conv]) == reference


BYTE_TOKENS = st.integers(3, 258)  # <0x00>..<0xFF>: pieces of a character split over tokens


@settings(max_examples=examples(200))
@given(st.lists(st.one_of(BYTE_TOKENS, BYTE_TOKENS, st.integers(259, 31999)), min_size=1, max_size=40))
def test_decode_stream_joins_to_decode(ids):
    assert "".join(TOK.decode_stream(iter(ids))) == TOK.decode(ids)


probabilities = st.lists(st.floats(0.001, 1.0), min_size=2, max_size=12).map(lambda p: np.array(p) / np.sum(p))


def kept(logits, **kw):
    """The set of tokens sample() can return, from 400 draws."""
    mx.random.seed(0)
    draws = mixtral.sample(mx.broadcast_to(logits, (400, logits.shape[-1])), temp=1.0, **kw)
    return set(np.array(draws).tolist())


@settings(max_examples=examples(25))
@given(probabilities, st.floats(0.05, 0.95))
def test_top_p_keeps_the_smallest_set_reaching_p(p, top_p):
    order = np.argsort(-p, kind="stable")
    mass_before = np.cumsum(p[order]) - p[order]
    allowed = set(order[mass_before < top_p].tolist())
    got = kept(mx.log(mx.array(p, mx.float32))[None], top_p=top_p)
    assert got <= allowed and order[0] in got


@settings(max_examples=examples(25))
@given(probabilities, st.floats(0.05, 0.95))
def test_min_p_drops_tokens_below_a_share_of_the_top_one(p, min_p):
    allowed = set(np.nonzero(p >= min_p * p.max() * (1 - 1e-5))[0].tolist())
    assert kept(mx.log(mx.array(p, mx.float32))[None], min_p=min_p) <= allowed


@settings(max_examples=examples(25))
@given(st.lists(st.floats(-20, 20, width=32), min_size=2, max_size=50))
def test_temperature_zero_is_the_argmax(logits):
    assume(len(set(logits)) == len(logits))
    assert mixtral.sample(mx.array([logits])).item() == int(np.argmax(logits))


# --------------------------------------------------------------------------- Chat, driven at random


@pytest.fixture(scope="module")
def model(mlx_q8):
    return mixtral.load_model(mlx_q8, dtype=mx.float32)[0]


def test_chat_sessions_keep_the_cache_equal_to_a_fresh_prefill(model, tmp_path):
    probe = TOK.encode("[INST] probe [/INST]", bos=False)

    class ChatSession(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.chat = chat.Chat(model, TOK, max_tokens=6, temp=0.8, seed=1, max_context=256)

        @rule(message=st.sampled_from(["hi", "tell me more", "word " * 40, "😀 ok", "\n"]))
        def ask(self, message):
            "".join(self.chat.ask(message))

        @rule(message=st.sampled_from(["hi", "word " * 40]), checks=st.integers(0, 4))
        def ask_and_stop(self, message, checks):
            # Ctrl-C after `checks` looks at the flag: in the prefill (the message is dropped) or in the reply.
            looked = []
            "".join(self.chat.ask(message, should_stop=lambda: looked.append(1) or len(looked) > checks))

        @precondition(lambda self: self.chat.messages)
        @rule()
        def undo(self):
            self.chat.undo()

        @precondition(lambda self: self.chat.messages)
        @rule()
        def regen(self):
            "".join(self.chat.regen())

        @rule()
        def reset(self):
            self.chat.reset()

        @rule(persona=st.sampled_from(["", "Be brief.", "You are a pirate."]))
        def system(self, persona):
            self.chat.reset(persona)

        @rule()
        def save_and_resume(self):
            self.chat.save(tmp_path / "t.json", {})
            again = chat.Chat(model, TOK, max_tokens=6, temp=0.8, seed=1, max_context=256)
            again.load(tmp_path / "t.json")
            assert again.messages == self.chat.messages
            self.chat = again

        @invariant()
        def cache_is_the_conversation(self):
            c = self.chat
            ids = chat.encode_messages(TOK, c.conversation()) if c.messages else []
            assert c.tokens == ids and len({layer.offset for layer in c.cache}) == 1 and c.fed <= len(ids)
            assert len(ids) <= c.max_context
            live, _ = model(mx.array([ids[c.fed :] + probe]), [copy.copy(layer) for layer in c.cache])
            fresh, _ = model(mx.array([ids + probe]))
            np.testing.assert_allclose(np.array(live[0, -1]), np.array(fresh[0, -1]), atol=1e-4)

    ChatSession.TestCase.settings = settings(max_examples=examples(12), stateful_step_count=12)
    ChatSession.TestCase().runTest()
