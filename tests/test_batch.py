"""batch.py: sequences decoded together give, each one, the ids and the KV cache of the same request alone
(mixtral.generate), greedy or sampled with a seed, whatever joins, leaves or stops around them."""

from itertools import islice

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import batch
import mixtral
from conftest import examples

KERNELS = ["int16", "exact", "mlx"]
EOS = 2  # the real Mixtral tokenizer's, which the tiny checkpoints use


@pytest.fixture(scope="module")
def model(mlx_q8, tokenizer):
    assert tokenizer.eos_id == EOS
    return mixtral.load_model(mlx_q8)[0]


def alone(model, prompt, n, temp=0.0, top_p=1.0, min_p=0.0, seed=None):
    """-> (the ids generate() gives alone, up to EOS or n, and the cache it leaves)."""
    if seed is not None:
        mx.random.seed(seed)
    cache, out = model.make_cache(), []
    for y in islice(mixtral.generate(model, prompt, cache, temp=temp, top_p=top_p, min_p=min_p), n):
        if y == EOS:
            break
        out.append(y)
    return out, cache


def prompt_of(rng, length):
    return [1] + rng.integers(3, 32000, length - 1).tolist()


def run(b: batch.Batch, arrivals: dict, stops: dict = {}, limit=10_000):
    """Step b until idle, adding arrivals[step] before that step and stopping stops[step] after it."""
    step = 0
    while (b.busy or any(k >= step for k in arrivals)) and step < limit:
        for s in arrivals.get(step, []):
            b.add(s)
        if b.busy:
            b.step()
        for s in stops.get(step, []):
            b.stop(s)
        step += 1
    assert not b.busy


def same_cache(a, b, n):
    """The first n positions of two caches hold the same bits, in every layer."""
    for x, y in zip(a, b):
        for u, v in ((x.keys, y.keys), (x.values, y.values)):
            assert np.array_equal(np.array(u[:, :, :n]), np.array(v[:, :, :n]))


@pytest.mark.parametrize("name", KERNELS)
def test_eight_sequences_together_give_each_the_ids_and_cache_it_gets_alone(model, kernels, name):
    kernels(name)
    rng = np.random.default_rng(0)
    prompts = [prompt_of(rng, n) for n in (1, 2, 7, 40, 130, 300, 3, 600)]
    sampling = [dict(temp=0.8, top_p=0.9, seed=i) if i % 2 else {} for i in range(8)]
    refs = [alone(model, p, 12, **kw) for p, kw in zip(prompts, sampling)]
    seqs = [batch.Sequence(model.make_cache(), list(p), 12, **kw) for p, kw in zip(prompts, sampling)]
    run(batch.Batch(model, EOS, size=8), {0: seqs})
    for (ids, cache), s, p in zip(refs, seqs, prompts):
        assert s.ids == ids and s.finish_reason == "length"
        same_cache(cache, s.cache, len(p) + len(ids) - 1)  # all but the last id, fed by a step never read


@settings(max_examples=examples(6))
@given(
    seed=st.integers(0, 2**16),
    lengths=st.lists(st.sampled_from([1, 2, 5, 17, 64, 129, 400, 1100]), min_size=1, max_size=6),
    size=st.integers(1, 6),
    chunk=st.sampled_from([16, 128, 512]),
    name=st.sampled_from(["int16", "exact"]),
)
def test_any_arrivals_lengths_budgets_and_stops_leave_every_reply_as_alone(
    model, seed, lengths, size, chunk, name, kernels
):
    """Random arrival steps, prompt lengths, max_tokens, sampling and clients that leave mid-reply."""
    kernels(name)
    rng = np.random.default_rng(seed)
    seqs, refs, arrivals, stops = [], [], {}, {}
    for length in lengths:
        kw = dict(temp=0.7, min_p=0.05, seed=int(rng.integers(1000))) if rng.random() < 0.5 else {}
        p, n = prompt_of(rng, length), int(rng.integers(0, 9))
        refs.append(alone(model, p, n, **kw)[0] if n else [])
        seqs.append(batch.Sequence(model.make_cache(), list(p), n, **kw))
        arrivals.setdefault(int(rng.integers(0, 12)), []).append(seqs[-1])
        if rng.random() < 0.25:
            stops.setdefault(int(rng.integers(0, 30)), []).append(seqs[-1])
    run(batch.Batch(model, EOS, size=size, chunk=chunk), arrivals, stops)
    for s, ids in zip(seqs, refs):
        if s.finish_reason == "interrupted":
            assert s.ids == ids[: len(s.ids)]
        else:
            assert (s.ids, s.finish_reason) == (ids, "length" if len(ids) == s.max_tokens else "stop")


