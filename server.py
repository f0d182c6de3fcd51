"""An OpenAI-compatible HTTP server for Mixtral-Instruct: chat.py's exact format, and the KV caches of
recent conversations kept, so that a client resending the whole conversation prefills only what is new.

    python server.py --model-path mlx_model --port 8080
    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hi!"}]}'

Two threads. The main thread owns MLX: it loads the model and decodes up to --parallel requests together
(batch.py), each on its chat.Chat, the others waiting in arrival order (MLX streams belong to the thread
that made them, and the model is not thread-safe). A second thread runs the HTTP server (Starlette on uvicorn): it checks requests, queues
them (a bounded queue: 503 when full) and streams what the main thread produces. Ctrl-C and SIGTERM
reach the main thread: in-flight streams get a final error event, and the program exits 130 or 143.
"""

import signal

if __name__ == "__main__":  # Ctrl-C during the imports below ends the program quietly; run_program() takes over after
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import queue
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

import batch
import chat
import grammar
import machine
import mixtral
import parallel
import runtime
import sessions
from runtime import MixtralError

WEB = Path(__file__).resolve().parent / "web"  # the chat page (README: Chat in the browser)
# Every answer: the page may run only its own files (no inline script or style), load nothing from
# elsewhere, be framed by no one, and send no Referer; browsers must not guess content types.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        b"object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
MAX_BODY = 4 * 2**20  # bytes of one request: a 32k-token conversation is about 150 KB of text
MAX_STOP = 4  # stop strings per request, as OpenAI allows
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # names that always mean this machine


# --------------------------------------------------------------------------- requests


