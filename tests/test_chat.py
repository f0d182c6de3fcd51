"""chat.py: the Mixtral-Instruct format against mistral-common, the conversation and its cache
against a fresh prefill, the program piped and on a terminal, bad input and signals, and the soak run."""

import contextlib
import copy
import fcntl
import json
import os
import pty
import resource
import select
import shutil
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

import chat
import mixtral
import sessions
from conftest import ROOT, assert_one_line_error, default_signals, examples, popen_script, run_script
from synthetic import TOKENIZER

# --------------------------------------------------------------------------- the format, the conversation, the program


MENNY = chat.DEFAULT_SYSTEM_PROMPT


CONVERSATIONS = [
    [("user", "Hi!")],
    [("system", MENNY), ("user", "Hi!")],
    [("system", MENNY), ("user", "What is 2+2?"), ("assistant", "Ugh. Four."), ("user", "And 3+3?")],
    [("user", "one"), ("assistant", "two"), ("user", "three"), ("assistant", "four"), ("user", "five")],
    [
        ("system", "Be brief.\nVery brief."),
        ("user", "😀 emoji 🦙 and CJK 你好，世界"),
        ("assistant", "🥷 ok"),
        ("user", "日本語"),
    ],
    [("user", "I type [INST] and [/INST] and </s> and <s> literally")],
    [
        ("system", MENNY),
        ("user", "  leading and trailing spaces  "),
        ("assistant", " spaced reply "),
        ("user", "\nnewlines\n\n"),
    ],
    [("user", "tabs\tand\r\nwindows lines"), ("assistant", "[INST] fake [/INST]"), ("user", "ok")],
    [("system", "  persona with spaces  "), ("user", "x")],
]


def as_dicts(conv):
    return [{"role": r, "content": c} for r, c in conv]


REFERENCE = MistralTokenizer.v1()


def reference_ids(conv):
    """mistral-common's token ids for [(role, content), ...]: the format's independent reference."""
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    return REFERENCE.encode_chat_completion(
        ChatCompletionRequest(messages=[kinds[r](content=c) for r, c in conv])
    ).tokens


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_encode_messages_matches_mistral_common(tokenizer, conv):
    assert chat.encode_messages(tokenizer, as_dicts(conv)) == reference_ids(conv)


def test_roles_out_of_order_are_an_error(tokenizer):
    with pytest.raises(mixtral.MixtralError, match="expected role 'assistant'"):
        chat.encode_messages(tokenizer, as_dicts([("user", "a"), ("user", "b")]))


@pytest.fixture(scope="module")
def model(mlx_q8):
    return mixtral.load_model(mlx_q8)[0]


def new_chat(model, tokenizer, **kw):
    return chat.Chat(model, tokenizer, **{"max_tokens": 12, "temp": 0.8, "seed": 3, **kw})


def probe_logits(model, tokens_or_cache, probe):
    """Logits of `probe` fed after a cache (copied, so the chat's own is untouched) or after a fresh prefill."""
    if isinstance(tokens_or_cache, list) and isinstance(tokens_or_cache[0], int):
        logits, _ = model(mx.array([tokens_or_cache + probe]))
    else:
        logits, _ = model(mx.array([probe]), [copy.copy(c) for c in tokens_or_cache])
    return np.array(logits[0, -1])


def assert_cache_is_conversation(model, tokenizer, c, unfed_at_most=1):
    """The live cache, then the tokens not fed to it yet, equal a fresh prefill of encode_messages(the
    whole conversation). After a reply only its closing EOS may wait (when the reply was cut short)."""
    ids = chat.encode_messages(tokenizer, c.conversation())
    assert c.tokens == ids and len({layer.offset for layer in c.cache}) == 1
    assert len(ids) - unfed_at_most <= c.fed <= len(ids)
    probe = tokenizer.encode("[INST] probe [/INST]", bos=False)
    np.testing.assert_allclose(
        probe_logits(model, c.cache, ids[c.fed :] + probe), probe_logits(model, ids, probe), atol=1e-3
    )