def test_a_sequence_stopped_before_its_reply_never_starts_and_the_others_go_on(model):
    rng = np.random.default_rng(3)
    long, short = prompt_of(rng, 700), prompt_of(rng, 5)
    ended = []
    a = batch.Sequence(model.make_cache(), long, 5, on_end=ended.append)
    b = batch.Sequence(model.make_cache(), short, 5, on_end=ended.append)
    run(batch.Batch(model, EOS, size=2, chunk=64), {0: [a, b]}, {0: [a]})  # a: 512 of 700 fed
    assert ended == [a, b] and not a.started and a.ids == [] and a.finish_reason == "interrupted"
    assert b.ids == alone(model, short, 5)[0]


def test_a_long_prompt_is_fed_one_chunk_a_step_while_the_others_decode(model):
    rng = np.random.default_rng(4)
    talker, long = (batch.Sequence(model.make_cache(), prompt_of(rng, n), 40) for n in (3, 1001))
    b = batch.Batch(model, EOS, size=2, chunk=100)
    b.add(talker)
    b.step(), b.step()
    b.add(long)
    seen = []
    while len(long.feed) > 1:
        b.step()
        seen.append((len(long.feed), len(talker.ids)))
    # 1000 tokens in 10 chunks of 100, and the talker got a token at every one of those steps.
    assert [f for f, _ in seen] == list(range(901, 0, -100)) and [n for _, n in seen] == list(range(2, 12))


def test_new_prompts_arriving_together_get_a_chunk_each_a_step_up_to_prefill_step_tokens(model):
    rng = np.random.default_rng(6)
    prompts = [prompt_of(rng, n) for n in (3, 30, 30, 30, *[100] * 8)]
    talker, *others = [batch.Sequence(model.make_cache(), p, 40 if len(p) == 3 else 4) for p in prompts]
    few, many = others[:3], others[3:]
    b = batch.Batch(model, EOS, size=16, chunk=50)
    b.add(talker)
    b.step(), b.step()
    for s in few:
        b.add(s)
    b.step()  # 3 x 50 tokens of room, oldest first: the three prompts (90 tokens) whole
    assert [len(s.feed) for s in few] == [0, 0, 0]
    for s in many:
        b.add(s)
    b.step()  # 8 x 50 tokens, but PREFILL_STEP (256) in all: two whole prompts and 56 of the third
    assert [len(s.feed) for s in many] == [0, 0, 44, 100, 100, 100, 100, 100]
    assert batch.PREFILL_STEP == 256
    run(b, {}, {})
    for s, p in zip([talker, *others], prompts):
        assert s.ids == alone(model, p, s.max_tokens)[0]


def test_a_stop_answer_from_on_token_ends_the_sequence_there(model):
    rng = np.random.default_rng(5)
    p = prompt_of(rng, 9)
    s = batch.Sequence(model.make_cache(), p, 50, on_token=lambda y: "stop" if y == ids[3] else None)
    ids = alone(model, p, 50)[0]
    run(batch.Batch(model, EOS), {0: [s]})
    assert s.ids == ids[: ids.index(ids[3]) + 1] and s.finish_reason == "stop"


def test_each_sequence_keeps_the_experts_of_its_own_tokens(model):
    rng = np.random.default_rng(6)
    prompts = [prompt_of(rng, 30), prompt_of(rng, 4)]
    expected = []
    for p in prompts:
        model.log_routing(True)
        ids, _ = alone(model, p, 6)
        expected.append([layer[: len(p) + len(ids)] for layer in mixtral.routing_choices(model)])
        model.log_routing(False)
    seqs = [batch.Sequence(model.make_cache(), p, 6, experts=True) for p in prompts]
    run(batch.Batch(model, EOS), {0: seqs[:1], 3: seqs[1:]})
    model.log_routing(False)
    for s, want, p in zip(seqs, expected, prompts):
        assert [layer[: len(p) + len(s.ids)] for layer in s.choices()] == want


# --------------------------------------------------------------------------- the server's engine


def engine_replies(model, tokenizer, jobs, arrivals, leaving, size):
    """Run server.Engine's steps as serve() does: jobs join at their arrival step, leave at theirs.
    -> each job's (text, finish_reason), or None when it left before its answer."""
    import server

    engine = server.Engine(model, tokenizer, 512, 2**30, size=size)
    answers = {}
    for job in jobs:
        parts = []

        def send(kind, value=None, parts=parts, job=job):
            if kind == "text":
                parts.append(value)
            else:
                answers[id(job)] = ("".join(parts), value["finish_reason"] if kind == "done" else value)

        job.send = send
    step = 0
    while engine.batch.busy or any(k >= step for k in arrivals):
        for job in leaving.get(step, []):
            job.cancelled = True
        engine.step(arrivals.get(step, []), engine.cancelled())
        step += 1
    return [answers.get(id(job)) for job in jobs]


