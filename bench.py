"""Benchmark loading, prefill, decode and chat turns; optionally against mlx-lm on the same weights.

    python bench.py --synthetic                      # random 8-bit weights built in memory
    python bench.py --model-path mlx_model --repeat 3
    python bench.py --model-path M --mlx-lm-model L --mlx-lm-python venv/bin/python   # ratios
    python bench.py --model-path M --compare-kernels --llama-bench "llama-bench -m M-q8_0.gguf"

Figures are medians over --repeat runs; the JSON goes to stdout (or --json FILE), a table to stderr.
"""

import signal

if __name__ == "__main__":  # Ctrl-C during the imports below ends the program quietly; run_program() takes over after
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import heapq
import itertools
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

import chat
import folder
import grammar
import machine
import mixtral
import ops
import parallel
import runtime
import sessions
from machine import GB


def synthetic_model(opts, dtype):
    """A Mixtral of the given size with random weights, quantized as convert.py would."""
    args = mixtral.ModelArgs.from_dict(
        {
            "dim": opts.dim,
            "n_layers": opts.n_layers,
            "head_dim": opts.head_dim,
            "hidden_dim": opts.hidden_dim,
            "n_heads": opts.n_heads,
            "n_kv_heads": opts.n_kv_heads,
            "norm_eps": 1e-5,
            "vocab_size": opts.vocab_size,
            "moe": {"num_experts": opts.n_experts, "num_experts_per_tok": opts.top_k},
        }
    )
    model = mixtral.Mixtral(args)
    mx.random.seed(0)
    model.update(tree_map(lambda p: (mx.random.normal(p.shape) * opts.dim**-0.5).astype(dtype), model.parameters()))
    if opts.q_bits:
        mixtral.quantize_model(
            model,
            opts.q_group_size,
            opts.q_bits,
            keep=lambda p: not p.endswith("feed_forward.gate"),
        )
        model.update(
            tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters())
        )
    return model


def load(opts):
    ops.use_kernels(opts.kernels)
    tic = time.perf_counter()
    if opts.synthetic:
        dtype = mixtral.compute_dtype(opts.dtype)
        model = synthetic_model(opts, dtype)
        # As load_model places a model: this rank's share (the model is random anyway), CPU streams.
        mixtral.place(model, "world", opts.cpu_threads, opts.q_group_size if opts.q_bits else 1, opts.shares)
        mx.eval(model.parameters())
        model.kv_dtype = ops.kv_dtype(opts.kv_dtype, dtype)
        tokenizer = mixtral.Tokenizer(opts.tokenizer) if opts.tokenizer else None
    else:
        model, tokenizer = mixtral.load_model(
            opts.model_path, opts.dtype, cpu_threads=opts.cpu_threads, shares=opts.shares, kv_dtype=opts.kv_dtype
        )
    return model, tokenizer, time.perf_counter() - tic


def weights_per_token(model) -> int:
    """Bytes of weights one decoded token reads: all but the experts and the embeddings (one row of
    those), and top_k of every num_experts of the experts."""
    moe, params = model.args.moe, tree_flatten(model.parameters())
    experts = sum(v.nbytes for k, v in params if ".experts." in k)
    embeddings = sum(v.nbytes for k, v in params if k.startswith("tok_embeddings."))
    return machine.weight_bytes(model) - embeddings - experts + experts * moe.num_experts_per_tok // moe.num_experts