class CountingModel:
    """The real model, recording how many tokens each call feeds."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, tokens, cache=None):
        self.calls.append(tokens.shape[1])
        return self.model(tokens, cache)

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_each_turn_prefills_only_its_new_block_and_the_cache_equals_a_fresh_prefill(model, tokenizer):
    counting = CountingModel(model)
    c = new_chat(counting, tokenizer)
    for turn, text in enumerate(["Hi Menny.", "What's up?", "Tell me about the weather.", "Bye."]):
        before, fed = list(c.tokens), c.fed
        counting.calls.clear()
        "".join(c.ask(text))
        block = chat.user_block(tokenizer, text, MENNY if turn == 0 else "")
        block = [tokenizer.bos_id] + block if turn == 0 else block
        assert c.tokens[: len(before)] == before
        # Every token goes through the model once: what the cache lacked (a cut-off reply's EOS) and
        # the new block in one call but for its last token (its logits pick the first word), then
        # each reply token and the EOS, one at a time.
        assert counting.calls[0] == len(before) - fed + len(block) - 1 and set(counting.calls[1:]) == {1}
        assert sum(counting.calls) == c.fed - fed
        assert_cache_is_conversation(model, tokenizer, c)


def test_reply_keeps_generated_ids_and_the_printed_text_is_their_decode(model, tokenizer):
    c = new_chat(model, tokenizer)
    printed = "".join(c.ask("Say something."))
    reply = c.messages[-1]
    assert printed == tokenizer.decode(reply["tokens"]) == reply["content"]
    assert c.tokens[-len(reply["tokens"]) - 1 :] == reply["tokens"] + [tokenizer.eos_id]


def test_undo_trims_the_cache_to_the_remaining_conversation(model, tokenizer):
    c = new_chat(model, tokenizer)
    for text in ("one", "two", "three"):
        "".join(c.ask(text))
    c.undo()
    assert [m["content"] for m in c.messages if m["role"] == "user"] == ["one", "two"]
    assert_cache_is_conversation(model, tokenizer, c)
    c.undo()
    c.undo()
    assert c.messages == [] and c.tokens == []
    "".join(c.ask("again"))
    assert_cache_is_conversation(model, tokenizer, c)


def test_regen_replaces_the_last_reply_and_keeps_the_cache_exact(model, tokenizer):
    c = new_chat(model, tokenizer, temp=1.0)
    "".join(c.ask("one"))
    "".join(c.ask("two"))
    first = c.messages[-1]["tokens"]
    "".join(c.regen())
    assert len(c.messages) == 4 and c.messages[-2]["content"] == "two"
    assert c.messages[-1]["tokens"] != first
    assert_cache_is_conversation(model, tokenizer, c)


def test_stopping_mid_reply_keeps_the_partial_reply_closed_with_eos(model, tokenizer):
    c = new_chat(model, tokenizer, max_tokens=50, temp=0.0)
    pressed = []
    reply = c.ask("Talk a lot.", should_stop=lambda: bool(pressed))
    for i, _ in enumerate(reply):
        if i == 2:
            pressed.append(True)  # Ctrl-C while the reply streams
    assert reply.finish_reason == "interrupted" and 3 <= len(c.messages[-1]["tokens"]) < 50
    assert c.tokens[-1] == tokenizer.eos_id
    assert_cache_is_conversation(model, tokenizer, c)
    "".join(c.ask("And now?"))
    assert_cache_is_conversation(model, tokenizer, c)


def test_stopping_during_the_prefill_drops_the_message_and_restores_the_cache(model, tokenizer):
    c = new_chat(model, tokenizer)
    "".join(c.ask("one"))
    before = list(c.tokens)
    checks = []

    def stop_after_the_first_chunk():
        checks.append(1)
        return len(checks) > 1

    long_message = "word " * 1200  # three prefill chunks of 512
    reply = c.ask(long_message, should_stop=stop_after_the_first_chunk)
    assert "".join(reply) == ""
    assert reply.cancelled and c.tokens == before and len(c.messages) == 2
    assert_cache_is_conversation(model, tokenizer, c)
    "".join(c.ask("two"))
    assert_cache_is_conversation(model, tokenizer, c)


def test_stopping_a_resumed_conversation_before_its_prefill_ends_keeps_it_and_feeds_it_later(
    tmp_path, model, tokenizer
):
    c = new_chat(model, tokenizer)
    "".join(c.ask("word " * 700))  # a transcript of two prefill chunks
    c.save(tmp_path / "t.json", {})
    d = new_chat(model, tokenizer)
    d.load(tmp_path / "t.json")
    checks = []
    reply = d.ask("next", should_stop=lambda: checks.append(1) or len(checks) > 1)
    assert "".join(reply) == ""
    assert reply.cancelled == "message dropped" and 0 < d.fed < len(d.tokens) == len(c.tokens)
    assert_cache_is_conversation(model, tokenizer, d, unfed_at_most=len(d.tokens))
    "".join(d.ask("next"))
    assert_cache_is_conversation(model, tokenizer, d)


def test_stopping_a_regen_before_its_first_token_keeps_the_last_reply(model, tokenizer):
    c = new_chat(model, tokenizer)
    "".join(c.ask("one"))
    messages, tokens = copy.deepcopy(c.messages), list(c.tokens)
    reply = c.regen(should_stop=lambda: True)
    assert "".join(reply) == ""
    assert reply.cancelled == "the last reply kept" and c.messages == messages and c.tokens == tokens
    assert_cache_is_conversation(model, tokenizer, c, unfed_at_most=len(tokens))
    "".join(c.regen())
    assert_cache_is_conversation(model, tokenizer, c)


def test_abandoned_stream_still_leaves_a_consistent_cache(model, tokenizer):
    c = new_chat(model, tokenizer, max_tokens=40)
    stream = c.ask("Go on.")
    next(stream)
    stream.close()  # what a Ctrl-C that escapes the flag would do
    assert c.messages[-1]["role"] == "assistant"
    assert_cache_is_conversation(model, tokenizer, c)


def test_a_reply_broken_by_an_error_does_not_wait_on_the_streams(model, tokenizer, monkeypatch):
    # After a lost rank the broken step's collective never ends, and mx.clear_cache waits for the CPU
    # streams holding the GIL: the process could not even end on SIGTERM (a 3-rank test hung so, 1 run in 6).
    c = new_chat(model, tokenizer, max_tokens=40)
    waits = []
    monkeypatch.setattr(mx, "clear_cache", lambda: waits.append("clear_cache"))

    def lost_peer(*args, **kwargs):
        yield from []
        raise RuntimeError("[ring] connection to a peer was lost")

    monkeypatch.setattr(mixtral, "complete", lost_peer)
    with pytest.raises(RuntimeError, match="peer was lost"):
        "".join(c.ask("Go on."))
    assert waits == []
    monkeypatch.undo()
    "".join(c.ask("Go on."))  # an ordinary reply still hands the step buffers back
    assert c.turns[-1].role == "assistant"


def test_context_overflow_drops_oldest_turns_and_keeps_the_persona(model, tokenizer):
    notices = []
    c = new_chat(model, tokenizer, max_context=160, max_tokens=16, on_notice=notices.append)
    for turn in range(50):
        "".join(c.ask(f"Message number {turn}, please answer."))
        assert len(c.tokens) <= 160
    assert notices and all("oldest exchange" in n for n in notices)
    assert c.messages[0]["role"] == "user" and c.messages[0]["content"] != "Message number 0, please answer."
    # The persona is re-attached to the first message kept, right after BOS.
    first = [tokenizer.bos_id] + chat.user_block(tokenizer, c.messages[0]["content"], MENNY)
    assert c.tokens[: len(first)] == first
    assert_cache_is_conversation(model, tokenizer, c)


def test_a_message_too_long_for_the_context_is_an_error(model, tokenizer):
    c = new_chat(model, tokenizer, max_context=64, max_tokens=8)
    with pytest.raises(mixtral.MixtralError, match="message too long"):
        "".join(c.ask("word " * 100))
    "".join(c.ask("short"))
    assert_cache_is_conversation(model, tokenizer, c)


def test_save_and_resume_restore_the_exact_cache(tmp_path, model, tokenizer):
    c = new_chat(model, tokenizer)
    "".join(c.ask("one"))
    "".join(c.ask("two"))
    c.save(tmp_path / "t.json", {"temp": 0.8})
    d = new_chat(model, tokenizer, system="someone else")
    d.load(tmp_path / "t.json")
    assert d.system == MENNY and d.tokens == c.tokens and d.fed == 0  # fed with the next message
    assert_cache_is_conversation(model, tokenizer, d, unfed_at_most=len(d.tokens))
    "".join(d.ask("three"))
    assert_cache_is_conversation(model, tokenizer, d)
    assert json.loads((tmp_path / "t.json").read_text())["seed"] == 3


def as_sent(c):
    """The conversation as an HTTP client sends it: texts, no token ids."""
    return [{"role": m["role"], "content": m["content"]} for m in c.conversation()]


def test_a_conversation_sent_whole_again_prefills_only_its_new_message(model, tokenizer):
    c = new_chat(model, tokenizer, temp=0.0)
    "".join(c.ask("one"))
    "".join(c.ask("two"))
    before, fed = list(c.tokens), c.fed  # a reply cut off at max_tokens leaves its closing EOS unfed
    reply, n = c.respond(as_sent(c) + [{"role": "user", "content": "three"}])
    "".join(reply)
    assert c.tokens[: len(before)] == before  # each reply kept the ids it was generated as
    assert n - len(before) == len(chat.user_block(tokenizer, "three")) and reply.prompt_tokens == n - fed
    assert_cache_is_conversation(model, tokenizer, c)


def test_an_edited_history_keeps_only_the_cache_it_shares(model, tokenizer):
    c = new_chat(model, tokenizer, temp=0.0)
    for text in ("one", "two", "three"):
        "".join(c.ask(text))
    sent = as_sent(c)
    sent[4]["content"] = "an edited reply"  # the client changed Menny's second reply (0 is the persona)
    reply, n = c.respond(sent + [{"role": "user", "content": "four"}])
    "".join(reply)
    assert [m["content"] for m in c.messages][:4] == [m["content"] for m in sent[1:5]]
    assert reply.prompt_tokens == n - c.turns[3].start  # all from the edited reply on
    assert_cache_is_conversation(model, tokenizer, c)


def saved_chat(tmp_path, model, tokenizer, **kw):
    c = new_chat(model, tokenizer, temp=0.0, **kw)
    for text in ("one", "two", "three"):
        "".join(c.ask(text))
    c.save(tmp_path / "t.json", {})
    assert sessions.save_cache(c, tmp_path / "t.json") > 0
    return c


def test_a_saved_cache_resumes_without_a_prefill_and_replies_as_a_full_prefill(tmp_path, model, tokenizer):
    c = saved_chat(tmp_path, model, tokenizer)
    d, fresh = new_chat(model, tokenizer, temp=0.0), new_chat(model, tokenizer, temp=0.0)
    d.load(tmp_path / "t.json")
    fresh.load(tmp_path / "t.json")
    assert sessions.restore_cache(d, tmp_path / "t.json") is None and d.fed == c.fed and fresh.fed == 0
    assert_cache_is_conversation(model, tokenizer, d)
    reply, again = d.ask("four"), fresh.ask("four")
    assert "".join(reply) == "".join(again)
    assert reply.prompt_tokens == len(d.tokens) - len(reply.ids) - 1 - c.fed  # the new block (and an unfed EOS)
    assert again.prompt_tokens == reply.prompt_tokens + c.fed


def damage_data(path):
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the last tensor
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda t, k: t.write_text(t.read_text().replace('"one"', '"uno"')), "another conversation"),
        (lambda t, k: damage_data(k), "damaged"),
        (lambda t, k: k.write_bytes(k.read_bytes()[:-1000]), "unreadable"),
        (lambda t, k: k.unlink(), "no t.kv.safetensors"),
    ],
    ids=["edited transcript", "flipped byte", "truncated", "missing"],
)
def test_a_saved_cache_that_does_not_fit_is_refused_with_its_reason(tmp_path, model, tokenizer, change, reason):
    saved_chat(tmp_path, model, tokenizer)
    change(tmp_path / "t.json", sessions.cache_file(tmp_path / "t.json"))
    d = new_chat(model, tokenizer, temp=0.0)
    d.load(tmp_path / "t.json")
    assert reason in sessions.restore_cache(d, tmp_path / "t.json") and d.fed == 0
    "".join(d.ask("four"))
    assert_cache_is_conversation(model, tokenizer, d)


def test_a_cache_saved_for_other_weights_is_refused(tmp_path, model, tokenizer):
    saved_chat(tmp_path, model, tokenizer, model_id="the weights of another model")
    d = new_chat(model, tokenizer, temp=0.0, model_id="these weights")
    d.load(tmp_path / "t.json")
    assert "another model" in sessions.restore_cache(d, tmp_path / "t.json") and d.fed == 0


def test_experts_are_the_routers_top_2_in_transformers_for_the_message_and_the_reply(mlx_fp, hf_tiny, tokenizer):
    import torch
    import transformers

    c = chat.Chat(mixtral.load_model(mlx_fp)[0], tokenizer, temp=0.0, max_tokens=10, seed=0, experts=True)
    "".join(c.ask("Hello!"))
    "".join(c.ask("Which of you answers this one?"))
    hf = transformers.MixtralForCausalLM.from_pretrained(hf_tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        routers = hf(torch.tensor([c.tokens]), output_router_logits=True).router_logits  # per layer (T, experts)
    message, reply = c.turns[-2].start, c.turns[-1].start
    e = c.experts
    assert e["prompt_ids"] == c.tokens[message:reply] and e["reply_ids"] == c.turns[-1].ids
    for layer, logits in enumerate(routers):
        top2 = [set(row) for row in torch.topk(logits, 2, dim=-1).indices.tolist()]
        assert [set(p) for p in e["prompt"][layer]] == top2[message:reply]
        assert [set(p) for p in e["reply"][layer]] == top2[reply : reply + len(e["reply_ids"])]


def test_experts_file_holds_counts_ids_and_each_tokens_pair_per_layer(tmp_path, mlx_q8):
    out = tmp_path / "experts.json"
    r = run_script(
        "chat.py",
        "--model-path",
        mlx_q8,
        "--max-tokens",
        5,
        "--temp",
        0,
        stdin=f"hello\n/experts\n/regen\n/experts {out}\n",
    )
    assert r.returncode == 0 and "experts chosen per layer" in r.stderr, r.stderr
    report = json.loads(out.read_text())
    n_prompt, n_reply = len(report["ids"]["prompt"]), len(report["ids"]["reply"])
    assert len(report["layers"]) == 2 and n_prompt > 3 and n_reply == 5
    for layer, counts in enumerate(report["layers"]):
        assert len(counts["prompt"]) == 8 and sum(counts["prompt"]) == 2 * n_prompt
        assert sum(counts["reply"]) == 2 * n_reply
        assert len(report["choices"]["reply"][layer]) == n_reply and all(
            len(p) == 2 for p in report["choices"]["reply"][layer]
        )


def test_piped_turns_print_only_the_replies(tmp_path, mlx_q8):
    t = tmp_path / "t.json"
    r = run_script(
        "chat.py", "--model-path", mlx_q8, "--max-tokens", 15, "--seed", 1, stdin=f"hello\nhow are you?\n/save {t}\n"
    )
    assert r.returncode == 0, r.stderr
    saved = json.loads(t.read_text())
    replies = [m for m in saved["messages"] if m["role"] == "assistant"]
    assert [m["content"] for m in saved["messages"] if m["role"] == "user"] == ["hello", "how are you?"]
    tok = mixtral.Tokenizer(mlx_q8 / "tokenizer.model")
    assert r.stdout == "".join(tok.decode(m["tokens"]) + "\n" for m in replies)
    assert saved["seed"] == 1 and saved["settings"]["max_tokens"] == 15


def test_triple_quotes_make_one_multi_line_message(tmp_path, mlx_q8):
    t = tmp_path / "t.json"
    stdin = f'"""first line\nsecond line\n"""\none more\n/save {t}\n'
    r = run_script("chat.py", "--model-path", mlx_q8, "--max-tokens", 3, stdin=stdin)
    assert r.returncode == 0, r.stderr
    users = [m["content"] for m in json.loads(t.read_text())["messages"] if m["role"] == "user"]
    assert users == ["first line\nsecond line", "one more"]


def test_resume_continues_a_saved_conversation(tmp_path, mlx_q8):
    first, second = tmp_path / "1.json", tmp_path / "2.json"
    r = run_script("chat.py", "--model-path", mlx_q8, "--max-tokens", 4, stdin=f"hello\n/save {first}\n")
    assert r.returncode == 0, r.stderr
    r = run_script(
        "chat.py", "--model-path", mlx_q8, "--max-tokens", 4, "--resume", first, stdin=f"again\n/save {second}\n"
    )
    assert r.returncode == 0, r.stderr
    old, new = (json.loads(p.read_text())["messages"] for p in (first, second))
    assert new[: len(old)] == old and [m["content"] for m in new[len(old) :] if m["role"] == "user"] == ["again"]


def test_resume_with_the_saved_cache_prefills_only_the_new_message_and_replies_as_without(tmp_path, mlx_q8):
    talk = tmp_path / "talk.json"
    opts = ["--model-path", mlx_q8, "--max-tokens", 6, "--temp", 0, "--verbose"]
    r = run_script("chat.py", *opts, stdin=f"hello there\nhow are you?\n/save {talk}\n")
    assert r.returncode == 0 and "and its" in r.stderr and (tmp_path / "talk.kv.safetensors").is_file(), r.stderr
    with_cache = run_script("chat.py", *opts, "--resume", talk, stdin="and now?\n")
    (tmp_path / "talk.kv.safetensors").unlink()
    without = run_script("chat.py", *opts, "--resume", talk, stdin="and now?\n")
    assert with_cache.stdout == without.stdout and with_cache.stdout.strip(), (with_cache.stderr, without.stderr)
    assert "of the saved cache" not in with_cache.stderr and "of the saved cache" in without.stderr
    prefilled = [int(e.split("[prompt ")[1].split()[0]) for e in (with_cache.stderr, without.stderr)]
    # Only the new message (and the EOS of the last reply, cut off at --max-tokens) against all of it.
    assert prefilled[0] < 20 < prefilled[1], prefilled


@pytest.mark.parametrize("folder", ["mlx_q8", "mlx_fp"])
def test_a_two_turn_greedy_chat_has_the_same_ids_on_a_float16_and_a_float32_cache(request, folder, tokenizer):
    ids = {}
    for kv_dtype in ("float16", "float32"):
        model, _ = mixtral.load_model(request.getfixturevalue(folder), kv_dtype=kv_dtype)
        assert model.make_cache()[0].dtype == getattr(mx, kv_dtype)
        c = new_chat(model, tokenizer, temp=0.0, max_tokens=24)
        "".join(c.ask("Hello there, who are you?"))
        "".join(c.ask("And what do you like to do on a rainy afternoon?"))
        ids[kv_dtype] = c.tokens
    assert ids["float16"] == ids["float32"] and len(ids["float16"]) > 60


@pytest.mark.parametrize("saved, resumed", [("float32", "float16"), ("float16", "float32")])
def test_a_cache_saved_in_another_kv_dtype_is_refused_in_one_line_and_the_reply_is_a_full_prefills(
    tmp_path, mlx_q8, saved, resumed
):
    talk = tmp_path / "talk.json"
    opts = ["--model-path", mlx_q8, "--max-tokens", 6, "--temp", 0]
    r = run_script("chat.py", *opts, "--kv-dtype", saved, stdin=f"hello there\n/save {talk}\n")
    assert r.returncode == 0 and (tmp_path / "talk.kv.safetensors").is_file(), r.stderr
    other = run_script("chat.py", *opts, "--kv-dtype", resumed, "--resume", talk, stdin="and now?\n")
    (tmp_path / "talk.kv.safetensors").unlink()
    fresh = run_script("chat.py", *opts, "--kv-dtype", resumed, "--resume", talk, stdin="and now?\n")
    assert other.stdout == fresh.stdout and other.stdout.strip(), (other.stderr, fresh.stderr)
    said = [line for line in other.stderr.splitlines() if "of the saved cache" in line]
    assert len(said) == 1 and f"another kv_dtype ({saved}, here {resumed})" in said[0], other.stderr


def test_a_session_writes_only_the_new_tokens_each_turn_and_resumes_exactly(tmp_path, model, tokenizer):
    session = sessions.Session("demo", root=tmp_path)
    c = new_chat(model, tokenizer, temp=0.0)
    "".join(c.ask("one"))
    session.save(c, {})
    first = [f for _, _, f in session.segments()]
    "".join(c.ask("two"))
    session.save(c, {})
    spans = [(a, b) for a, b, _ in session.segments()]
    assert len(first) == 1 and len(spans) == 2 and spans[0][1] == spans[1][0] and spans[1][1] == c.fed
    c.undo()  # the second segment no longer matches: it goes, the first stays
    "".join(c.ask("three"))
    session.save(c, {})
    assert [f for _, _, f in session.segments()][0] == first[0] and session.segments()[-1][1] == c.fed
    session.lock.close()
    d = new_chat(model, tokenizer, temp=0.0)
    again = sessions.Session("demo", root=tmp_path)
    assert again.resume(d, again.transcript.read_text()) is None and d.fed == c.fed and d.tokens == c.tokens
    assert_cache_is_conversation(model, tokenizer, d)


@pytest.mark.parametrize("name", ["a/b", "..", "../up", ".hidden", ""])
def test_a_session_name_that_could_leave_the_sessions_folder_is_refused(tmp_path, mlx_q8, name):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    assert_one_line_error(run_script("chat.py", "--model-path", mlx_q8, "--session", name, env=env), "session name")


def test_a_second_chat_on_an_open_session_is_refused(tmp_path, mlx_q8):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    held = sessions.Session("demo", root=tmp_path / "mixtral-mlx" / "sessions")
    r = run_script("chat.py", "--model-path", mlx_q8, "--session", "demo", env=env, stdin="hi\n")
    assert_one_line_error(r, "session 'demo' is open in another chat")
    held.lock.close()


def test_an_unwritable_sessions_folder_is_one_line(mlx_q8):
    env = {**os.environ, "XDG_CACHE_HOME": "/sys/no-such-place"}  # not writable, even by root
    r = run_script("chat.py", "--model-path", mlx_q8, "--session", "demo", env=env, stdin="hi\n")
    assert_one_line_error(r, "cannot write the sessions folder", "XDG_CACHE_HOME")


def test_a_session_survives_kill_9_mid_reply_and_a_full_disk(tmp_path, mlx_q8):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    opts = ["--model-path", mlx_q8, "--session", "demo", "--temp", 0]
    r = run_script("chat.py", *opts, "--max-tokens", 5, env=env, stdin="one\ntwo\n")
    assert r.returncode == 0, r.stderr
    talk = tmp_path / "mixtral-mlx" / "sessions" / "demo" / "talk.json"
    saved = talk.read_text()
    p = popen_script(
        "chat.py",
        *opts,
        "--max-tokens",
        100000,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    p.stdin.write(b"talk for a long time\n")
    p.stdin.flush()
    p.stdout.read(20)  # the reply is streaming
    p.kill()
    p.wait(timeout=30)
    assert talk.read_text() == saved  # the reply in progress is all that is lost
    full_disk = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
    r = run_script("chat.py", *opts, "--max-tokens", 5, env=env, stdin="three\n", preexec_fn=full_disk)
    assert r.returncode == 0 and "error: " in r.stderr and "cannot write" in r.stderr and r.stdout.strip(), r.stderr
    assert talk.read_text() == saved  # a save that failed left the previous one whole
    r = run_script("chat.py", *opts, "--max-tokens", 5, "--verbose", env=env, stdin="four\n")
    assert r.returncode == 0 and "of the saved cache" not in r.stderr, r.stderr
    assert json.loads(talk.read_text())["messages"][-2]["content"] == "four"
    listing = run_script("chat.py", "--sessions", env=env)
    assert listing.stdout.splitlines()[1].split()[:2] == ["demo", "3"], listing.stdout


def test_one_shot_prompt_prints_one_reply(mlx_q8):
    r = run_script("chat.py", "--model-path", mlx_q8, "--prompt", "hi", "--max-tokens", 10, "--seed", 5, "--temp", 0)
    assert r.returncode == 0, r.stderr
    m, tok = mixtral.load_model(mlx_q8)
    c = chat.Chat(m, tok, max_tokens=10, temp=0, seed=5)
    assert r.stdout == "".join(c.ask("hi")) + "\n"


def test_no_model_says_which_two_commands_to_run(tmp_path):
    r = run_script("chat.py", "--model-path", tmp_path / "mlx_model")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert (
        "python convert.py --hf-path mistralai/Mixtral-8x7B-Instruct-v0.1" in r.stderr and "python chat.py" in r.stderr
    )


def test_a_hugging_face_folder_is_converted_once_then_reused(tmp_path, hf_tiny):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = run_script("chat.py", "--model-path", hf_tiny, "--prompt", "hi", "--max-tokens", 3, env=env)
    assert r.returncode == 0 and "converting" in r.stderr, r.stderr
    assert list((tmp_path / "cache" / "mixtral-mlx").glob("*/weights.00.npz"))
    r = run_script("chat.py", "--model-path", hf_tiny, "--prompt", "hi", "--max-tokens", 3, env=env)
    assert r.returncode == 0 and "converting" not in r.stderr, r.stderr


class Pty:
    """chat.py on a pseudo-terminal, driven as a person would."""

    def __init__(self, *args, python=()):
        self.fd, tty = pty.openpty()
        # A new session whose controlling terminal is the pty: Ctrl-C typed there signals chat.py.
        # Popen returns once chat.py's interpreter runs (a forked copy of pytest would get it otherwise).
        self.proc = subprocess.Popen(
            [sys.executable, *python, str(ROOT / "chat.py"), *map(str, args)],
            stdin=tty,
            stdout=tty,
            stderr=tty,
            start_new_session=True,
            preexec_fn=lambda: (default_signals(), fcntl.ioctl(0, termios.TIOCSCTTY, 0)),
        )
        os.close(tty)
        self.out = ""

    def read_until(self, done, timeout=120):
        """Read the screen until done(screen) holds (a string: until it appears)."""
        check = (lambda s: done in s) if isinstance(done, str) else done
        end = time.time() + timeout
        while not check(self.out):
            assert time.time() < end, f"timed out; screen:\n{self.out[-2000:]}"
            if select.select([self.fd], [], [], 0.1)[0]:
                self.out += os.read(self.fd, 65536).decode(errors="replace")

    def prompts(self, n):
        self.read_until(lambda s: s.count(">>> ") >= n)

    def send(self, text):
        os.write(self.fd, text.encode())

    def wait(self, timeout=30):
        """The exit code; fails (and kills chat.py) if it has not exited within timeout seconds."""
        end = time.time() + timeout
        while self.proc.poll() is None:
            if time.time() > end:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"chat.py still running after {timeout} s; screen:\n{self.out[-2000:]}")
            if select.select([self.fd], [], [], 0.05)[0]:
                with contextlib.suppress(OSError):  # the other side closes as it exits
                    self.out += os.read(self.fd, 65536).decode(errors="replace")
        with contextlib.suppress(OSError):
            while select.select([self.fd], [], [], 0)[0] and (data := os.read(self.fd, 65536)):
                self.out += data.decode(errors="replace")
        os.close(self.fd)
        return self.proc.returncode


def test_terminal_session_two_turns_command_ctrl_c_and_ctrl_d(tmp_path, mlx_q8):
    t = tmp_path / "t.json"
    term = Pty("--model-path", mlx_q8, "--max-tokens", 600, "--seed", 2, "--temp", 1.0)
    term.prompts(1)
    term.send("hello\r")
    term.prompts(2)
    term.send("/help\r")
    term.prompts(3)
    assert "/regen" in term.out
    term.send("tell me a long story\r")
    shown = len(term.out)
    term.read_until(lambda s: len(s) > shown + 100)  # the reply is streaming
    term.send("\x03")
    term.read_until("(stopped)")
    term.prompts(4)
    term.send("and now?\r")
    term.prompts(5)
    term.send(f"/save {t}\r")
    term.read_until("(saved")
    term.prompts(6)
    term.send("\x04")
    assert term.wait() == 0
    assert "Traceback" not in term.out
    saved = json.loads(t.read_text())["messages"]
    assert [m["content"] for m in saved if m["role"] == "user"] == ["hello", "tell me a long story", "and now?"]
    stopped = saved[4]
    assert stopped["role"] == "assistant" and 0 < len(stopped["tokens"]) < 600


def test_ctrl_c_at_an_empty_prompt_exits_cleanly(mlx_q8):
    term = Pty("--model-path", mlx_q8)
    term.prompts(1)
    term.send("\x03")
    assert term.wait() == 0
    assert "Traceback" not in term.out


def test_ctrl_c_sent_the_moment_the_prompt_appears_is_never_lost(mlx_q8):
    # CPython's readline shows the prompt, then waits in select(), and looks at signals only when
    # select() is interrupted: a Ctrl-C sent as soon as the prompt shows can fall between the two.
    # Busy processes widen that window; before the fix about 1 start in 2 hung here.
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for _ in range(20):
            term = Pty("--model-path", mlx_q8)
            term.prompts(1)
            term.send("\x03")
            code = term.wait(timeout=10)
            assert code == 0, f"exit {code}; screen:\n{term.out[-2000:]}"
    finally:
        for p in load:
            p.kill()
            p.wait()


@pytest.mark.parametrize("after, step", [("argparse", 0.005), ("sentencepiece", 0.001)])
def test_ctrl_c_at_any_moment_of_start_up_exits_without_a_traceback(mlx_q8, after, step):
    # Start-up is imports, then loading (the tokenizer, then the shards), then the prompt: about 0.1 s
    # here. Ctrl-C in any of them ends chat.py quietly: killed by SIGINT, 130, or 0 at the prompt. The
    # clock starts when chat.py imports argparse (its first import), or sentencepiece (loading starts),
    # as -X importtime shows; before chat.py runs, Python's own start-up answers Ctrl-C its own way.
    # Loading once lost 3 Ctrl-Cs in 90 (chat.py went on to its prompt) and aborted the exit in 5.
    for delay in [step * i for i in range(30)]:
        term = Pty("--model-path", mlx_q8, python=("-X", "importtime"))
        term.read_until(f"| {after}\r", timeout=30)
        time.sleep(delay)
        term.send("\x03")
        code = term.wait(timeout=30)
        screen = "".join(line for line in term.out.splitlines(True) if "import time:" not in line)
        assert code in (-signal.SIGINT, 130, 0) and "Traceback" not in screen, f"{delay:.3f} s: exit {code}\n{screen}"


def test_ctrl_c_during_the_prefill_of_a_resumed_conversation_stops_it_between_chunks(tmp_path, mlx_q8):
    # A resumed transcript is fed with the next message, 512 tokens at a time: Ctrl-C stops it at the
    # next chunk, where one whole graph would have run to its end first (the same wait as no Ctrl-C).
    t = tmp_path / "t.json"
    t.write_text(
        json.dumps({"messages": [{"role": "user", "content": "word " * 12000}, {"role": "assistant", "content": "ok"}]})
    )
    args = ("--model-path", mlx_q8, "--resume", t, "--max-context", 32768, "--max-tokens", 2)
    term = Pty(*args)
    term.prompts(1)
    tic = time.time()
    term.send("hi\r")
    term.prompts(2)
    whole = time.time() - tic
    term.send("\x04")
    assert term.wait() == 0

    term = Pty(*args)
    term.prompts(1)
    term.send("hi\r")
    time.sleep(whole / 4)
    tic = time.time()
    term.send("\x03")
    term.read_until("(stopped before the reply: message dropped)")
    stopped = time.time() - tic
    term.prompts(2)
    term.send("\x04")
    assert term.wait() == 0 and "Traceback" not in term.out
    assert stopped < whole / 3, f"stopped {stopped:.1f} s after Ctrl-C; the whole prefill takes {whole:.1f} s"


def test_ctrl_c_inside_a_triple_quote_block_drops_it_and_returns_to_the_prompt(tmp_path, mlx_q8):
    t = tmp_path / "t.json"
    term = Pty("--model-path", mlx_q8, "--max-tokens", 3)
    term.prompts(1)
    term.send('"""\r')
    term.read_until("... ")
    term.send("a line I regret\r")
    term.read_until(lambda s: s.count("... ") >= 2)
    term.send("\x03")
    term.read_until("(block dropped)")
    term.prompts(2)
    term.send(f"/save {t}\r")
    term.read_until("(saved")
    term.prompts(3)  # Ctrl-D typed before readline reads is a cooked-mode end-of-file, lost on the way
    term.send("\x04")
    assert term.wait() == 0 and "Traceback" not in term.out
    assert [m for m in json.loads(t.read_text())["messages"] if m["role"] == "user"] == []