def chat_alone(model, tokenizer, spec):
    """The reply as the server gave it before batching: chat.Chat.respond (mixtral.generate, the global
    random sequence from the seed), its text through the stop strings."""
    import chat
    import server

    c = chat.Chat(model, tokenizer, system="", max_context=512, max_tokens=spec["max_tokens"], seed=0)
    c.temp, c.top_p, c.min_p = spec["temp"], spec["top_p"], spec["min_p"]
    if spec["seed"] is not None:
        mx.random.seed(spec["seed"])
    reply, _ = c.respond(spec["prompt"])
    stops, text, hit = server.StopStrings(spec["stop"]), "", False
    for piece in reply:
        part, hit = stops.feed(piece)
        text += part
        if hit:
            break
    reply.close()
    text += "" if hit else stops.flush()
    return text, "length" if reply.finish_reason == "length" and not hit else "stop"


@settings(max_examples=examples(5))
@given(
    seed=st.integers(0, 2**16), n=st.integers(1, 6), size=st.integers(1, 4), name=st.sampled_from(["int16", "exact"])
)
def test_the_servers_replies_in_a_batch_equal_each_alone(model, tokenizer, kernels, seed, n, size, name):
    """server.Engine with random arrivals, conversations that share prefixes (cache hits) or not, long
    and short messages, stop strings, budgets, seeds, and clients that leave: each answer equals the
    same request answered alone by chat.Chat (the path before batching), token for token."""
    import server

    kernels(name)
    rng = np.random.default_rng(seed)
    words = ["sea", "why", "no", "stone", "later", "rain"]

    def job():
        first = [{"role": "user", "content": f"Topic {rng.integers(3)}."}]
        text = " ".join(rng.choice(words, int(rng.choice([1, 8, 150]))))
        messages = first + (
            [{"role": "assistant", "content": "Fine."}, {"role": "user", "content": text}] * int(rng.integers(2))
        )
        sampled = dict(temp=0.9, top_p=0.9, min_p=0.0, seed=int(rng.integers(99))) if rng.random() < 0.5 else {}
        return dict(
            kind="chat",
            prompt=messages,
            max_tokens=int(rng.integers(1, 10)),
            temp=sampled.get("temp", 0.0),
            top_p=sampled.get("top_p", 1.0),
            min_p=0.0,
            stop=[str(rng.choice(["a", "e", " t"]))] if rng.random() < 0.3 else [],
            seed=sampled.get("seed"),
        )

    specs = [job() for _ in range(n)]
    alone = [chat_alone(model, tokenizer, spec) for spec in specs]
    jobs = [server.Job(**spec) for spec in specs]
    arrivals, leaving = {}, {}
    for j in jobs:
        arrivals.setdefault(int(rng.integers(0, 6)), []).append(j)
        if rng.random() < 0.2:
            leaving.setdefault(int(rng.integers(0, 12)), []).append(j)
    together = engine_replies(model, tokenizer, jobs, arrivals, leaving, size)
    for j, a, t in zip(jobs, alone, together):
        if j.cancelled:  # left: what it got is the start of the answer alone (or that and a held-back stop's start)
            assert t is None or a[0].startswith(t[0]) or t[0].startswith(a[0]), (a, t)
        else:
            assert t == a, (j, a, t)


def test_an_error_in_a_step_answers_every_running_request_and_the_engine_goes_on(model, tokenizer, monkeypatch):
    import server
    from runtime import MixtralError

    engine = server.Engine(model, tokenizer, 512, 2**30, size=4)
    got = []
    jobs = [server.Job("chat", [{"role": "user", "content": f"Hi {i}"}], 5, 0.0, 1.0, 0.0, [], None) for i in range(3)]
    for job in jobs:
        job.send = lambda kind, value=None, job=job: got.append((job, kind, value))
    broken = lambda self: (_ for _ in ()).throw(MixtralError("out of memory"))
    with monkeypatch.context() as m:
        m.setattr(batch.Batch, "step", broken)
        engine.step(jobs[:2], [])
    assert [(j, k) for j, k, _ in got] == [(jobs[0], "error"), (jobs[1], "error")]
    assert got[0][2]["status"] == 500 and "out of memory" in got[0][2]["error"]["message"]
    engine.step(jobs[2:], [])
    while engine.batch.busy:
        engine.step([], [])
    assert got[-1][0] is jobs[2] and got[-1][1] == "done"
