"""server.py through the real `openai` client and raw HTTP on loopback: replies equal chat.py's and
mixtral.generate's, errors have OpenAI's shape, concurrent clients all get their answers, a client
that leaves frees the server, and signals end it cleanly."""

import json
import random
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import httpx
import pytest

import chat
import mixtral
import runtime
from conftest import KEY, Server, assert_one_line_error, run_script

CONTEXT = 512


@pytest.fixture(scope="module")
def server(mlx_q8):
    s = Server(mlx_q8, "--max-context", CONTEXT)
    yield s
    code, log = s.stop()
    assert code == 143 and "Traceback" not in log, log


@pytest.fixture(scope="module")
def model(mlx_q8):
    return mixtral.load_model(mlx_q8)[0]


def greedy(model, tokenizer, ids, n):
    """The text of mixtral.generate's greedy ids after `ids`, up to EOS or n tokens."""
    out = []
    for y in islice(mixtral.generate(model, ids), n):
        if y == tokenizer.eos_id:
            break
        out.append(y)
    return tokenizer.decode(out)


def ask(server, messages, n, **kw):
    r = server.client.chat.completions.create(model="q8", messages=messages, max_tokens=n, temperature=0, **kw)
    return r


def test_a_reply_at_temperature_0_equals_generate_and_chat_py_streamed_or_not(server, model, tokenizer, mlx_q8):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    expected = greedy(model, tokenizer, chat.encode_messages(tokenizer, messages), 12)
    r = ask(server, messages, 12)
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(chat.encode_messages(tokenizer, messages))
    stream = server.client.chat.completions.create(
        model="q8", messages=messages, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    one_shot = run_script(
        "chat.py",
        "--model-path",
        mlx_q8,
        "--system-prompt",
        "",
        "--temp",
        0,
        "--max-tokens",
        12,
        "--prompt",
        messages[0]["content"],
    )
    assert one_shot.stdout == expected + "\n"


def test_a_conversation_resent_whole_equals_the_piped_chat_and_prefills_only_the_new_message(
    server, tmp_path, tokenizer, mlx_q8
):
    lines = ["Hi there.", "What is the weather like?", "And tomorrow?"]
    transcript = tmp_path / "t.json"
    piped = run_script(
        "chat.py",
        "--model-path",
        mlx_q8,
        "--system-prompt",
        chat.DEFAULT_SYSTEM_PROMPT,
        "--temp",
        0,
        "--max-tokens",
        10,
        stdin="\n".join(lines + [f"/save {transcript}"]) + "\n",
    )
    assert piped.returncode == 0, piped.stderr
    replies = [m["content"] for m in json.loads(transcript.read_text())["messages"] if m["role"] == "assistant"]
    messages, previous = [{"role": "system", "content": chat.DEFAULT_SYSTEM_PROMPT}], None
    for turn, line in enumerate(lines):
        messages.append({"role": "user", "content": line})
        r = ask(server, messages, 10)
        assert r.choices[0].message.content == replies[turn]
        if turn:  # the cache held every earlier token: only the new message was prefilled, and the EOS
            # that closes a reply cut off at max_tokens (never sampled, so never fed)
            new = len(chat.user_block(tokenizer, line)) + (previous.choices[0].finish_reason == "length")
            assert r.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - new
        previous = r
        messages.append({"role": "assistant", "content": r.choices[0].message.content})


def test_a_completion_equals_the_one_shot_cli(server, mlx_q8):
    r = server.client.completions.create(model="q8", prompt="Once upon a time", max_tokens=8, temperature=0)
    cli = run_script("mixtral.py", "--model-path", mlx_q8, "--prompt", "Once upon a time", "--max-tokens", 8)
    assert r.choices[0].text + "\n" == cli.stdout


def test_a_stop_string_cuts_the_reply_before_it(server, model, tokenizer):
    messages = [{"role": "user", "content": "Count for me."}]
    full = greedy(model, tokenizer, chat.encode_messages(tokenizer, messages), 16)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    r = ask(server, messages, 16, stop=[stop])
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_props_give_the_model_its_context_and_chat_py_defaults(server):
    props = server.http.get("/v1/props", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert props == {
        "model": "q8",
        "max_context": CONTEXT,
        "parallel": 16,
        "persona": chat.DEFAULT_SYSTEM_PROMPT,
        "layers": 2,
        "experts": 8,
        "experts_per_token": 2,
        "defaults": {"temperature": 0.7, "top_p": 0.9, "min_p": 0.0, "max_tokens": 1024},
    }


def test_experts_true_brings_the_router_choices_of_the_message_and_the_reply(server, tokenizer):
    messages = [{"role": "user", "content": "Which experts?"}]
    r = ask(server, messages, 6, extra_body={"experts": True})
    report = r.model_extra["experts"]
    assert report["ids"]["prompt"] == chat.encode_messages(tokenizer, messages)  # BOS and the first message
    assert tokenizer.decode(report["ids"]["reply"]) == r.choices[0].message.content
    for part in ("prompt", "reply"):
        n = len(report["ids"][part])
        assert [sum(layer[part]) for layer in report["layers"]] == [2 * n, 2 * n]  # top-2 of 8, per token
        assert [len(layer) for layer in report["choices"][part]] == [n, n]
    assert "experts" not in ask(server, messages, 2).model_extra  # only when asked


def test_a_session_is_found_only_by_its_own_name(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    for name in ("nothing-here", "..%2F..%2Fetc", "..", "%2Fetc%2Fpasswd"):
        r = server.http.get(f"/v1/sessions/{name}", headers=auth)
        assert r.status_code == 404 and r.json()["error"]["message"], (name, r.text)
    assert server.http.get("/v1/sessions").status_code == 401


BAD = {
    "malformed JSON": ({"content": b"{not json"}, 400, None),
    "wrong type": ({"body": {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}}, 400, None),
    "no messages": ({"body": {"model": "q8"}}, 400, None),
    "roles out of order": ({"body": {"messages": [{"role": "assistant", "content": "hi"}]}}, 400, None),
    "n of 2": ({"body": {"messages": [{"role": "user", "content": "hi"}], "n": 2}}, 400, None),
    "experts not a boolean": ({"body": {"messages": [{"role": "user", "content": "hi"}], "experts": "yes"}}, 400, None),
    "unknown model": (
        {"body": {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}},
        404,
        "model_not_found",
    ),
    "beyond the context": (
        {"body": {"messages": [{"role": "user", "content": "word " * CONTEXT}]}},
        400,
        "context_length_exceeded",
    ),
    "bad key": ({"body": {"messages": [{"role": "user", "content": "hi"}]}, "key": "wrong"}, 401, "invalid_api_key"),
    "too large": ({"content": b'{"messages": "' + b"x" * (5 * 2**20) + b'"}'}, 413, None),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_gets_an_openai_error_and_the_server_goes_on(server, case):
    request, status, code = BAD[case]
    r = server.post("/v1/chat/completions", **request)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] and (code is None or error["code"] == code), error
    assert server.http.get("/health").status_code == 200
    assert ask(server, [{"role": "user", "content": "still there?"}], 2).choices[0].message.content is not None


def test_32_concurrent_clients_each_get_their_own_answer(server, model, tokenizer):
    messages = [[{"role": "user", "content": f"Client number {i} says hello."}] for i in range(32)]
    expected = [greedy(model, tokenizer, chat.encode_messages(tokenizer, m), 4) for m in messages]
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(ask, server, m, 4) for m in messages]
        got = [f.result(timeout=180).choices[0].message.content for f in futures]
    assert got == expected


def test_a_client_that_leaves_mid_stream_frees_the_server_at_once(server):
    body = {"messages": [{"role": "user", "content": "Talk forever."}], "max_tokens": 100000, "stream": True}
    with server.http.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        for _ in islice(r.iter_lines(), 6):  # a few tokens streamed
            pass
    # Left: the next request must not wait for 100000 tokens.
    tic = time.monotonic()
    ask(server, [{"role": "user", "content": "Next."}], 2)
    assert time.monotonic() - tic < 15


@pytest.mark.parametrize(
    "sig, code, says",
    [(signal.SIGTERM, 143, runtime.TERMINATED_ALONE), (signal.SIGINT, 130, "interrupted: the server stopped")],
    ids=["SIGTERM", "SIGINT"],
)
def test_a_signal_ends_the_streams_with_an_error_event_and_the_server_quietly(mlx_q8, sig, code, says):
    s = Server(mlx_q8)
    body = {"messages": [{"role": "user", "content": "Talk forever."}], "max_tokens": 100000, "stream": True}
    events = []
    with s.http.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
                if len(events) == 3:
                    s.proc.send_signal(sig)
                    break
        events += [line for line in lines if line.startswith("data: ")]
    assert '"error"' in events[-1] and "shutting down" in events[-1], events[-3:]
    s.proc.wait(timeout=30)  # on its own: no second signal
    returncode, log = s.stop()
    assert returncode == code and "Traceback" not in log and log.splitlines()[-1] == says, log


def test_a_port_in_use_is_a_one_line_error(mlx_q8):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = run_script("server.py", "--model-path", mlx_q8, "--port", taken.getsockname()[1])
    assert_one_line_error(r, "cannot listen on 127.0.0.1:", "--port")


def test_a_connection_the_server_accepts_sends_each_streamed_token_at_once():
    # TCP_NODELAY on the listener, inherited by what it accepts: with Nagle's algorithm a streamed token
    # may wait for the client's delayed ACK of the one before (up to 40 ms a token over a network).
    import server as module

    listener = module.listen("127.0.0.1", 0)
    with listener, socket.create_connection(listener.getsockname()):
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


# --------------------------------------------------------------------------- other web pages


@pytest.fixture(scope="module")
def keyless(mlx_q8):
    """A server as started with defaults (no key, 127.0.0.1), plus a LAN name and a CORS origin."""
    s = Server(mlx_q8, "--max-context", CONTEXT, "--allowed-host", "mixtral.lan", "--cors-origin", CORS, key=None)
    yield s
    s.stop()


CORS = "https://chat.example"
HELLO = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()


def generations(server) -> int:
    return server.http.get("/health").json()["generations"]


def send(server, headers, path="/v1/chat/completions", body=HELLO) -> httpx.Response:
    """A POST with exactly these headers (httpx adds Host and Content-Length unless given)."""
    return server.http.post(path, content=body, headers=headers)


def refused_before_any_work(server, headers, status, code, **kw):
    """The request gets `status` in OpenAI's shape, and the model runs nothing for it (a request that
    passes the same way runs once: the count is live)."""
    before = generations(server)
    r = send(server, headers, **kw)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    assert generations(server) == before
    ok = send(server, {"Content-Type": "application/json"})
    assert ok.status_code == 200 and generations(server) == before + 1, ok.text


def test_a_cross_site_simple_post_is_refused_before_any_work(keyless):
    # What any page can send with fetch() or a form, no preflight: text/plain from another origin. It ran
    # a generation and answered 200.
    refused_before_any_work(
        keyless, {"Content-Type": "text/plain", "Origin": "http://evil.example"}, 403, "origin_not_allowed"
    )


@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_a_post_whose_body_is_not_declared_json_gets_415_before_any_work(keyless, kind):
    refused_before_any_work(keyless, {"Content-Type": kind} if kind else {}, 415, "unsupported_media_type")


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.evil.example", "localhost.evil"])
def test_a_host_header_that_names_another_server_gets_403_before_any_work(keyless, host):
    # DNS rebinding (Ollama's CVE-2024-28224): a page on evil.example whose name now points at 127.0.0.1
    # is same-origin to the browser; only its Host header gives it away.
    refused_before_any_work(keyless, {"Host": host, "Content-Type": "application/json"}, 403, "host_not_allowed")
    assert keyless.http.get("/v1/models", headers={"Host": host}).status_code == 403


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost:{port}", "LOCALHOST", "[::1]:{port}", "mixtral.lan:80"])
def test_this_machines_names_and_an_allowed_host_are_served(keyless, host):
    port = keyless.url.split(":")[-1].split("/")[0]
    r = send(keyless, {"Host": host.format(port=port), "Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None, r.text


def test_the_servers_own_page_and_the_cors_origin_are_served_and_others_refused(keyless):
    own = keyless.url.removesuffix("/v1")  # what a browser sends on a page this server served
    for origin, status in ((own, 200), (CORS, 200), ("http://evil.example", 403), ("null", 403)):
        r = send(keyless, {"Origin": origin, "Content-Type": "application/json"})
        assert r.status_code == status, (origin, r.text)
    preflight = keyless.http.options(
        "/v1/chat/completions",
        headers={
            "Origin": CORS,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == CORS


def test_curl_and_the_openai_client_still_work(keyless):
    # Neither sends an Origin; curl sends Host 127.0.0.1:PORT, as README's example does.
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "60", f"{keyless.url}/chat/completions", "-H", "Content-Type: application/json"]
        + ["-d", HELLO.decode()],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert json.loads(out.stdout)["choices"][0]["message"]["content"] is not None, out.stdout + out.stderr
    assert ask(keyless, [{"role": "user", "content": "hi"}], 2).choices[0].message.content is not None


# --------------------------------------------------------------------------- many clients at once


@pytest.fixture(scope="module")
def serial(mlx_q8):
    """The same server deciding one request at a time (--parallel 1), as before batching."""
    s = Server(mlx_q8, "--max-context", CONTEXT, "--parallel", 1)
    yield s
    s.stop()


def reply(server, body) -> tuple:
    """-> (text, finish_reason) of a request, streamed or whole."""
    if not body.get("stream"):
        r = server.post("/v1/chat/completions", body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], r.json()["choices"][0]["finish_reason"]
    text, finish = "", None
    with server.http.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]", events[-2:]
    for event in events[:-1]:
        choice = json.loads(event[6:])["choices"][0]
        text += choice["delta"].get("content") or ""
        finish = choice["finish_reason"] or finish
    return text, finish


def mixed_requests(n, seed=0):
    """Greedy and seeded sampling, short and long prompts, stop strings, budgets, streamed or not,
    conversations that continue each other's first message (cache hits) and ones that do not."""
    rng = random.Random(seed)
    bodies = []
    for i in range(n):
        words = " ".join(
            rng.choice(["sea", "sky", "why", "no", "stone", "later"]) for _ in range(rng.choice([1, 5, 60]))
        )
        messages = [{"role": "user", "content": f"Topic {i % 3}."}]
        if i % 2:
            messages += [{"role": "assistant", "content": "Fine."}, {"role": "user", "content": words}]
        body = {"messages": messages, "max_tokens": rng.choice([1, 4, 12, 30]), "stream": bool(i % 3 == 1)}
        body |= {"temperature": 0} if i % 4 < 2 else {"temperature": 0.9, "top_p": 0.9, "seed": rng.randrange(100)}
        if i % 5 == 4:
            body["stop"] = [rng.choice(["a", "e", " t"])]
        bodies.append(body)
    return bodies


def test_requests_decoded_together_get_the_replies_each_gets_alone_at_parallel_1(server, serial):
    bodies = mixed_requests(16)
    alone = [reply(serial, body) for body in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda body: reply(server, body), bodies, timeout=240))
    assert together == alone


def test_a_seeded_sampled_reply_equals_chat_py_with_that_seed(server, mlx_q8):
    message = "Say something random."
    body = {"messages": [{"role": "user", "content": message}], "max_tokens": 12, "temperature": 0.8, "top_p": 0.9}
    with ThreadPoolExecutor(4) as pool:  # among others
        others = [pool.submit(reply, server, {**body, "seed": s}) for s in (1, 2, 3)]
        text, _ = reply(server, {**body, "seed": 7})
        [f.result(timeout=120) for f in others]
    flags = ["--system-prompt", "", "--temp", 0.8, "--top-p", 0.9, "--seed", 7, "--max-tokens", 12]
    # Bytes: text mode would turn a reply's carriage return into a newline (this one has one).
    r = run_script("chat.py", "--model-path", mlx_q8, *flags, "--prompt", message, text=False)
    assert r.stdout.decode() == text + "\n"


def test_a_reply_reads_as_its_generated_ids_in_any_conversation_warm_or_cold(server, model, tokenizer):
    # A reply's text need not re-encode to the ids it was generated as: the conversation that made it
    # keeps them, and since batching so does every other conversation (a cold one included).
    first = [{"role": "user", "content": "Make up a word 0."}]
    r = ask(server, first, 16, extra_body={"experts": True})
    ids = r.model_extra["experts"]["ids"]["reply"]
    text = r.choices[0].message.content
    assert tokenizer.encode(text, bos=False) != ids  # else this test proves nothing: pick another message
    later = [{"role": "user", "content": "Another topic entirely."}, {"role": "assistant", "content": text}]
    later.append({"role": "user", "content": "Go on."})
    with_ids = [*later[:1], {**later[1], "tokens": ids}, later[2]]
    expected = greedy(model, tokenizer, chat.encode_messages(tokenizer, with_ids), 8)
    assert expected != greedy(model, tokenizer, chat.encode_messages(tokenizer, later), 8)  # else: another message
    assert ask(server, later, 8).choices[0].message.content == expected


def test_32_clients_some_leaving_mid_reply_each_get_one_whole_answer_and_memory_returns(mlx_q8):
    s = Server(mlx_q8, "--max-context", CONTEXT, "--cache-gb", 0.001)  # one kept conversation at most
    try:
        rss = lambda: int(
            next(line for line in open(f"/proc/{s.proc.pid}/status") if line.startswith("VmRSS")).split()[1]
        )
        reply(s, {"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 30})
        idle = rss()

        def client(i):
            body = {"messages": [{"role": "user", "content": f"Client {i}."}], "max_tokens": 40, "stream": True}
            events = []
            with s.http.stream(
                "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        if i % 4 == 3 and len(events) == 3:  # this one leaves mid-reply
                            return i, None
            ids = {json.loads(e[6:])["id"] for e in events[:-1]}
            return i, (events[-1], sum('"finish_reason": null' not in e for e in events[:-1]), ids)

        with ThreadPoolExecutor(32) as pool:
            results = dict(pool.map(client, range(32), timeout=240))
        for i, result in results.items():
            if i % 4 != 3:
                last, finals, ids = result
                assert last == "data: [DONE]" and finals == 1 and len(ids) == 1, result
        deadline = time.monotonic() + 30
        while (h := s.http.get("/health").json())["running"] + h["queued"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert h["running"] == h["queued"] == 0 and h["generations"] == 33, h
        assert rss() < idle * 1.1 + 30_000, (idle, rss())  # kB: back to the idle level, give or take
    finally:
        s.stop()


def test_a_sigterm_ends_every_stream_in_flight_with_its_final_event(mlx_q8):
    s = Server(mlx_q8, "--parallel", 4)
    body = {"messages": [{"role": "user", "content": "Talk forever."}], "max_tokens": 100000, "stream": True}

    def client(_):
        with s.http.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
            return [line for line in r.iter_lines() if line.startswith("data: ")]

    with ThreadPoolExecutor(6) as pool:  # 4 decoding, 2 waiting for room
        streams = [pool.submit(client, i) for i in range(6)]
        deadline = time.monotonic() + 60
        while s.http.get("/health").json()["running"] < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.http.get("/health").json()["queued"] == 2
        s.proc.send_signal(signal.SIGTERM)
        for f in streams:
            events = f.result(timeout=60)
            assert '"error"' in events[-1] and "shutting down" in events[-1], events[-3:]
    returncode, log = s.stop()
    assert returncode == 143 and "Traceback" not in log, log