class BadRequest(Exception):
    """A request we refuse: OpenAI's error shape with this status, type and code."""

    def __init__(self, message, status=400, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def response(self) -> JSONResponse:
        error = {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


@dataclass(eq=False)  # each job is itself: kept in a set while its answer is open
class Job:
    """One request on its way through the queue: what to generate, and where its events go."""

    kind: str  # "chat" or "completion"
    prompt: object  # messages, or the raw prompt text
    max_tokens: Optional[int]
    temp: float
    top_p: float
    min_p: float
    stop: List[str]
    seed: Optional[int]
    experts: bool = False  # the final chunk carries the experts the router chose (as /experts FILE writes)
    rules: Optional[str] = None  # the grammar response_format asks for (rank 0's alone: its draw is every rank's)
    constraint: Optional["grammar.Constraint"] = None  # its state along the reply, made before the job is queued
    events: asyncio.Queue = None
    loop: asyncio.AbstractEventLoop = None
    cancelled: bool = False  # the client left: stop within a step
    sequence: Optional["batch.Sequence"] = None  # its place in the batch, once started

    def send(self, kind, value=None):
        """From the main thread: an event for the request's handler ("text", "done" or "error"); none
        on a rank other than 0."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    FIELDS = ("kind", "prompt", "max_tokens", "temp", "top_p", "min_p", "stop", "seed", "experts")

    def describe(self) -> dict:
        """The job as rank 0 sends it to the other ranks."""
        return {k: getattr(self, k) for k in self.FIELDS}

    def refuse(self, e: "BadRequest"):
        error = {"message": str(e), "type": e.kind, "param": e.param, "code": e.code}
        self.send("error", {"error": error, "status": e.status})

    def finish(self, s: "batch.Sequence", prompt_tokens: int, experts: Optional[dict]):
        """The final event: why the reply ended, OpenAI's usage, and the speeds the server measured (the
        web page shows them)."""
        reply = mixtral.Reply(ids=s.ids, prompt_tokens=s.prompt_tokens, ttft=s.ttft, elapsed=s.elapsed)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(s.ids),
            "total_tokens": prompt_tokens + len(s.ids),
            "prompt_tokens_details": {"cached_tokens": prompt_tokens - s.prompt_tokens},
            "timings": {
                "first_token_s": round(reply.ttft, 4),
                "prompt_per_second": round(reply.prompt_tps, 2),
                "reply_per_second": round(reply.gen_tps, 2),
            },
        }
        done = {"finish_reason": "length" if s.finish_reason == "length" else "stop", "usage": usage}
        self.send("done", done | ({"experts": experts} if experts else {}))


def number(body, name, default, low, high, integer=False, low_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if (
        not isinstance(value, kinds)
        or isinstance(value, bool)
        or not (low < value if low_open else low <= value)
        or value > high
    ):
        what = "an integer" if integer else "a number"
        raise BadRequest(
            f"'{name}' must be {what} in {'(' if low_open else '['}{low}, {high}], got {value!r}", param=name
        )
    return value


def text_content(content, i):
    """A message's content: a string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")


def parse_job(body, kind: str, model_name: str, system_prompt: str) -> Job:
    """Check a request body as OpenAI does, -> Job; BadRequest says what is wrong, and where."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if body.get("model") not in (None, model_name):
        raise BadRequest(
            f"the model {body['model']!r} does not exist; this server has {model_name!r} (GET /v1/models)",
            status=404,
            param="model",
            code="model_not_found",
        )
    if body.get("n", 1) not in (1, None):
        raise BadRequest("only n = 1 is supported: one reply per request", param="n")
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("'stream' must be true or false", param="stream")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) and s for s in stop)):
        raise BadRequest(f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise BadRequest("'seed' must be an integer", param="seed")
    if not isinstance(body.get("experts", False), bool):
        raise BadRequest("'experts' must be true or false", param="experts")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    job = Job(
        kind=kind,
        prompt=None,
        max_tokens=number({"max_tokens": limit}, "max_tokens", None, 1, 2**31, integer=True),
        temp=number(body, "temperature", 1.0, 0, 2),
        top_p=number(body, "top_p", 1.0, 0, 1, low_open=True),
        min_p=number(body, "min_p", 0.0, 0, 1),
        stop=stop,
        seed=seed,
        experts=body.get("experts", False),
    )
    try:
        job.rules = grammar.compile_format(body.get("response_format"))
    except grammar.FormatError as e:
        raise BadRequest(str(e), param="response_format", code="invalid_response_format") from None
    if kind == "completion":
        if not isinstance(body.get("prompt"), str):
            raise BadRequest("'prompt' must be a string", param="prompt")
        job.prompt = body["prompt"]
        return job
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(
                f"messages[{i}] must be an object with a role of system, user or assistant", param=f"messages[{i}]"
            )
    messages = [{"role": m["role"], "content": text_content(m.get("content"), i)} for i, m in enumerate(messages)]
    if messages[0]["role"] != "system" and system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    try:
        _, turns = chat.split_system(messages)
    except MixtralError as e:
        raise BadRequest(str(e), param="messages") from None
    if not turns or turns[-1]["role"] != "user":
        raise BadRequest("the last message must be the user's", param="messages")
    job.prompt = messages
    return job


# --------------------------------------------------------------------------- the engine (main thread)


class Engine:
    """The model, a batch of replies decoding together (batch.Batch), and the conversations whose caches
    we keep (chat.Chat, least recently used first). Running and kept caches together are bounded by
    `cache_bytes`. A request continues the kept conversation that shares the longest prefix of its
    tokens, or a new one; a reply's text names the ids it was generated as in every conversation
    (`replies`), so a warm and a cold server answer alike."""

    REPLIES = 4096  # replies whose ids we remember by their text

    def __init__(self, model, tokenizer, max_context: int, cache_bytes: int, reuse: bool = True, size: int = 1):
        self.model, self.tokenizer, self.max_context = model, tokenizer, max_context
        self.cache_bytes, self.reuse = cache_bytes, reuse
        self.chats: "OrderedDict[int, chat.Chat]" = OrderedDict()
        self.replies: "OrderedDict[str, List[int]]" = OrderedDict()
        self.batch = batch.Batch(model, tokenizer.eos_id, size)
        self.serial = 0
        self.jobs: "OrderedDict[int, Job]" = OrderedDict()  # running or waiting, by the number every rank gives them
        self.generations = 0  # requests run, for /health (and the tests that prove a refused one never ran)

    def step(self, new: List[Job], stop: List[int]):
        """Start the new jobs, stop those numbered (their clients left), run one step of the batch. Every
        rank calls it with rank 0's jobs and numbers, and so runs the same batch."""
        for job in new:
            try:
                self.start(job)
            except MixtralError as e:  # this request's own fault: the others go on
                job.refuse(BadRequest(str(e)))
        for n in stop:
            if n in self.jobs:
                self.batch.stop(self.jobs[n].sequence)
        if self.batch.busy:
            try:
                self.batch.step()
            except MixtralError as e:  # e.g. out of memory: every running request gets it; the server goes on
                self.drop_all(e)
        if not self.batch.busy:
            mx.clear_cache()  # what the replies and a dropped conversation held goes back to the system

    def drop_all(self, e: Exception):
        """End every request in the batch with e, their conversations dropped (a step broken off half-way
        leaves their caches unknown)."""
        for job in self.jobs.values():
            job.refuse(BadRequest(str(e), status=500, kind="server_error"))
        self.jobs.clear()
        self.batch = batch.Batch(self.model, self.tokenizer.eos_id, self.batch.size)

    def cancelled(self) -> List[int]:
        return [n for n, job in self.jobs.items() if job.cancelled]

    def start(self, job: Job):
        """Queue job's sequence in the batch; a refusal (the prompt does not fit) is its answer at once."""
        self.generations += 1
        number = self.generations  # the same on every rank
        prompt = job.prompt if job.kind == "chat" else self.tokenizer.encode(job.prompt)
        c = self._conversation(prompt)
        c.max_tokens = job.max_tokens or chat.DEFAULT_MAX_TOKENS
        block, content = c.prepare(prompt)
        n = len(c.tokens) + len(block)
        if n >= self.max_context:
            c.settle(block, content, None)
            self._keep(c)
            return job.refuse(
                BadRequest(
                    f"the prompt has {n} tokens, and this server's context is {self.max_context} (--max-context): "
                    "send fewer or shorter messages",
                    param="messages" if job.kind == "chat" else "prompt",
                    code="context_length_exceeded",
                )
            )
        text, stops, hit = self.tokenizer.text_stream(), StopStrings(job.stop), False

        def on_token(y):
            nonlocal hit
            piece, hit = stops.feed(text.push(y))
            if piece:
                job.send("text", piece)
            return "stop" if hit else None

        def on_end(s: batch.Sequence):
            nonlocal hit
            del self.jobs[number]
            if not hit:  # what the text held back, as the reply's last piece
                piece, hit = stops.feed(text.flush())
                if piece := piece if hit else piece + stops.flush():
                    job.send("text", piece)
                s.finish_reason = "stop" if hit else s.finish_reason
            c.settle(block, content, s.ids if s.started else None)
            experts = None
            if job.experts and s.started:
                c.keep_experts(s.choices(), s.prompt_tokens - len(block), block if content else None, s.ids)
                experts = chat.experts_report(c.experts, self.model.args.moe.num_experts)
            if s.started:
                self._remember(c.turns[-1])
                job.finish(s, n, experts)
            self._keep(c)

        job.sequence = batch.Sequence(
            c.cache,
            c.tokens[c.fed :] + block,
            c.budget(block),
            on_token,
            on_end,
            job.temp,
            job.top_p,
            job.min_p,
            job.seed,
            job.experts,
            job.constraint,
        )
        self.jobs[number] = job
        self.batch.add(job.sequence)

    def _remember(self, turn: "chat.Turn"):
        self.replies[turn.content] = turn.ids
        self.replies.move_to_end(turn.content)
        if len(self.replies) > self.REPLIES:
            self.replies.popitem(last=False)

    def _conversation(self, prompt) -> "chat.Chat":
        """The kept conversation whose cache holds most of this prompt (taken out of the store; the most
        recent of equals), or a new one."""
        best, shared = None, 0
        for key, c in self.chats.items() if self.reuse else ():
            if (n := c.shared_prefix(prompt)) >= shared and n > 0:
                best, shared = key, n
        if best is not None:
            return self.chats.pop(best)
        c = chat.Chat(self.model, self.tokenizer, system="", max_context=self.max_context, seed=0)
        c.known_ids = self.replies.get
        return c

    def _keep(self, c: "chat.Chat"):
        """Keep c as the most recent conversation; drop the least recent ones while the kept and the
        running caches pass cache_bytes."""
        if not self.reuse:
            return
        self.serial += 1
        self.chats[self.serial] = c
        running = sum(job.sequence.cache_bytes() for job in self.jobs.values())
        while len(self.chats) > 1 and running + sum(x.cache_bytes() for x in self.chats.values()) > self.cache_bytes:
            self.chats.popitem(last=False)


class StopStrings:
    """Text let through until one of the stop strings appears; what could be the start of one is held."""

    def __init__(self, stops: List[str]):
        self.stops, self.held = stops, ""

    def feed(self, piece: str):
        """-> (text safe to send, whether a stop string was found)."""
        if not self.stops:
            return piece, False
        self.held += piece
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            text, self.held = self.held[: min(hits)], ""
            return text, True
        keep = max(len(s) - 1 for s in self.stops)
        cut = max(0, len(self.held) - keep)
        text, self.held = self.held[:cut], self.held[cut:]
        return text, False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


# --------------------------------------------------------------------------- HTTP (the server thread)


def error_event(message: str) -> str:
    return (
        f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
    )


class Guard:
    """Keeps other web pages out, before any other work (the outermost ASGI middleware). A page the user
    visits can send requests to 127.0.0.1 from their browser:
    - a "simple" cross-site POST (Content-Type text/plain) goes without asking first (no CORS preflight):
      so a POST must say application/json (415), and on /v1 a request whose Origin is neither this
      server's own nor --cors-origin is refused (403). Clients that send no Origin (curl, SDKs) pass;
    - a page whose name it rebinds to 127.0.0.1 (DNS rebinding) is same-origin to the browser and can
      read the answers; its requests carry its own name in Host, so Host must name this server (403).
    Every answer, refusals included, carries SECURITY_HEADERS.
    """

    def __init__(self, app, listen_host: str, allowed_hosts: List[str], cors_origin: Optional[str]):
        self.app, self.cors_origin = app, cors_origin
        self.hosts = {bare_host(h) for h in (*LOOPBACK, listen_host, *allowed_hosts)}
        # Listening on every address: any address may name it (a rebinding page can only send a name).
        self.any_address = listen_host in ("0.0.0.0", "::", "")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_guarded(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        if refusal := self.refusal(scope):
            return await refusal.response()(scope, receive, send_guarded)
        await self.app(scope, receive, send_guarded)

    def refusal(self, scope) -> Optional[BadRequest]:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if not self.names_us(bare_host(host)):
            return BadRequest(
                f"the Host header {host[:100]!r} does not name this server; to serve that name, start it with "
                "--allowed-host NAME",
                status=403,
                code="host_not_allowed",
            )
        origin = headers.get("origin")
        own = origin is not None and origin.partition("://")[2].lower() == host.lower()
        if origin is not None and scope["path"].startswith("/v1/") and not own and origin != self.cors_origin:
            return BadRequest(
                f"requests from the web page at {origin[:100]!r} are refused: only this server's own page, or the "
                "origin given with --cors-origin, may use /v1",
                status=403,
                code="origin_not_allowed",
            )
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if scope["method"] == "POST" and media != "application/json":
            return BadRequest(
                f"the body must be JSON: send Content-Type: application/json (got {media[:100] or 'none'!r})",
                status=415,
                code="unsupported_media_type",
            )
        return None

    def names_us(self, host: str) -> bool:
        if host in self.hosts:
            return True
        try:
            return self.any_address and bool(ipaddress.ip_address(host))
        except ValueError:
            return False


def bare_host(host: str) -> str:
    """A Host header or a host name without its port, brackets or final dot, lowercase: `[::1]:8080` -> `::1`."""
    host = host.strip().lower()
    host = host[1:].partition("]")[0] if host.startswith("[") else host if host.count(":") > 1 else host.split(":")[0]
    return host.rstrip(".")


class Api:
    """The HTTP side: checks each request, queues it for the main thread, and answers with what comes back."""

    def __init__(
        self,
        model_name: str,
        jobs: "queue.Queue[Job]",
        api_key: Optional[str],
        system_prompt: str,
        counts,
        props: Optional[dict] = None,
        webui: bool = True,
        tokenizer=None,
    ):
        self.model_name, self.jobs, self.api_key, self.system_prompt = model_name, jobs, api_key, system_prompt
        self.counts = counts  # -> {"running", "waiting", "generations"}: sequences in the batch, requests run (/health)
        self.props, self.webui = {"model": model_name, **(props or {})}, webui
        self.created = int(time.time())
        self.tokenizer = tokenizer  # for response_format's grammars
        self.open: set = set()  # jobs whose answer is not yet written out whole (queued, running or sending)

    def app(self, listen_host: str, allowed_hosts: List[str], cors_origin: Optional[str]) -> Starlette:
        routes = [
            Route("/health", self.health),
            Route("/v1/models", self.models),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/props", self.get_props),
            Route("/v1/sessions", self.sessions),
            Route("/v1/sessions/{name}", self.session),
        ]
        if self.webui:  # the page and its files, no key needed; last, so that /v1 comes first
            routes.append(Mount("/", StaticFiles(directory=WEB, html=True)))
        middleware = [Middleware(Guard, listen_host=listen_host, allowed_hosts=allowed_hosts, cors_origin=cors_origin)]
        if cors_origin:
            middleware.append(
                Middleware(
                    CORSMiddleware,
                    allow_origins=[cors_origin],
                    allow_methods=["GET", "POST"],
                    allow_headers=["Authorization", "Content-Type"],
                )
            )
        return Starlette(
            routes=routes,
            middleware=middleware,
            exception_handlers={404: self.not_found, 405: self.not_allowed},
        )

    def constrain(self, rules: str) -> "grammar.Constraint":
        try:
            return grammar.Constraint(self.tokenizer, rules)
        except (grammar.FormatError, MixtralError) as e:
            raise BadRequest(str(e), param="response_format", code="invalid_response_format") from None

    async def not_found(self, request, exc):
        return BadRequest(f"no such endpoint: {request.method} {request.url.path}", status=404).response()

    async def not_allowed(self, request, exc):
        return BadRequest(f"{request.method} is not allowed on {request.url.path}", status=405).response()

    async def health(self, request):
        counts = self.counts()
        queued = self.jobs.qsize() + counts.pop("waiting")
        return JSONResponse({"status": "ok", "running": counts["running"], "queued": queued, **counts})

    async def models(self, request):
        if refused := self.refused(request):
            return refused
        model = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "mixtral-mlx"}
        return JSONResponse({"object": "list", "data": [model]})

    async def get_props(self, request):
        """What a client (the web page) needs to know: the model's shape, context and defaults."""
        return self.refused(request) or JSONResponse(self.props)

    async def sessions(self, request):
        """The named sessions that chat.py --session saved (read only: chat.py holds a session's lock)."""
        return self.refused(request) or JSONResponse({"object": "list", "data": sessions.session_rows()})

    async def session(self, request):
        if refused := self.refused(request):
            return refused
        name = request.path_params["name"]
        if (data := sessions.read_session(name)) is None:
            return BadRequest(f"no saved session named {name[:100]!r} (GET /v1/sessions lists them)", 404).response()
        return JSONResponse({"name": name, **data})

    def refused(self, request) -> Optional[JSONResponse]:
        """401 unless the request carries the key (compared in constant time)."""
        if self.api_key is None:
            return None
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if hmac.compare_digest(given.encode(), self.api_key.encode()):
            return None
        return BadRequest(
            "invalid API key (send Authorization: Bearer KEY)",
            status=401,
            code="invalid_api_key",
            kind="authentication_error",
        ).response()

    async def chat_completions(self, request):
        return await self.serve(request, "chat")

    async def completions(self, request):
        return await self.serve(request, "completion")

    async def serve(self, request: Request, kind: str):
        if refused := self.refused(request):
            return refused
        try:
            body = await read_json(request)
            job = parse_job(body, kind, self.model_name, self.system_prompt)
            if job.rules:  # the grammar's matcher (up to a second for a large schema): not on the model's thread
                job.constraint = await asyncio.to_thread(self.constrain, job.rules)
        except BadRequest as e:
            return e.response()
        job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
        self.open.add(job)  # before the main thread can see it: end_all must miss no job
        try:
            response = await self.respond(request, body, job)
        except BaseException:
            self.open.discard(job)
            raise

        async def written(scope, receive, send):
            try:
                await response(scope, receive, send)
            finally:
                self.open.discard(job)  # written out to its last byte, or the client left

        return written

    async def respond(self, request: Request, body: dict, job: Job):
        """Queue the job; its answer, streamed or whole."""
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            return BadRequest(
                "the server is busy: too many requests are waiting; try again shortly",
                status=503,
                kind="server_error",
                code="queue_full",
            ).response()
        answer = Answer(job, self.model_name)
        if body.get("stream"):
            usage = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage") is True
            return StreamingResponse(
                answer.stream(usage), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return await answer.whole(request)

    def end_all(self, why: str, wait: float = 3.0):
        """Give every request not yet answered whole its final error event (an error answer, if not
        streamed), and wait until they are written out, at most `wait` seconds. From any thread: the
        main thread when it stops serving, or runtime's exit path whatever ends the process (a SIGTERM
        that cut into that, the watcher's forced exit), so that no client's stream ends mid-chunk."""
        live = [job for job in list(self.open) if not job.loop.is_closed()]
        for job in live:
            with contextlib.suppress(RuntimeError):  # its loop closed meanwhile: nothing left to write
                job.send("error", f"the server is shutting down ({why})")
        end = time.monotonic() + wait
        while any(job in self.open and not job.loop.is_closed() for job in live) and time.monotonic() < end:
            time.sleep(0.01)


class Answer:
    """What one request gets back, from its job's events: server-sent events in OpenAI's chunk format, or
    one JSON answer. However it ends (done, or the client left), its job is cancelled."""

    def __init__(self, job: Job, model_name: str):
        self.job, self.model_name = job, model_name
        self.ident = f"{'chatcmpl' if job.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"

    def chunk(self, text=None, finish=None, role=False) -> dict:
        job, ident, created, model = self.job, self.ident, int(time.time()), self.model_name
        if job.kind == "chat":
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [choice],
            }
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"id": ident, "object": "text_completion", "created": created, "model": model, "choices": [choice]}

    async def stream(self, include_usage: bool):
        """Server-sent events in OpenAI's chunk format, ending with [DONE]. A client that leaves cancels the job."""
        job = self.job
        try:
            if job.kind == "chat":
                yield f"data: {json.dumps(self.chunk('', role=True))}\n\n"
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    yield f"data: {json.dumps(self.chunk(value))}\n\n"
                elif kind == "error":
                    yield error_event(
                        value.get("error", {}).get("message", "error") if isinstance(value, dict) else value
                    )
                    return
                else:
                    final = self.chunk(finish=value["finish_reason"])
                    if "experts" in value:
                        final["experts"] = value["experts"]
                    yield f"data: {json.dumps(final)}\n\n"
                    if include_usage:
                        final = self.chunk() | {"choices": [], "usage": value["usage"]}
                        yield f"data: {json.dumps(final)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        finally:
            job.cancelled = True  # done, or the client left (the generator is closed): stop generating

    async def whole(self, request: Request):
        """One JSON answer; a client that leaves before it cancels the job."""
        job, parts = self.job, []
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "text":
                    parts.append(value)
                elif kind == "error":
                    if isinstance(value, dict):
                        return JSONResponse(value, status_code=value.pop("status", 500))
                    return JSONResponse(
                        {"error": {"message": value, "type": "server_error", "param": None, "code": None}},
                        status_code=503,
                    )
                else:
                    break
        finally:
            job.cancelled = True
        text, created = "".join(parts), int(time.time())
        if job.kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": value["finish_reason"],
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": value["finish_reason"]}
            obj = "text_completion"
        answer = {
            "id": self.ident,
            "object": obj,
            "created": created,
            "model": self.model_name,
            "choices": [choice],
            "usage": value["usage"],
        }
        return JSONResponse(answer | ({"experts": value["experts"]} if "experts" in value else {}))