def read_bandwidth(gb: float = 0.5) -> float:
    """The machine's memory read rate, GB/s: numpy summing an array larger than any cache, best of 3."""
    a = np.ones(int(gb * GB) // 4, np.float32)
    best = min(timed(a.sum) for _ in range(3))
    return a.nbytes / GB / best


def timed(f) -> float:
    tic = time.perf_counter()
    f()
    return time.perf_counter() - tic


def prompt_and_decode(model, opts):
    """-> (prefill tokens/s, decode tokens/s) for a fresh random prompt."""
    prompt = mx.random.randint(3, model.args.vocab_size, (opts.prompt_tokens,)).tolist()
    tic = time.perf_counter()
    tokens = mixtral.generate(model, prompt)
    next(tokens)
    first = time.perf_counter()
    for _ in range(opts.gen_tokens - 1):
        next(tokens)
    end = time.perf_counter()
    return opts.prompt_tokens / (first - tic), (opts.gen_tokens - 1) / (end - first)


def warm_up(model, opts):
    """One short prefill and decode before anything is timed, as llama-bench's warm-up run: the first
    pass after loading measured up to 30% slower (fresh pages, the allocator's first buffers)."""
    prompt = mx.random.randint(3, model.args.vocab_size, (min(64, opts.prompt_tokens),)).tolist()
    for _ in zip(range(min(8, opts.gen_tokens)), mixtral.generate(model, prompt)):
        pass


def schema_rules(opts) -> str:
    """--json-schema's grammar: 'object' is any JSON object, else a schema file."""
    return (
        grammar.from_flags(True, None) if opts.json_schema == "object" else grammar.from_flags(False, opts.json_schema)
    )


def grammar_figures(model, tokenizer, opts, pairs: int = 5) -> dict:
    """Decode tokens/s under --json-schema's grammar and without it, in alternating pairs of runs (medians):
    the same prompt and seed, sampled (temp 0.7); a constrained run goes to --gen-tokens or EOS, and its
    free twin decodes as many tokens (a short run and a long one do not measure alike)."""
    rules = schema_rules(opts)
    prompt = tokenizer.encode("[INST] Describe a person as JSON. [/INST]")

    def tps(seed, constrained, most):
        constraint = grammar.Constraint(tokenizer, rules) if constrained else None
        tokens = mixtral.generate(model, prompt, temp=0.7, seed=seed, constraint=constraint)
        next(tokens)
        tic, n = time.perf_counter(), 0
        while n < most and next(tokens) != tokenizer.eos_id:
            n += 1
        return n / (time.perf_counter() - tic), n

    runs = {True: [], False: []}
    for seed in range(pairs):
        runs[True].append(tps(seed, True, opts.gen_tokens - 1))
        runs[False].append(tps(seed, False, runs[True][-1][1]))
    with_, without = (statistics.median(t for t, _ in runs[c]) for c in (True, False))
    return {
        "grammar_generation_tps": with_,
        "grammar_tokens": [n for _, n in runs[True]],
        "free_generation_tps": without,
        "grammar_vs_free": with_ / without,
    }


def at_depth(model, opts, depth: int):
    """-> (prefill tokens/s, decode tokens/s) with `depth` tokens already in the cache, as llama-bench -d
    measures: --prompt-tokens more prefilled on top of them, then --gen-tokens decoded after them."""
    random_ids = lambda n: mx.random.randint(3, model.args.vocab_size, (n,)).tolist()
    cache = model.make_cache()
    mixtral.prefill(model, random_ids(depth + 1), cache)  # all but the last: depth tokens
    tic = time.perf_counter()
    next(mixtral.generate(model, random_ids(opts.prompt_tokens), cache))
    prompt_tps = opts.prompt_tokens / (time.perf_counter() - tic)
    for c in cache:
        c.trim(c.offset - depth)
    tokens = mixtral.generate(model, random_ids(1), cache)
    next(tokens)
    tic = time.perf_counter()
    for _ in range(opts.gen_tokens - 1):
        next(tokens)
    return prompt_tps, (opts.gen_tokens - 1) / (time.perf_counter() - tic)


def kv_bytes_measured(model) -> float:
    """The KV cache's bytes per position, from its arrays after one token (not from its dtype's size)."""
    cache = model.make_cache()
    mx.eval(model(mx.array([[1]]), cache)[0])
    return sum(c.nbytes for c in cache) / cache[0].keys.shape[2]


def experts_cost(model, pairs=20, tokens=32):
    """The decode step's cost of keeping the router's choices (chat.py's /experts): many short runs
    with and without, alternating, so that the machine's drift touches both alike. -> (cost from the
    fastest run of each, cost from the medians); the fastest run is the one least disturbed."""
    prompt = mx.random.randint(3, model.args.vocab_size, (64,)).tolist()

    def ms_per_token(keep):
        model.log_routing(keep)
        steps = mixtral.generate(model, prompt)
        next(steps)
        tic = time.perf_counter()
        for _ in range(tokens):
            next(steps)
        mixtral.routing_choices(model)  # what a chat turn does with the log
        return 1000 * (time.perf_counter() - tic) / tokens

    off, on = [], []
    for i in range(pairs):
        for keep in (False, True) if i % 2 else (True, False):
            (on if keep else off).append(ms_per_token(keep))
    model.log_routing(False)
    return min(on) / min(off) - 1, statistics.median(on) / statistics.median(off) - 1


def decode_breakdown(model, opts, n=16):
    """Per decode step: time to build the graph in Python, and time to evaluate a built graph alone
    (all the kernels, no Python), after a prompt as long as the one prompt_and_decode uses. The
    pipelined step should cost about the latter."""
    cache = model.make_cache()
    y = mx.array([[1]], dtype=mx.uint32)
    mixtral.prefill(model, mx.random.randint(3, model.args.vocab_size, (opts.prompt_tokens + 1,)).tolist(), cache)
    build = run = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        logits, _ = model(y, cache)
        y = mx.argmax(logits[:, -1:], axis=-1).astype(mx.uint32)
        t1 = time.perf_counter()
        mx.eval(y)
        t2 = time.perf_counter()
        build, run = build + t1 - t0, run + t2 - t1
    return 1000 * build / n, 1000 * run / n


def collective_ms(model, n=20) -> float:
    """Per token, the time of the 2 x n_layers all_sums alone (one token's activations each, each
    waiting for the last, as in a decode step); 0 on one machine."""
    if model.group is None:
        return 0.0
    x = mx.zeros((1, 1, model.args.dim), model.dtype)
    mx.eval(x)
    tic = time.perf_counter()
    for _ in range(n):
        y = x
        for _ in range(2 * model.args.n_layers):
            y = mx.distributed.all_sum(y, group=model.group)
        mx.eval(y)
    return 1000 * (time.perf_counter() - tic) / n


def per_rank(model, figures: dict) -> list:
    """Each rank's figures, gathered on every rank."""
    values = mx.array(list(figures.values()), mx.float32)
    rows = mx.distributed.all_gather(values, group=model.group).reshape(-1, len(figures)).tolist()
    return [dict(zip(figures, row)) for row in rows]


class WordTokenizer:
    """Stands in for sentencepiece on synthetic models without a tokenizer: one id per word."""

    bos_id, eos_id = 1, 2

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def encode(self, text, bos=True):
        ids = [3 + sum(map(ord, w)) % (self.vocab_size - 3) for w in text.split()]
        return ([self.bos_id] if bos else []) + ids

    def decode(self, ids):
        return " ".join(map(str, ids))

    def decode_stream(self, ids):
        for i in ids:
            yield f" {i}"


def chat_turns(model, tokenizer, opts):
    """Time to first token of each chat turn, same message length every turn."""
    c = chat.Chat(
        model,
        tokenizer or WordTokenizer(model.args.vocab_size),
        max_tokens=opts.reply_tokens,
        temp=0.0,
        seed=0,
        max_context=machine.MAX_POSITIONS,
    )
    ttfts = []
    for turn in range(opts.chat_turns):
        reply = c.ask(" ".join(["word"] * opts.turn_tokens) + f" {turn}")
        for _ in reply:
            pass
        ttfts.append(reply.ttft)
    return ttfts


def ask(url, messages, max_tokens, extra=None):
    """A streamed chat request to an OpenAI-compatible server -> (reply text, seconds to the first text,
    seconds to the last, the reply's tokens, and the clock (time.perf_counter) at each token: token_times).
    The tokens are the server's usage count where it sends one (ours and llama-server do), else the text
    events."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body |= {"stream_options": {"include_usage": True}} | (extra or {})
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    tic, parts, stamps, tokens = time.perf_counter(), [], [], None
    with urllib.request.urlopen(request, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if isinstance(event.get("usage"), dict):
                tokens = event["usage"].get("completion_tokens")
            choices = event.get("choices")
            if choices and choices[0]["delta"].get("content"):
                stamps.append(time.perf_counter())
                parts.append(choices[0]["delta"]["content"])
    first, last = (stamps[0] - tic, stamps[-1] - tic) if stamps else (None, None)
    times = token_times(stamps, tokens if isinstance(tokens, int) else len(stamps))
    return "".join(parts), first, last, len(times), times


def token_times(stamps: list, tokens: int) -> list:
    """When each of a reply's `tokens` came, from its text events' times. An event can carry several
    tokens: a server holds back tokens that do not yet make a whole character (byte tokens; those that
    never do come with the last event), so counting events undercounts such a reply. Each token beyond
    the events goes to the gap between events that is longest per token it already has (a silent
    stream was decoding), and a gap's tokens are spread evenly over it."""
    extra = tokens - len(stamps)
    if extra <= 0 or not stamps:
        return stamps
    if len(stamps) == 1:
        return stamps * tokens
    gaps = [(-(b - a), 1, i) for i, (a, b) in enumerate(itertools.pairwise(stamps))]
    heapq.heapify(gaps)
    for _ in range(extra):
        span, k, i = heapq.heappop(gaps)
        heapq.heappush(gaps, (span * k / (k + 1), k + 1, i))
    held = {i: k for _, k, i in gaps}
    times = stamps[:1]
    for i, (a, b) in enumerate(itertools.pairwise(stamps)):
        times += [a + (b - a) * j / held[i] for j in range(1, held[i] + 1)]
    return times


def decode_rate(stamps: list) -> float:
    """Tokens a second while every client decodes (each list: one client's token times): those that came
    from the last client's first token to the first client's last, over that time. Without the prompts'
    prefill, as a single stream's decode figure is (one client: its tokens after the first). Where the
    clients never all decoded at once, every token after each one's first over the whole span."""
    start, end = max(s[0] for s in stamps), min(s[-1] for s in stamps)
    if end > start:
        return sum(start < t <= end for s in stamps for t in s) / (end - start)
    start, end = min(s[0] for s in stamps), max(s[-1] for s in stamps)
    return sum(len(s) - 1 for s in stamps) / max(end - start, 1e-9)


class Served:
    """server.py on a free loopback port, talked to with the standard library: streamed chat requests,
    timed at the first and last text event."""

    def __init__(self, model_path, *flags):
        cmd = [sys.executable, str(Path(__file__).with_name("server.py")), "--model-path", model_path, "--port", "0"]
        # The server runs the kernels this run measures.
        env = os.environ | {"MIXTRAL_KERNELS": ops.KERNELS["name"] or "auto"}
        self.proc = subprocess.Popen([*cmd, *map(str, flags)], stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stderr.readline()
        if not line.startswith("serving "):
            self.proc.kill()
            raise runtime.MixtralError(f"server.py did not start: {line.strip()}")
        self.url = line.split(" on ")[1].split()[0] + "/chat/completions"
        self.extra = {}

    def ask(self, messages, max_tokens):
        return ask(self.url, messages, max_tokens, self.extra)

    def close(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


class LlamaServer(Served):
    """llama.cpp's llama-server (--llama-server COMMAND) on a free loopback port, -np slots, the same
    threads, asked for the same replies (ignore_eos: its random weights' EOS would end one early)."""

    def __init__(self, command: list, slots: int, threads: int, context: int):
        import socket

        with socket.socket() as s:  # a free port, taken back at once
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        flags = ["--host", "127.0.0.1", "--port", port, "-np", slots, "-t", threads, "-c", context * slots]
        self.proc = subprocess.Popen([*command, *map(str, flags)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url, self.extra = f"http://127.0.0.1:{port}/v1/chat/completions", {"ignore_eos": True}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.proc.kill()
        raise runtime.MixtralError(f"--llama-server: {command[0]} did not start serving, check its command")


def words(n, salt):
    """A message of about n tokens, as chat_turns sends them."""
    return " ".join(["word"] * n) + f" {salt}"


def load_figures(served, clients: list, opts, label: str) -> dict:
    """Each count of clients at once, each asking one reply of --client-tokens to its own message: every
    reply's tokens over the wall time (prompts' prefill included), the tokens a second while all of them
    decode (decode_rate), and the clients' time to first token."""
    out = {}
    for n in clients:
        asks = [[{"role": "user", "content": words(opts.turn_tokens, f"{label} {n} {c}")}] for c in range(n)]
        tic = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            done = list(pool.map(lambda m: served.ask(m, opts.client_tokens), asks))
        wall = time.perf_counter() - tic
        ttft = sorted(d[1] for d in done)
        out[f"{label}_{n}_clients_tokens_per_s"] = sum(d[3] for d in done) / wall
        out[f"{label}_{n}_clients_decode_tokens_per_s"] = decode_rate([d[4] for d in done])
        out[f"{label}_{n}_clients_ttft_median_s"] = statistics.median(ttft)
        out[f"{label}_{n}_clients_ttft_p95_s"] = ttft[min(n - 1, round(0.95 * (n - 1)))]
    return out


def server_figures(opts, threads: int) -> dict:
    """Through HTTP on this machine: a conversation replayed turn by turn as front-ends do (the whole
    of it resent each time), with the server's cache reuse on and off; then --clients at once on the
    default, on --parallel 1 and on llama-server at -np of the same (with --llama-server), side by side."""
    out = {}
    chosen = ("--parallel", opts.parallel) if opts.parallel else ()
    for label, flags in (("reuse", chosen), ("no_reuse", (*chosen, "--no-cache-reuse"))):
        served = Served(opts.model_path, *flags)
        try:
            messages, ttfts = [], []
            for turn in range(opts.chat_turns):
                messages.append({"role": "user", "content": words(opts.turn_tokens, turn)})
                text, first, *_ = served.ask(messages, opts.reply_tokens)
                ttfts.append(first)
                messages.append({"role": "assistant", "content": text})
            out[f"server_{label}_ttft_turn1_s"] = ttfts[0]
            out[f"server_{label}_ttft_turn{opts.chat_turns}_s"] = ttfts[-1]
            out[f"server_{label}_ttft_ratio"] = ttfts[-1] / ttfts[0]
            if label == "reuse":
                _, first, last, n, _ = served.ask(
                    [{"role": "user", "content": words(opts.turn_tokens, 999)}], opts.gen_tokens
                )
                out["server_generation_tps"] = (n - 1) / (last - first)
                out["server_parallel"] = parallel_of(served)
                out |= side_by_side(served, opts, threads, out["server_parallel"])
        finally:
            served.close()
    if opts.llama_server:
        for n in opts.clients:
            out[f"server_vs_llama_server_{n}_clients"] = (
                out[f"server_{n}_clients_tokens_per_s"] / out[f"llama_server_{n}_clients_tokens_per_s"]
            )
            out[f"server_vs_llama_server_{n}_clients_decode"] = (
                out[f"server_{n}_clients_decode_tokens_per_s"] / out[f"llama_server_{n}_clients_decode_tokens_per_s"]
            )
    return out


def side_by_side(served, opts, threads: int, slots: int) -> dict:
    """load_figures on our server, on one with --parallel 1 and, with --llama-server, on llama-server at
    -np `slots`: each count of clients on each in turn, all three up at once. This machine's speed drifts
    by a third from one minute to the next, and all of one server's counts before all of the next's
    compared minutes. Where memory does not hold a copy of the weights for each (and this process's),
    one server after another."""
    others = [("server_parallel_1", lambda: Served(opts.model_path, "--parallel", 1))]
    if opts.llama_server:
        command = llama_command(opts.llama_server, "--llama-server", "llama-server")
        context = opts.turn_tokens + opts.client_tokens + 64
        others.append(("llama_server", lambda: LlamaServer(command, slots, threads, context)))
    copies = 2 + len(others)
    if copies * sum(f.stat().st_size for f in folder.shards(Path(opts.model_path))) >= machine.model_budget():
        print(f"bench: one server after another: memory does not hold {copies} copies of the weights", file=sys.stderr)
        out = load_figures(served, opts.clients, opts, "server")
        for label, start in others:
            other = start()
            try:
                out |= load_figures(other, opts.clients, opts, label)
            finally:
                other.close()
        return out
    started = []
    try:
        for label, start in others:
            started.append((label, start()))
        out = {}
        for n in opts.clients:
            out |= load_figures(served, [n], opts, "server")
            for label, other in started:
                out |= load_figures(other, [n], opts, label)
        return out | paired_rounds(served, started[0][1], opts, min(max(opts.clients), slots))
    finally:
        for _, other in started:
            other.close()


def paired_rounds(served, single, opts, n: int) -> dict:
    """The two ratios of the batching bar, each from adjacent runs: --pair-rounds rounds of one client on
    our server and one on `single` (--parallel 1, the order alternating), then n clients on ours (a full
    batch: the largest --clients count up to our --parallel). A single reply's decode moves by 15% from one
    request to the next here, and a table's cells are a minute apart: the medians of the rounds' ratios
    are what one run can say."""
    ones, singles, manys = [], [], []

    def rate(server, count, label):
        return load_figures(server, [count], opts, label)[f"{label}_{count}_clients_decode_tokens_per_s"]

    first, second = (ones, served), (singles, single)
    for r in range(opts.pair_rounds):
        for kept, server in (first, second) if r % 2 == 0 else (second, first):
            kept.append(rate(server, 1, f"pair_{r}"))
        manys.append(rate(served, n, f"pair_{r}"))
    if not manys:
        return {}
    one_vs_single, many_vs_one = [a / b for a, b in zip(ones, singles)], [m / a for m, a in zip(manys, ones)]
    return {
        "server_1_client_decode_each_round": ones,
        "server_parallel_1_1_client_decode_each_round": singles,
        f"server_{n}_clients_decode_each_round": manys,
        "server_1_client_vs_parallel_1_each_round": one_vs_single,
        "server_1_client_vs_parallel_1_paired": statistics.median(one_vs_single),
        f"server_{n}_clients_decode_vs_one_client_each_round": many_vs_one,
        f"server_{n}_clients_decode_vs_one_client_paired": statistics.median(many_vs_one),
    }


def parallel_of(served) -> int:
    with urllib.request.urlopen(served.url.replace("/chat/completions", "/props"), timeout=30) as r:
        return json.loads(r.read())["parallel"]


def load_table(result: dict, clients: list) -> str:
    """Per count of clients: tokens/s over the wall time (prefill included) and while all decode, and time
    to first token (median / p95)."""
    labels = [("server", f"ours, --parallel {result['server_parallel']}"), ("server_parallel_1", "ours, --parallel 1")]
    labels += (
        [("llama_server", f"llama-server -np {result['server_parallel']}")]
        if "llama_server_1_clients_tokens_per_s" in result
        else []
    )
    lines = ["clients  " + "".join(f"{name:>44}" for _, name in labels)]
    lines.append(" " * 9 + f"{'all tok/s, decoding, first token s':>44}" * len(labels))
    for n in clients:
        cells = [
            f"{result[f'{k}_{n}_clients_tokens_per_s']:7.1f} {result[f'{k}_{n}_clients_decode_tokens_per_s']:7.1f} "
            f"{result[f'{k}_{n}_clients_ttft_median_s']:6.2f} / {result[f'{k}_{n}_clients_ttft_p95_s']:5.2f}"
            for k, _ in labels
        ]
        lines.append(f"{n:>7}  " + "".join(f"{c:>44}" for c in cells))
    return "\n".join(lines)


def resume_figures(model, tokenizer, opts) -> dict:
    """A conversation of about --resume-tokens tokens saved with its cache, then resumed: time to the
    first token of the next reply with the saved cache against a prefill of the transcript (the two
    replies must be equal), the save, and a session's save after one more turn (only what is new)."""
    tokenizer = tokenizer or WordTokenizer(model.args.vocab_size)
    make = lambda: chat.Chat(
        model, tokenizer, max_tokens=opts.reply_tokens, temp=0.0, seed=0, max_context=machine.MAX_POSITIONS
    )
    messages, turn = [], 0
    while len(chat.encode_messages(tokenizer, messages)) < opts.resume_tokens:
        messages += [{"role": "user", "content": words(64, turn)}, {"role": "assistant", "content": words(32, turn)}]
        turn += 1
    with tempfile.TemporaryDirectory() as tmp:
        talk = Path(tmp) / "talk.json"
        talk.write_text(json.dumps({"messages": messages}))
        c = make()
        c.load(talk)
        "".join(c.ask("hello"))  # fed the whole transcript: now save it, as /save does
        c.undo()
        tic = time.perf_counter()
        c.save(talk, {})
        size = sessions.save_cache(c, talk)
        save_s = time.perf_counter() - tic
        out = {"resume_tokens": len(c.tokens), "resume_cache_mb": size / 1e6, "resume_save_s": save_s}
        for label, use_cache in (("prefill", False), ("cache", True)):
            d = make()
            d.load(talk)
            tic = time.perf_counter()
            if use_cache and sessions.restore_cache(d, talk) is not None:
                raise runtime.MixtralError("the saved cache was refused")
            reply = d.ask("and now?")
            text = "".join(reply)
            out[f"resume_{label}_ttft_s"] = time.perf_counter() - tic - reply.elapsed + reply.ttft
            out[f"resume_{label}_text"] = text
        if out.pop("resume_prefill_text") != out.pop("resume_cache_text"):
            raise runtime.MixtralError("the resumed reply differs from the prefilled one")
        out["resume_speedup"] = out["resume_prefill_ttft_s"] / out["resume_cache_ttft_s"]
        session = sessions.Session("bench", root=Path(tmp))
        session.save(d, {})  # the whole conversation once
        "".join(d.ask("one more"))
        tic = time.perf_counter()
        out["autosave_bytes_per_turn"] = session.save(d, {})
        out["autosave_s_per_turn"] = time.perf_counter() - tic
    return out


def run_mlx_lm(opts):
    cmd = [
        opts.mlx_lm_python,
        "-m",
        "mlx_lm",
        "benchmark",
        "--model",
        opts.mlx_lm_model,
        "-p",
        str(opts.prompt_tokens),
        "-g",
        str(opts.gen_tokens),
        "-n",
        str(opts.repeat),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    m = re.search(
        r"Averages: prompt_tps=([\d.]+), generation_tps=([\d.]+), peak_memory=([\d.]+)", out.stdout + out.stderr
    )
    if not m:
        raise runtime.MixtralError(f"mlx-lm benchmark failed:\n{out.stderr[-2000:]}")
    return {"prompt_tps": float(m[1]), "generation_tps": float(m[2]), "peak_memory_gb": float(m[3])}


# The flags a run for another kernel choice repeats: what is measured, on what, and how.
SAME_RUN = (
    "dim", "hidden_dim", "n_layers", "n_experts", "top_k", "n_heads", "n_kv_heads", "head_dim", "vocab_size",
    "q_bits", "q_group_size", "tokenizer", "prompt_tokens", "gen_tokens", "chat_turns", "turn_tokens",
    "reply_tokens", "repeat", "dtype", "kv_dtype", "cpu_threads",
)  # fmt: skip
COMPARED = (
    "kernels",
    "prompt_tps",
    "generation_tps",
    "decode_weight_gbps",
    "ttft_turn1_s",
    "server_16_clients_tokens_per_s",
)


def other_kernels(opts, ran: str) -> list:
    """bench.py again, in a fresh process each, for every other kernel choice that can run here:
    prefill, decode, weights read per second while decoding and chat's first token."""
    choices = [k for k in ("int16", "exact", "mlx") if k != ran and (k == "mlx" or ops.KERNELS["module"])]
    source = ["--model-path", opts.model_path] if opts.model_path else ["--synthetic"]
    for name in SAME_RUN:
        if getattr(opts, name) is not None:
            source += [f"--{name.replace('_', '-')}", str(getattr(opts, name))]
    source += ["--server"] if opts.server else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in choices:
            out = Path(tmp) / f"{k}.json"
            cmd = [sys.executable, __file__, *source, "--kernels", k, "--core-only", "--json", str(out)]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if r.returncode:
                tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
                raise runtime.MixtralError(f"bench.py --kernels {k} failed: {tail}")
            figures = json.loads(out.read_text())
            rows.append({key: figures[key] for key in COMPARED if key in figures} | {"kernels": k})
    return rows


def llama_command(text: str, flag: str = "--llama-bench", program: str = "llama-bench") -> list:
    """--llama-bench's (or --llama-server's) command as argv, its program found, before anything is measured."""
    try:
        cmd = shlex.split(text)
    except ValueError as e:
        raise runtime.MixtralError(f"{flag}: {e}: {text!r}, check its quotes")
    if not cmd or not shutil.which(cmd[0]):
        raise runtime.MixtralError(
            f"{flag}: no such program: {cmd[0] if cmd else text!r}, pass the {program} binary's path"
        )
    return cmd


def kernel_threads(model) -> int:
    """The threads our kernels (or the CPU streams' split) run on: what llama.cpp gets as -t."""
    if ops.KERNELS["module"]:
        return ops.KERNELS["module"].threads()
    return next((len(m.streams) for m in model.modules() if isinstance(m, parallel.SplitOutputs)), 1)


def run_llama_bench(opts, threads: int, depths=(), what=("prompt", "generation")) -> dict:
    """llama.cpp's llama-bench, as --llama-bench gives it, at this run's prompt, generation and threads:
    one run at an empty cache of `what` (bench.py runs it beside each of its own), or --repeat runs at each
    of `depths` with a float16 cache -> its prompt and generation tokens/s, those asked for."""
    cmd = llama_command(opts.llama_bench)
    cmd += [
        "-p",
        str(opts.prompt_tokens if "prompt" in what else 0),
        "-n",
        str(opts.gen_tokens if "generation" in what else 0),
    ]
    cmd += ["-t", str(threads), "-r", str(opts.repeat if depths else 1), "-o", "jsonl"]
    if depths:
        cmd += ["-d", ",".join(map(str, depths)), "-ctk", "f16", "-ctv", "f16"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except OSError as e:
        raise runtime.MixtralError(f"--llama-bench: {e.strerror}: {cmd[0]}, pass the llama-bench binary's path")
    out = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            depth = f"depth_{d['n_depth']}_" if d.get("n_depth") else ""
            out[depth + ("generation_tps" if d.get("n_gen") else "prompt_tps")] = d["avg_ts"]
    if r.returncode or len(out) != len(what) * max(1, len(depths)):
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise runtime.MixtralError(f"--llama-bench: {cmd[0]} exited {r.returncode} ({tail}), check its command")
    return out


def comparison_table(rows: list, llama: dict | None) -> str:
    """One line per kernel choice (and llama.cpp), with ratios to llama.cpp where it ran."""
    served = "server_16_clients_tokens_per_s" in rows[0]
    lines = ["kernels  prefill tok/s  decode tok/s  weights GB/s  first token s" + ("  server tok/s" if served else "")]
    lines[0] += "  vs llama.cpp" if llama else ""
    for r in rows + ([{"kernels": "llama.cpp"} | llama] if llama else []):
        line = f"{r['kernels']:<8} {r['prompt_tps']:>14.1f} {r['generation_tps']:>13.1f}"
        line += f" {r['decode_weight_gbps']:>13.1f} {r['ttft_turn1_s']:>14.3f}" if "ttft_turn1_s" in r else " " * 28
        line += (
            f" {r['server_16_clients_tokens_per_s']:>13.1f}" if served and "ttft_turn1_s" in r else " " * 14 * served
        )
        if llama and r["kernels"] != "llama.cpp":
            line += (
                f"  {r['prompt_tps'] / llama['prompt_tps']:.2f}x / {r['generation_tps'] / llama['generation_tps']:.2f}x"
            )
        lines.append(line.rstrip())
    return "\n".join(lines)


def client_counts(text: str) -> list:
    """--clients 1,4,16 -> [1, 4, 16] (and --depth's)."""
    try:
        counts = [int(n) for n in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give counts, each at least 1, e.g. 1,4,16")
    return counts


def build_parser():
    p = argparse.ArgumentParser(description="Benchmark Mixtral in MLX.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-path", help="converted model folder")
    src.add_argument("--synthetic", action="store_true", help="random weights of the size below, built in memory")
    g = p.add_argument_group("synthetic size (default: 1024 wide, 3584 expert width, 4 layers, 8 experts)")
    g.add_argument("--dim", type=int, default=1024)
    g.add_argument("--hidden-dim", type=int, default=3584)
    g.add_argument("--n-layers", type=int, default=4)
    g.add_argument("--n-experts", type=int, default=8)
    g.add_argument("--top-k", type=int, default=2)
    g.add_argument("--n-heads", type=int, default=8)
    g.add_argument("--n-kv-heads", type=int, default=2)
    g.add_argument("--head-dim", type=int, default=128)
    g.add_argument("--vocab-size", type=int, default=32000)
    g.add_argument("--q-bits", type=int, choices=[0, 4, 8], default=8, help="0: unquantized")
    g.add_argument("--q-group-size", type=int, default=64)
    g.add_argument("--tokenizer", help="a tokenizer.model for the chat turns (default: fixed-length random ids)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--chat-turns", type=int, default=20, help="turns for the time-to-first-token check")
    p.add_argument("--turn-tokens", type=int, default=32, help="words per chat message")
    p.add_argument("--reply-tokens", type=int, default=32, help="tokens per chat reply")
    p.add_argument("--repeat", type=int, default=1, help="runs; figures are medians")
    mixtral.add_dtype_flags(p)
    p.add_argument("--cpu-threads", type=int, help="CPU threads (default: all cores on the CPU)")
    p.add_argument(
        "--shares",
        type=parallel.shares_flag,
        help="each rank's part of every layer under mlx.launch, e.g. 2,1,1 (default: in proportion to each rank's memory)",
    )
    p.add_argument(
        "--kernels",
        choices=ops.KERNEL_CHOICES,
        default="auto",
        help="the quantized projections' kernels: ours (int16 or exact path) or MLX's (default: %(default)s, as "
        "MIXTRAL_KERNELS or int16 where built)",
    )
    p.add_argument("--mlx-lm-model", help="also run mlx-lm's benchmark on this mlx-lm model and report ratios")
    p.add_argument("--mlx-lm-python", default=sys.executable, help="the Python that has mlx-lm (default: this one)")
    p.add_argument(
        "--server",
        action="store_true",
        help="also measure server.py on --model-path through HTTP: a replayed conversation with cache reuse "
        "on and off, and 1, 4, 16 concurrent clients",
    )
    p.add_argument(
        "--depth",
        type=client_counts,
        help="also prefill and decode with this many tokens already in the cache, e.g. 4096,16384 (as llama-bench -d; "
        "--llama-bench gets -d and a float16 cache)",
    )
    p.add_argument(
        "--clients",
        type=client_counts,
        default=[1, 4, 16],
        help="with --server: these counts of clients at once, on --parallel 1 and the default (default: 1,4,16)",
    )
    p.add_argument("--parallel", type=int, help="with --server: server.py's --parallel (default: its own)")
    p.add_argument(
        "--client-tokens", type=int, default=64, help="with --clients: tokens per reply (default: %(default)s)"
    )
    p.add_argument(
        "--pair-rounds",
        type=int,
        default=9,
        help="with --server: rounds of one client on ours, one on --parallel 1 and a full batch of clients (the "
        "largest --clients count up to our --parallel) on ours, one after another: the medians of their ratios "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--llama-server",
        metavar="COMMAND",
        help='with --server: also drive llama.cpp\'s server with the same clients, e.g. "llama-server -m M-q8_0.gguf" '
        "(bench.py adds --host, --port, -np equal to our --parallel, -t and -c)",
    )
    p.add_argument(
        "--resume-tokens",
        type=int,
        default=0,
        help="also time resuming a conversation of about this many tokens, with its saved cache and without",
    )
    p.add_argument(
        "--compare-kernels",
        action="store_true",
        help="also run bench.py once more for each other kernel choice that can run here (int16, exact, mlx), "
        "each in a fresh process with the same flags, and show them side by side",
    )
    p.add_argument(
        "--llama-bench",
        metavar="COMMAND",
        help='also run llama.cpp\'s benchmark and report ratios to it, e.g. "llama-bench -m M-q8_0.gguf --repack 0" '
        "(bench.py adds -p, -n, -t, -r and -o jsonl from its own flags)",
    )
    p.add_argument(
        "--core-only",
        action="store_true",
        help="only prefill, decode and the chat turns: skip the decode step's breakdown and the experts' cost",
    )
    p.add_argument(
        "--json-schema",
        metavar="FILE",
        help="also time decoding under this JSON Schema's grammar (or 'object': any JSON object) against "
        "without, alternating, as structured output runs",
    )
    p.add_argument("--json", help="write the JSON here instead of stdout")
    return p


def main(argv=None):
    runtime.quiet_unless_rank0()  # under mlx.launch, rank 0 reports for all
    runtime.run_program(run, build_parser().parse_args(argv))


# The lowest value of each count flag: a run with less has nothing to measure (or divides by it).
LEAST = dict(
    dim=1, hidden_dim=1, n_layers=1, n_experts=1, top_k=1, n_heads=1, n_kv_heads=1, head_dim=1, vocab_size=2,
    q_group_size=1, prompt_tokens=1, gen_tokens=1, chat_turns=1, turn_tokens=1, reply_tokens=1, repeat=1,
    cpu_threads=1, resume_tokens=0, client_tokens=1, parallel=1, pair_rounds=0,
)  # fmt: skip


def check_flags(opts):
    """Each count flag in its range, before anything loads: one line, as the other programs say it."""
    for name, least in LEAST.items():
        value = getattr(opts, name)
        if value is not None and value < least:
            raise runtime.MixtralError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    if opts.top_k > opts.n_experts:
        raise runtime.MixtralError(f"--top-k ({opts.top_k}) cannot exceed --n-experts ({opts.n_experts})")


def run(opts):
    check_flags(opts)
    if opts.llama_server and not opts.server:
        raise runtime.MixtralError("--llama-server needs --server: it is driven by the same clients")
    if opts.server and not opts.model_path:
        raise runtime.MixtralError("--server needs --model-path: a converted folder for server.py to load")
    if opts.llama_bench is not None:
        llama_command(opts.llama_bench)
    if opts.llama_server is not None:
        llama_command(opts.llama_server, "--llama-server", "llama-server")
    if opts.json_schema and not (opts.model_path or opts.tokenizer):
        raise runtime.MixtralError("--json-schema needs a tokenizer: --model-path, or --synthetic with --tokenizer")
    if opts.json_schema:
        schema_rules(opts)  # a schema that cannot be used fails now, before the model loads
    if opts.compare_kernels and mx.distributed.init().size() > 1:
        raise runtime.MixtralError("--compare-kernels runs on one machine: run it without mlx.launch")
    mx.random.seed(0)  # the same prompts on every rank
    model, tokenizer, load_s = load(opts)
    warm_up(model, opts)
    # With --llama-bench, llama.cpp runs beside each of our runs: its prefill right before ours, its decode
    # right after ours. On a shared machine the speed of memory drifts by a third from one minute to the
    # next: two sets of runs minutes apart compare the minutes, not the programs, and even one whole
    # llama-bench run after ours put its decode half a minute from ours at Mixtral's sizes.
    runs, llama_runs, threads = [], [], kernel_threads(model)
    for _ in range(opts.repeat):
        before = run_llama_bench(opts, threads, what=("prompt",)) if opts.llama_bench is not None else None
        runs.append(prompt_and_decode(model, opts))
        if before is not None:
            llama_runs.append(before | run_llama_bench(opts, threads, what=("generation",)))
    turns = [chat_turns(model, tokenizer, opts) for _ in range(opts.repeat)]
    build_ms, run_ms = decode_breakdown(model, opts) if not opts.core_only else (None, None)
    gen_tps = statistics.median(r[1] for r in runs)
    result = {
        "device": str(mx.default_device()),
        "device_name": mx.device_info().get("device_name", ""),
        "compute_dtype": mixtral.dtype_name(model.dtype),
        "kv_dtype": mixtral.dtype_name(model.kv_dtype),
        "kv_bytes_per_token": kv_bytes_measured(model),
        "kernels": ops.KERNELS["line"],
        "cpu_threads": threads,
        "model": opts.model_path
        or f"synthetic {opts.dim}x{opts.hidden_dim}, {opts.n_layers} layers, {opts.n_experts} experts, {opts.q_bits or 'no'}-bit",
        "load_s": load_s,
        "prompt_tokens": opts.prompt_tokens,
        "prompt_tps": statistics.median(r[0] for r in runs),
        "gen_tokens": opts.gen_tokens,
        "generation_tps": gen_tps,
        "ttft_turn1_s": statistics.median(t[0] for t in turns),
        f"ttft_turn{opts.chat_turns}_s": statistics.median(t[-1] for t in turns),
        "decode_step_ms": 1000 / gen_tps,
        "weight_gb_per_token": (per_token := weights_per_token(model) / GB),
        "decode_weight_gbps": per_token * gen_tps,
        "read_gbps_1_thread": read_bandwidth(),
        "peak_memory_gb": mx.get_peak_memory() / GB,
    }
    if not opts.core_only:
        result |= {"decode_kernels_ms": run_ms, "decode_python_ms": build_ms}
        result["decode_overhead"] = result["decode_step_ms"] / run_ms - 1
        result["experts_cost"], result["experts_cost_median"] = experts_cost(model)
    result["ttft_ratio"] = result[f"ttft_turn{opts.chat_turns}_s"] / result["ttft_turn1_s"]
    if model.group is not None:
        mine = {
            "weight_gb": machine.weight_bytes(model) / GB,
            "peak_memory_gb": mx.get_peak_memory() / GB,
            "generation_tps": gen_tps,
            "collectives_ms_per_token": collective_ms(model),
        }
        result["ranks"] = per_rank(model, mine)
        kv = machine.kv_bytes_per_token(model.args, model.kv_dtype)
        print(f"plan: {model.plan.describe()}\n{parallel.plan_table(model.plan, model.args, kv)}", file=sys.stderr)
    for depth in opts.depth or []:
        result[f"depth_{depth}_prompt_tps"], result[f"depth_{depth}_generation_tps"] = at_depth(model, opts, depth)
    if opts.resume_tokens:
        result |= resume_figures(model, tokenizer, opts)
    if opts.json_schema:
        result |= grammar_figures(model, tokenizer, opts)
    if opts.server:
        generate_tps = prompt_and_decode(model, opts)[1]  # in-process, right before the server runs
        result["one_stream_before_server_tps"] = generate_tps  # what the ratios below divide by
        result |= server_figures(opts, result["cpu_threads"])
        result["server_vs_generate_tps"] = result["server_generation_tps"] / generate_tps
        if 16 in opts.clients:
            result["server_16_clients_vs_one_stream"] = result["server_16_clients_tokens_per_s"] / generate_tps
            # Decode against decode: the tokens a second while all 16 decode, over one stream's (in process,
            # and through the server: its one client alone, both in this run).
            result["server_16_clients_decode_vs_one_stream"] = (
                result["server_16_clients_decode_tokens_per_s"] / generate_tps
            )
            if 1 in opts.clients:
                result["server_16_clients_decode_vs_one_client"] = (
                    result["server_16_clients_decode_tokens_per_s"] / result["server_1_clients_decode_tokens_per_s"]
                )
    if opts.mlx_lm_model:
        lm = run_mlx_lm(opts)
        result["mlx_lm"] = lm
        result["prompt_speedup"] = result["prompt_tps"] / lm["prompt_tps"]
        result["decode_speedup"] = gen_tps / lm["generation_tps"]
    rows = [{key: result[key] for key in COMPARED if key in result} | {"kernels": ops.KERNELS["name"]}]
    if opts.compare_kernels:
        rows += other_kernels(opts, ops.KERNELS["name"])
        result["compared"] = rows
    if opts.llama_bench is not None:
        llama = {k: statistics.median(r[k] for r in llama_runs) for k in ("prompt_tps", "generation_tps")}
        if opts.depth:
            llama |= run_llama_bench(opts, threads, opts.depth)
        result["llama_cpp"] = llama
        result["prompt_vs_llama_cpp"] = result["prompt_tps"] / llama["prompt_tps"]
        result["decode_vs_llama_cpp"] = gen_tps / llama["generation_tps"]
        result["decode_vs_llama_cpp_each_run"] = [o[1] / t["generation_tps"] for o, t in zip(runs, llama_runs)]
        # The median of the pairs' ratios: each pair saw the same minute of the machine, where the ratio of
        # the two medians may set a fast minute of one side against a slow one of the other.
        result["decode_vs_llama_cpp_paired"] = statistics.median(result["decode_vs_llama_cpp_each_run"])
        for depth in opts.depth or []:
            for what in ("prompt", "generation"):
                key = f"depth_{depth}_{what}_tps"
                result[f"{key.removesuffix('_tps')}_vs_llama_cpp"] = result[key] / llama[key]

    width = max(map(len, result))
    for k, v in result.items():
        if k == "compared":
            continue  # the table below
        shown = f"{v:.3f}" if isinstance(v, float) else v
        if isinstance(v, list) and all(isinstance(x, float) for x in v):
            shown = ", ".join(f"{x:.3f}" for x in v)
        print(f"{k:<{width}}  {shown}", file=sys.stderr)
    if opts.compare_kernels or opts.llama_bench is not None:
        print(comparison_table(rows, result.get("llama_cpp")), file=sys.stderr)
    if opts.server:
        print(load_table(result, opts.clients), file=sys.stderr)
    text = json.dumps(result, indent=2)
    if mx.distributed.init().rank() != 0:
        return  # rank 0 reports for all
    if opts.json:
        with open(opts.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