# --------------------------------------------------------------------------- the format and random sessions, by property (hypothesis)


TOK = mixtral.Tokenizer(TOKENIZER)


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
    try:
        reference = reference_ids(conv)
    except Exception:  # mistral-common refuses some requests (e.g. blank messages): nothing to compare
        assume(False)
    assert chat.encode_messages(TOK, as_dicts(conv)) == reference


def test_chat_sessions_keep_the_cache_equal_to_a_fresh_prefill(mlx_q8, tmp_path, kernels):
    # The exact path: a decode step and a prefill attend in other orders (kernels/attend.cpp against MLX's),
    # and the int16 path's rounding of activations would magnify those 1e-7 differences to 5e-4 here.
    kernels("exact")
    model = mixtral.load_model(mlx_q8)[0]
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


# --------------------------------------------------------------------------- bad input, a full disk, Ctrl-C


@pytest.mark.parametrize(
    "messages,message",
    [
        (["hi"], "list of objects"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "tokens": ["a"]}],
            "'tokens' must be",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "tokens": [5, 99999]}],
            "from 0 to 31999",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "tokens": [True]}],
            "'tokens' must be",
        ),
    ],
)
def test_a_bad_transcript_is_one_line_at_start(tmp_path, mlx_q8, messages, message):
    t = tmp_path / "t.json"
    t.write_text(json.dumps({"messages": messages}))
    assert_one_line_error(
        run_script("chat.py", "--model-path", mlx_q8, "--resume", t, stdin=b""), "not a chat transcript", message
    )