async def read_json(request: Request):
    """The body as JSON, refused past MAX_BODY bytes (413) without reading more of it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise BadRequest(f"the body is larger than {MAX_BODY} bytes", status=413, code="request_too_large")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > MAX_BODY:
            raise BadRequest(f"the body is larger than {MAX_BODY} bytes", status=413, code="request_too_large")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON ({e})") from None
    except RecursionError:
        raise BadRequest("the body nests too deeply to read (more than about 1000 levels)") from None


# --------------------------------------------------------------------------- the program


def build_parser():
    p = argparse.ArgumentParser(description="An OpenAI-compatible HTTP server for Mixtral-Instruct.")
    chat.add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 (default: none)")
    p.add_argument(
        "--max-context", type=int, help="tokens of prompt and reply (default: 32768, or what fits in memory)"
    )
    p.add_argument("--system-prompt", default="", help="persona for conversations that bring none (default: none)")
    p.add_argument(
        "--parallel",
        type=int,
        help="replies decoded together, each the same as alone; more requests wait (default: 16, fewer when the "
        "caches would not fit; 1: one at a time)",
    )
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting at most; more get 503 (default: %(default)s)"
    )
    p.add_argument(
        "--cache-gb", type=float, help="KV caches of recent conversations kept, in GB (default: half of what fits)"
    )
    p.add_argument("--no-cache-reuse", action="store_true", help="prefill every request whole (to measure the reuse)")
    p.add_argument("--no-webui", action="store_true", help="serve no chat page at / (only the API)")
    p.add_argument("--cors-origin", help="allow browser pages from this origin (default: no CORS)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host header is NAME: a reverse proxy's or a LAN name (repeatable; default: "
        "127.0.0.1, localhost, [::1] and --host)",
    )
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    runtime.quiet_unless_rank0()
    runtime.run_program(run, args, interrupted="interrupted: the server stopped")


def run(args):
    if args.max_context is not None and args.max_context < 16:
        raise MixtralError("--max-context must be at least 16 tokens")
    if args.parallel is not None and args.parallel < 1:
        raise MixtralError("--parallel must be at least 1")
    if args.max_queue < 1:
        raise MixtralError("--max-queue must be at least 1")
    log = lambda s: print(s, file=sys.stderr, flush=True)
    rank0 = mx.distributed.init().rank() == 0
    listener = listen(args.host, args.port) if rank0 else None  # a port in use is refused before loading
    model_path = chat.resolve_model(args.model_path, log, args.tokenizer)
    model, tokenizer = mixtral.load_model(model_path, args.dtype, shares=args.shares, kv_dtype=args.kv_dtype)
    group = model.group
    # What every rank can hold: each computes its own, the smallest counts (shares may be uneven).
    max_context = args.max_context or parallel.least(machine.default_context(model), group)
    machine.check_memory(model, max_context, "--max-context", model_path)
    # The caches kept, in tokens that every rank can hold: the ranks then drop the same conversations.
    kv = machine.rank_kv_bytes_per_token(model)
    if args.cache_gb is not None:
        tokens = int(args.cache_gb * machine.GB) // kv
    else:
        ram, working_set = machine.memory()
        tokens = max(max_context, machine.largest_context(machine.weight_bytes(model), kv, working_set, ram) // 2)
    size = args.parallel or default_parallel(max_context, tokens)
    engine = Engine(model, tokenizer, max_context, parallel.least(tokens, group) * kv, not args.no_cache_reuse, size)
    if not rank0:
        return follow(engine, group)
    name = Path(str(args.model_path).rstrip("/")).name
    jobs = queue.Queue(maxsize=args.max_queue)
    a = model.args
    props = {
        "max_context": max_context,
        "parallel": size,
        "persona": args.system_prompt or chat.DEFAULT_SYSTEM_PROMPT,  # the page's default; '' in a request: none
        "layers": a.n_layers,
        "experts": a.moe.num_experts,
        "experts_per_token": a.moe.num_experts_per_tok,
        "defaults": {
            "temperature": chat.DEFAULT_TEMP,
            "top_p": chat.DEFAULT_TOP_P,
            "min_p": chat.DEFAULT_MIN_P,
            "max_tokens": chat.DEFAULT_MAX_TOKENS,
        },
    }
    counts = lambda: {
        "running": len(engine.batch.running),
        "waiting": len(engine.batch.waiting),
        "generations": engine.generations,
    }
    api = Api(name, jobs, args.api_key, args.system_prompt, counts, props, webui=not args.no_webui, tokenizer=tokenizer)
    app = api.app(args.host, args.allowed_host, args.cors_origin)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    host, port = listener.getsockname()[:2]
    if args.host not in LOOPBACK and not args.api_key:
        log(f"warning: listening on {args.host} without --api-key: anyone who can reach this machine can use the model")
    page = "" if args.no_webui else f"; the chat page: http://{host}:{port}/"
    log(f"serving {name} on http://{host}:{port}/v1 (context {max_context} tokens{page}; Ctrl-C stops)")
    runtime.at_end(api.end_all)  # whatever ends the process, even while the main thread is stuck in MLX
    serve(engine, api, group, thread, server)


def default_parallel(max_context: int, cache_tokens: int) -> int:
    """Replies decoded together by default: 16, fewer when the caches would not hold a quarter of the
    context for each. On 2 CPU cores throughput grows to about 8 and flattens (the projections become
    compute-bound: docs/performance.md), but with 16 every client's reply starts at once."""
    return max(1, min(16, cache_tokens // max(1, max_context // 4)))


def listen(host: str, port: int):
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Every connection accepted here inherits it: each streamed token is sent at once, not held by Nagle's
    # algorithm until the client ACKs the one before (which a client may delay by up to 40 ms over a
    # network). Neither uvicorn nor asyncio turns it off for an accepted socket. On loopback here a streamed
    # reply measured alike with and without it.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MixtralError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
    sock.listen(128)
    return sock


def serve(engine: Engine, api: Api, group, thread: threading.Thread, server: uvicorn.Server):
    """Rank 0's loop until Ctrl-C or SIGTERM: new requests join the batch at any step (in arrival order,
    while it has room), and clients that left leave it; under mlx.launch the other ranks are told both."""
    try:
        while thread.is_alive():
            new = []
            try:
                while engine.batch.room() > len(new):
                    job = (
                        api.jobs.get(timeout=parallel.IDLE_POLL)
                        if not (engine.batch.busy or new)
                        else api.jobs.get_nowait()
                    )
                    if not job.cancelled:  # a client that left while queued costs nothing
                        new.append(job)
            except queue.Empty:
                pass
            if not (new or engine.batch.busy):
                if group is not None:
                    parallel.text_from_rank0("", group)  # "nothing yet": the other ranks sleep (parallel.follow)
                continue
            stop = engine.cancelled()
            if group is not None:
                parallel.text_from_rank0(json.dumps({"new": [job.describe() for job in new], "stop": stop}), group)
            engine.step(new, stop)
        raise MixtralError("the HTTP server stopped unexpectedly")
    except BaseException as e:
        why = (
            "Ctrl-C" if isinstance(e, KeyboardInterrupt) else "SIGTERM" if isinstance(e, runtime.Terminated) else str(e)
        )
        api.end_all(why)  # the running requests and the queued ones
        server.should_exit = True
        thread.join(timeout=10)
        if group is not None and not runtime.is_lost_peer(e):  # a gone rank would never take it
            parallel.text_from_rank0("quit", group)
        raise


def follow(engine: Engine, group):
    """Another rank's loop under mlx.launch: run the batch rank 0 runs, step for step."""
    while (text := parallel.follow(group)) != "quit":
        step = json.loads(text)
        engine.step([Job(**job) for job in step["new"]], step["stop"])


if __name__ == "__main__":
    main()