def test_a_transcript_longer_than_the_context_keeps_its_newest_exchanges(tmp_path, mlx_q8, tokenizer):
    model, _ = mixtral.load_model(mlx_q8)
    long = chat.Chat(model, tokenizer, max_tokens=8, temp=0.0, seed=0)
    for i in range(12):
        "".join(long.ask(f"message {i} with a few more words in it"))
    long.save(tmp_path / "t.json", {})
    notices = []
    short = chat.Chat(model, tokenizer, max_tokens=8, temp=0.0, seed=0, max_context=128, on_notice=notices.append)
    short.load(tmp_path / "t.json")
    assert len(short.tokens) + 9 <= 128 and short.messages == long.messages[-len(short.messages) :]
    assert "dropped the" in notices[0] and short.messages[0]["role"] == "user"
    assert short.tokens == chat.encode_messages(tokenizer, short.conversation())
    "".join(short.regen())  # a reply budget that is positive
    assert short.messages[-1]["tokens"]


def test_lines_that_are_not_utf8_are_refused_and_the_chat_goes_on(mlx_q8):
    r = run_script("chat.py", "--model-path", mlx_q8, "--max-tokens", 3, "--temp", 0, stdin=b"caf\xe9\nhello\n")
    assert r.returncode == 0, r.stderr
    assert b"not UTF-8 text (byte 0xe9)" in r.stderr and b"Traceback" not in r.stderr
    assert r.stdout.count(b"\n") == 1  # one reply: to "hello"


def test_save_writes_atomically_and_keeps_the_old_file_when_writing_fails(tmp_path, mlx_q8):
    t = tmp_path / "t.json"
    t.write_text("old transcript")
    script = (
        f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "import chat, mixtral\n"
        f"m, tok = mixtral.load_model({str(mlx_q8)!r})\n"
        "c = chat.Chat(m, tok, max_tokens=4, seed=0)\n"
        "''.join(c.ask('hi ' * 200))\n"
        f"c.save({str(t)!r}, {{}})\n"
    )
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))  # writes past 100 bytes fail
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert "cannot write" in r.stderr and "previous file, if any, is unchanged" in r.stderr
    assert t.read_text() == "old transcript" and [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_two_hugging_face_folders_of_the_same_name_get_two_conversions(tmp_path, hf_tiny, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    a, b = tmp_path / "a" / "tiny", tmp_path / "b" / "tiny"
    shutil.copytree(hf_tiny, a)
    shutil.copytree(hf_tiny, b)
    assert chat.resolve_model(str(a), log=lambda s: None) != chat.resolve_model(str(b), log=lambda s: None)
    assert chat.resolve_model(str(a), log=lambda s: None) == chat.resolve_model(str(a), log=lambda s: None)


def test_ctrl_c_while_piped_exits_130_without_a_traceback(mlx_q8):
    # Greedy: this checkpoint's reply to "hi" has no newline, so the line read is the whole reply. Sampled
    # (chat.py's default), a reply with a newline in it ends the line while it still streams, and the
    # Ctrl-C then stops the reply, as it should, not the program (a CI run failed so).
    p = popen_script(
        "chat.py",
        "--model-path",
        mlx_q8,
        "--max-tokens",
        2,
        "--temp",
        0,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    p.stdin.write("hi\n")
    p.stdin.flush()
    p.stdout.readline()  # replied: now waiting for the next line
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and err.strip().endswith("interrupted") and "Traceback" not in err, err


def test_ctrl_c_during_the_first_run_conversion_exits_130_and_leaves_nothing(tmp_path):
    from synthetic import write_hf_checkpoint

    hf = write_hf_checkpoint(
        tmp_path / "hf",
        seed=2,
        n_shards=8,
        hidden_size=512,
        intermediate_size=1792,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    p = popen_script(
        "chat.py",
        "--model-path",
        hf,
        "--prompt",
        "hi",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert "converting" in p.stderr.readline()
    assert p.stderr.readline().startswith("[1/")  # converting layer by layer now
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip().endswith("interrupted") and "Traceback" not in err, err
    cache = tmp_path / "cache" / "mixtral-mlx"
    assert not any(cache.glob("*/config.json")) and not any(cache.glob(".*tmp*"))


# --------------------------------------------------------------------------- soak (python3 -m pytest -m soak)


def peak_rss_mb(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_200_turns_keep_memory_flat_and_the_persona_in_the_cache(tmp_path, mlx_q8):
    p = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "chat.py"),
            "--model-path",
            str(mlx_q8),
            "--max-context",
            "200",
            "--max-tokens",
            "12",
            "--seed",
            "0",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peaks = {}
    for turn in range(1, 201):
        p.stdin.write(f"message {turn}: tell me something about the number {turn}\n")
        p.stdin.flush()
        assert p.stdout.readline(), p.stderr.read()
        if turn in (50, 200):
            peaks[turn] = peak_rss_mb(p.pid)
    p.stdin.write(f"/save {tmp_path / 't.json'}\n")
    p.stdin.close()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 0 and "error" not in err and "Traceback" not in err, err
    print(f"peak RSS after 50 turns {peaks[50]:.0f} MB, after 200 {peaks[200]:.0f} MB")
    assert peaks[200] <= 1.05 * peaks[50]
    # The saved conversation is what the cache held at the end: the persona starts it.
    saved = json.loads((tmp_path / "t.json").read_text())["messages"]
    assert saved[0] == {"role": "system", "content": chat.DEFAULT_SYSTEM_PROMPT}
    assert saved[1]["content"] != "message 1: tell me something about the number 1"  # old turns were dropped
    tok = mixtral.Tokenizer(mlx_q8 / "tokenizer.model")
    ids = chat.encode_messages(tok, saved)
    assert len(ids) <= 200 and ids[: 1 + len(chat.user_block(tok, saved[1]["content"], saved[0]["content"]))] == [
        tok.bos_id
    ] + chat.user_block(tok, saved[1]["content"], saved[0]["content"])
