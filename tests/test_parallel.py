"""One model over several ranks (parallel.shard), checked with 2 local ranks under mlx.launch's ring
backend on the loopback interface against one process. mlx.launch exits 0 even when a rank fails, so
every test checks what the ranks wrote."""

import contextlib
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_map

import convert
import machine
import mixtral
import parallel
import runtime
from conftest import LAYOUTS, ROOT, convert_form, examples
from synthetic import write_hf_checkpoint


@pytest.fixture(scope="module")
def hf_shardable(tmp_path_factory):
    # Per rank: 1 KV head of 64 (wk, wv), 2 query heads (128), hidden_dim 128: whole groups of 64.
    return write_hf_checkpoint(
        tmp_path_factory.mktemp("hf") / "shardable",
        seed=3,
        hidden_size=128,
        intermediate_size=256,
        head_dim=64,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory, hf_shardable):
    out = tmp_path_factory.mktemp("mlx")
    return {name: convert_form(hf_shardable, out / name.replace(" ", "-"), **kw) for name, kw in LAYOUTS.items()}


def launch(n, *args, stdin=None, timeout=180, wait=True):
    # What the mlx.launch command runs (its module has no __main__ of its own).
    launcher = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"
    # Ports of our own: the launcher's default (32323 on) may still be held by an earlier launch's rank.
    # "--": without it the launcher takes our programs' flags that it also has (--verbose) for its own.
    ring = ["-n", str(n), "--backend", "ring", "--starting-port", str(free_ports(n))]
    cmd = [sys.executable, "-c", launcher, *ring, "--", sys.executable, *map(str, args)]
    if not wait:  # marked, so that rank_pids finds this run's ranks and no other's
        mark = uuid.uuid4().hex
        pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc = subprocess.Popen(cmd, **pipes, text=True, env=os.environ | {LAUNCH_MARK: mark})
        proc.mark = mark
        return proc
    # Standard input that stays open: at the end of its input mlx.launch's loop spins on a core (select()
    # says readable, read() gets nothing), and a 2-rank run on 2 cores took 10x as long.
    inp, keep = os.pipe()
    os.write(keep, (stdin or "").encode())  # a few lines: they fit in the pipe's buffer
    pipes = dict(stdin=inp, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Its own session: at the timeout the launcher goes with its ranks (killing the launcher alone left
    # them polling a core, and every test after ran on one).
    proc = subprocess.Popen(cmd, **pipes, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        os.close(inp)
        os.close(keep)
    r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    # mlx.launch exits 0 whatever the ranks did: a rank that crashed (aborted, killed) shows here. Its own
    # SIGTERM (-15) can end a rank still importing, before it has a handler, when another rank failed.
    crashed = re.search(r"exited with code -(?!15\b)\d+", r.stderr)
    assert "Fatal Python error" not in r.stderr and not crashed, r.stderr[-3000:]
    return r


def said(err: str) -> list:
    """Our programs' messages in a launch's stderr: each rank's lines that start with error, warning or
    stopped (another rank's marked "[rank N]"); not MLX's or the launcher's lines, whatever pieces the
    ranks' output cut those into."""
    return re.findall(r"^(?:\[rank \d+\] )?(?:error|warning|stopped)\b.*$", err, re.M)


def free_ports(n: int) -> int:
    """The first of n consecutive loopback ports that are free now."""
    for _ in range(100):
        first = random.SystemRandom().randrange(20000, 60000)  # not the seeded one: hypothesis seeds it
        with contextlib.ExitStack() as held:
            try:
                for port in range(first, first + n):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first
    raise AssertionError("no free ports")


def run_ranks(tmp_path, model, n=2, temp=0.0, shares=None):
    """Logits of a prompt and 40 generated ids from each of n ranks, and from one process."""
    r = launch(n, ROOT / "tests" / "rank_run.py", model, tmp_path, temp, *([shares] if shares else []))
    ranks = [tmp_path / f"rank{i}.npz" for i in range(n)]
    assert all(p.exists() for p in ranks), r.stderr[-3000:]
    single = tmp_path / "single"
    single.mkdir()
    subprocess.run([sys.executable, ROOT / "tests" / "rank_run.py", model, single, str(temp)], check=True, timeout=120)
    return [dict(np.load(p)) for p in ranks], dict(np.load(single / "rank0.npz"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_ranks_give_the_logits_and_greedy_tokens_of_one_process(tmp_path, converted, layout, monkeypatch):
    # The exact kernels: the ranks' partial sums add up in another order, and the int16 path's rounding
    # of activations would turn those float32 differences into 1e-3 ones (it is tested in test_kernels.py).
    monkeypatch.setenv("MIXTRAL_KERNELS", "exact")
    ranks, one = run_ranks(tmp_path, converted[layout])
    assert [r["size"] for r in ranks] == [2, 2]
    for r in ranks:
        np.testing.assert_allclose(r["logits"], one["logits"], atol=1e-4, rtol=0)
        assert r["ids"].tolist() == one["ids"].tolist() and len(r["ids"]) >= 32
        assert r["weight_bytes"] < one["weight_bytes"]  # each rank holds its share only


def test_sampled_tokens_are_the_same_on_every_rank_and_as_in_one_process(tmp_path, converted, monkeypatch):
    monkeypatch.setenv("MIXTRAL_KERNELS", "exact")  # as above: the same logits to ~1e-5
    ranks, one = run_ranks(tmp_path, converted["8-bit standard"], temp=0.9)
    assert ranks[0]["ids"].tolist() == ranks[1]["ids"].tolist() == one["ids"].tolist()
    assert len(set(one["ids"].tolist())) > 5  # sampled, not a repeated greedy loop


def test_piped_chat_over_two_ranks_prints_the_transcript_of_one_process(tmp_path, converted, monkeypatch):
    model = converted["8-bit standard"]
    monkeypatch.setenv("MIXTRAL_KERNELS", "exact")  # the ranks' logits equal one process's to ~1e-5

    def turns(name):  # every /command, and a transcript saved by rank 0
        return (
            f"hi there\nwhat is 2+2?\n/undo\ntell me a joke\n/regen\n/system Be brief.\nand now?\n/reset\n"
            f"last one\n/help\n/save {tmp_path / name}\n"
        )

    # Sampled (temp 0.8) among the few tokens min-p 0.5 keeps: the logits of 2 ranks equal one process's
    # to ~1e-5, not to the bit, and this random model's distribution is flat. Over the whole vocabulary
    # (or at a top-p cut) thousands of tokens of ~3e-5 each lie side by side, and MLX's categorical
    # walks their cumulative sum: a 1e-5 difference moved the draw to the next token id in 1 to 3
    # seeds of 6. Among a few tokens, tens of percent apart, it does not (8 seeds of 8 agree).
    # (The ranks agree with each other exactly.)
    args = [ROOT / "chat.py", "--model-path", model, "--seed", 3, "--max-tokens", 20, "--temp", 0.8]
    args += ["--top-p", 1.0, "--min-p", 0.5]
    one = subprocess.run(
        [sys.executable, *map(str, args)], input=turns("one.json"), capture_output=True, text=True, timeout=120
    )
    two = launch(2, *args, stdin=turns("two.json") + "/quit\n")
    assert one.returncode == 0, one.stderr
    assert one.stdout.count("\n") == 6 and two.stdout == one.stdout, two.stderr[-3000:]  # 5 replies and a /regen
    assert (tmp_path / "one.json").read_text().replace("one.json", "") == (tmp_path / "two.json").read_text().replace(
        "two.json", ""
    )


def test_a_chat_under_a_json_schema_over_two_ranks_replies_as_one_process(tmp_path, converted, monkeypatch):
    # Rank 0 reads the schema and hands every rank its grammar: each draws step for step as rank 0 does
    # (a rank without it queued one draw more at a reply's end, and the ranks' collectives fell apart).
    monkeypatch.setenv("MIXTRAL_KERNELS", "exact")  # the ranks' logits equal one process's to ~1e-5
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "mood": {"enum": ["bored", "annoyed"]}},
        "required": ["name", "mood"],
        "additionalProperties": False,
    }
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    args = [ROOT / "chat.py", "--model-path", converted["8-bit standard"], "--max-tokens", 60, "--temp", 0]
    args += ["--json-schema", tmp_path / "schema.json"]
    one = subprocess.run(
        [sys.executable, *map(str, args)], input="hi\nagain\n", capture_output=True, text=True, timeout=120
    )
    two = launch(2, *args, stdin="hi\nagain\n/quit\n")
    assert one.returncode == 0 and two.stdout == one.stdout and "Traceback" not in two.stderr, two.stderr[-3000:]
    assert one.stdout.count("}") >= 2  # two replies, each a closed object


def test_each_rank_saves_and_resumes_its_part_of_the_cache_and_rank_0_reports_the_experts(tmp_path, converted):
    model, talk, experts = converted["8-bit standard"], tmp_path / "talk.json", tmp_path / "experts.json"
    args = [ROOT / "chat.py", "--model-path", model, "--max-tokens", 6, "--temp", 0, "--verbose"]
    first = launch(2, *args, stdin=f"hello there\n/save {talk}\n/experts {experts}\n/quit\n")
    assert "Traceback" not in first.stderr and talk.is_file(), first.stderr[-3000:]
    assert [p.name for p in sorted(tmp_path.glob("*.kv.safetensors"))] == [
        "talk.rank0of2.kv.safetensors",
        "talk.rank1of2.kv.safetensors",
    ]
    report = json.loads(experts.read_text())
    assert len(report["ids"]["reply"]) == 6 and sum(report["layers"][0]["reply"]) == 12
    resumed = launch(2, *args, "--resume", talk, stdin="and then?\n/quit\n")
    assert "of the saved cache" not in resumed.stderr and resumed.stdout.strip(), resumed.stderr[-3000:]
    (tmp_path / "talk.rank1of2.kv.safetensors").unlink()  # one rank cannot: both prefill
    fallback = launch(2, *args, "--resume", talk, stdin="and then?\n/quit\n")
    assert "another rank could not use its part" in fallback.stderr, fallback.stderr[-3000:]
    assert fallback.stdout == resumed.stdout  # the same reply either way


def test_a_session_over_two_ranks_keeps_each_ranks_part_and_resumes_with_no_prefill(tmp_path, converted, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the ranks inherit it
    args = [ROOT / "chat.py", "--model-path", converted["8-bit standard"], "--max-tokens", 6, "--temp", 0]
    first = launch(2, *args, "--session", "demo", stdin="hello there\n/quit\n")
    assert "Traceback" not in first.stderr and first.stdout.strip(), first.stderr[-3000:]
    folder = tmp_path / "mixtral-mlx" / "sessions" / "demo"
    assert {p.name.split(".")[-2] for p in folder.glob("kv.*.safetensors")} == {"rank0of2", "rank1of2"}
    again = launch(2, *args, "--session", "demo", "--verbose", stdin="and then?\n/quit\n")
    assert "of the saved cache" not in again.stderr and again.stdout.strip(), again.stderr[-3000:]


def test_a_killed_rank_ends_every_rank_with_a_message(tmp_path, converted):
    model = converted["8-bit standard"]
    proc = launch(
        2, ROOT / "chat.py", "--model-path", model, "--max-tokens", 100000, "--max-context", 100000, wait=False
    )
    proc.stdin.write("tell me a very long story\n")
    proc.stdin.flush()
    # The reply has started (it can be short: then rank 0 is back at its prompt, rank 1 in a collective).
    assert select.select([proc.stdout], [], [], 120)[0], "no reply"
    ranks = rank_pids(proc)
    assert len(ranks) == 2, (ranks, proc.poll() is not None and proc.communicate(timeout=30))
    # Rank 0 learns of it from its failed step (seconds), or from mlx.launch's SIGTERM; stuck in MLX
    # (1 run in 3 was, before chat.py stopped waiting on a broken step's arrays), runtime's watcher
    # ends it TERM_GRACE seconds after that SIGTERM.
    err = ended_after_killing(proc, ranks[1])
    ours = "\n".join(line for line in err.splitlines() if not line.startswith("[ring]"))  # MLX's own noise
    assert "stopped (SIGTERM: another rank failed" in ours or "error: another rank stopped" in ours, ours
    assert "Traceback" not in ours


def ended_after_killing(proc, pid) -> str:
    """SIGKILL one rank of a launch(..., wait=False) -> the launcher's stderr once every rank has ended,
    within TERM_GRACE + 10 s. A launch still running 60 s on is ended, ranks and launcher (left running,
    they would poll the cores under every later test), and the test fails with what it said."""
    os.kill(pid, signal.SIGKILL)
    tic = time.time()
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        for rank in rank_pids(proc):
            os.kill(rank, signal.SIGKILL)
        proc.kill()
        pytest.fail(
            f"the launch had not ended 60 s after a rank was killed:\n{proc.communicate(timeout=30)[1][-3000:]}"
        )
    assert time.time() - tic < runtime.TERM_GRACE + 10
    return err


@pytest.mark.parametrize("program", ["chat.py", "server.py"])
def test_ranks_waiting_for_a_line_or_a_request_leave_the_cores_idle(converted, program):
    # The ring backend's collectives poll their sockets: a rank waiting in one for rank 0's next line
    # used 70-100% of a core (chat.py; 30% for server.py) before rank 0 told them "nothing yet".
    model = converted["8-bit standard"]
    port = ["--port", 0] if program == "server.py" else []
    proc = launch(2, ROOT / program, "--model-path", model, *port, wait=False)
    try:
        if program == "server.py":
            serving(proc)
        else:
            assert proc.stderr.readline(), "chat.py ended at once"  # its remark for piped input
        time.sleep(1)
        pids = rank_pids(proc)
        before, tic = [cpu_seconds(pid) for pid in pids], time.monotonic()
        time.sleep(4)
        busy = [(cpu_seconds(pid) - b) / (time.monotonic() - tic) for pid, b in zip(pids, before)]
        assert max(busy) < 0.4, busy
    finally:
        for pid in rank_pids(proc):
            os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=60)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def stuck_rank(mode: str):
    """Rank 0 of tests/stuck_rank.py once it waits on a sum that rank 1 never joins."""
    proc = launch(2, ROOT / "tests" / "stuck_rank.py", mode, wait=False)
    assert proc.stderr.readline() == "waiting\n"  # rank 1 is asleep by now, rank 0 in (or past) the sum
    return proc, rank_pids(proc)


def test_a_sigterm_ends_a_rank_stuck_inside_mlx_within_the_grace():
    # Python runs a signal's handler only when the main thread runs Python code again: this one never does.
    proc, ranks = stuck_rank("eval")
    os.kill(ranks[0], signal.SIGTERM)
    tic = time.time()
    # What must be done before the end (server.py: each stream's final event) is done as the SIGTERM comes.
    assert select.select([proc.stderr], [], [], 5)[0] and proc.stderr.readline() == "at the end: SIGTERM\n"
    proc.wait(timeout=runtime.TERM_GRACE + 30)
    assert time.time() - tic < runtime.TERM_GRACE + 5
    err = proc.stderr.read()  # communicate() would miss what readline() has buffered
    # The launcher's own lines come in any order with the ranks'.
    assert runtime.TERMINATED in err.splitlines() and "Node with rank 0 exited with code 143 " in err, err


def test_an_exit_waiting_on_mlx_ends_within_the_grace_with_its_line():
    # The outcome (a one-line error) is decided; the exit's mx.synchronize waits on a sum that never ends.
    proc, _ = stuck_rank("exit")
    tic = time.time()
    proc.wait(timeout=runtime.EXIT_GRACE + 30)
    assert time.time() - tic < runtime.EXIT_GRACE + 5
    err = proc.stderr.read()
    assert "error: a bad input, found while the sum is under way" in err.splitlines(), err
    assert "Node with rank 0 exited with code 1 " in err, err


def test_more_ranks_than_kv_heads_is_a_one_line_error(converted):
    r = launch(3, ROOT / "mixtral.py", "--model-path", converted["8-bit standard"], "--prompt", "hi")
    ours = said(r.stderr)
    assert ours == [
        "error: 3 ranks cannot share this model: each rank needs at least one of its 2 KV heads; launch 1 to 2 ranks"
    ], r.stderr


# --------------------------------------------------------------------------- the cuts, in one process


class Group(SimpleNamespace):
    def size(self):
        return self.n

    def rank(self):
        return self.r


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [2, 4])
def test_partial_outputs_of_the_ranks_add_up_to_the_whole_layer(converted, layout, n):
    """Each rank's attention and experts, with the all_sum replaced by a plain sum over ranks, give
    the unsharded layer's output: the cuts are exact in every layout, at 2 and 4 ranks (the
    checkpoint's 2 KV heads allow only 2 for attention, so at 4 only the experts are cut), and with
    the uneven shares of a plan (3:1)."""
    whole, _ = mixtral.load_model(converted[layout], dtype=mx.float32, cpu_threads=1, group=None)
    x = mx.random.normal((1, 5, whole.args.dim), key=mx.random.key(0))
    block = whole.layers[0]
    want_ff = block.feed_forward(x)
    parts = []
    for r in range(n):
        model, _ = mixtral.load_model(converted[layout], dtype=mx.float32, cpu_threads=1, group=None)
        experts = model.layers[0].feed_forward.experts
        for name, along in (("w1", "out"), ("w3", "out"), ("w2", "in")):
            layer = experts[name]
            size = parallel.out_dims(layer) if along == "out" else parallel.in_dims(layer)
            setattr(experts, name, parallel.cut(layer, r * size // n, (r + 1) * size // n, along))
        parts.append(model.layers[0].feed_forward(x))
    np.testing.assert_allclose(np.array(sum(parts)), np.array(want_ff), atol=1e-4)
    if n == 2:
        want_att = block.attention(x, mixtral.KVCache())
        parts = []
        for r in range(n):
            model, _ = mixtral.load_model(converted[layout], dtype=mx.float32, cpu_threads=1, group=None)
            unit = 64 if layout != "unquantized" else 1
            plan = parallel.make_plan(model.args, unit, parallel.part_sizes(model), [100 * 2**30] * n, [3, 1])
            parallel.shard(model, Group(n=n, r=r), plan)
            model.layers[0].attention.group = None  # sum here instead of all_sum
            parts.append(model.layers[0].attention(x, mixtral.KVCache()))
        np.testing.assert_allclose(np.array(sum(parts)), np.array(want_att), atol=1e-4)


def test_bench_under_mlx_launch_reports_each_rank(tmp_path):
    small = [
        "--synthetic",
        "--dim",
        128,
        "--hidden-dim",
        256,
        "--n-layers",
        2,
        "--n-heads",
        4,
        "--n-kv-heads",
        2,
        "--head-dim",
        64,
        "--vocab-size",
        512,
        "--prompt-tokens",
        16,
        "--gen-tokens",
        8,
        "--chat-turns",
        2,
        "--turn-tokens",
        4,
        "--reply-tokens",
        4,
        "--core-only",  # the figures per rank; the experts' cost and the step's breakdown are test_bench's
    ]
    one = subprocess.run(
        [sys.executable, ROOT / "bench.py", *map(str, small), "--json", tmp_path / "one.json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.returncode == 0, one.stderr
    launch(2, ROOT / "bench.py", *small, "--json", tmp_path / "two.json")
    one, two = (__import__("json").loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert "ranks" not in one and len(two["ranks"]) == 2
    for rank in two["ranks"]:
        assert rank["collectives_ms_per_token"] > 0 and rank["generation_tps"] > 0 and 0 < rank["weight_gb"]
    assert two["ranks"][0]["weight_gb"] == two["ranks"][1]["weight_gb"]


def test_server_over_two_ranks_answers_as_one_process_and_stops_on_sigterm(converted):
    server_answers_as_one_process(converted["8-bit standard"], 2)


def test_server_over_three_uneven_ranks_answers_as_one_process(four_heads, monkeypatch):
    monkeypatch.setenv(machine.MEMORY_CAP, "1.4,1.1,1.1")  # KV heads 2:1:1: rank 0's cache is twice the others'
    server_answers_as_one_process(four_heads, 3, "--cache-gb", 0.001)  # and the ranks drop the same caches


def server_answers_as_one_process(model, n, *flags):
    from openai import OpenAI

    import chat

    proc = launch(n, ROOT / "server.py", "--model-path", model, "--port", 0, *flags, wait=False)
    try:
        client = OpenAI(base_url=serving(proc), api_key="-", timeout=60, max_retries=0)
        alone, tokenizer = mixtral.load_model(model)
        messages, ours = [], []  # as sent, and with each reply's ids (as chat.py and the server keep them)
        for text in ("Hello there.", "And then?"):  # the second turn continues rank 0's and rank 1's caches
            messages.append({"role": "user", "content": text})
            ours.append(messages[-1])
            out = []
            for y in mixtral.generate(alone, chat.encode_messages(tokenizer, ours)):
                if y == tokenizer.eos_id or len(out) == 12:
                    break
                out.append(y)
            r = client.chat.completions.create(
                model=model.name, messages=messages, max_tokens=12, temperature=0, extra_body={"experts": True}
            )
            assert r.choices[0].message.content == tokenizer.decode(out)
            assert r.model_extra["experts"]["ids"]["reply"] == out  # the page's expert map works under mlx.launch
            messages.append({"role": "assistant", "content": r.choices[0].message.content})
            ours.append({**messages[-1], "tokens": out})
        # Several at once, greedy and sampled, as each alone: the ranks run rank 0's batch, step for step.
        # (Against the ranks' own answers one at a time: theirs differ from one process's logits by ~1e-5,
        # which can move a greedy choice between two near-equal logits after a long prompt.)
        bodies = [dict(temperature=0) if i % 2 else dict(temperature=0.8, seed=i) for i in range(6)]
        asked = [[{"role": "user", "content": f"Number {i}?" * (1 + 20 * (i % 3))}] for i in range(6)]
        answer = lambda m, kw: client.chat.completions.create(model=model.name, messages=m, max_tokens=8, **kw)
        one_by_one = [answer(m, kw).choices[0].message.content for m, kw in zip(asked, bodies)]
        with ThreadPoolExecutor(6) as pool:
            together = [r.choices[0].message.content for r in pool.map(answer, asked, bodies, timeout=120)]
        assert together == one_by_one
    finally:
        # mlx.launch passes no signal on: stop rank 0, which tells the others (and never leave one behind).
        for pid in rank_pids(proc)[:1]:
            os.kill(pid, signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            for pid in rank_pids(proc):
                os.kill(pid, signal.SIGKILL)
    assert "Traceback" not in err and not rank_pids(proc), err


def test_a_killed_rank_ends_the_server_and_its_stream_with_a_message(converted):
    import httpx

    model = converted["8-bit standard"]
    proc = launch(2, ROOT / "server.py", "--model-path", model, "--port", 0, wait=False)
    try:
        url = serving(proc)
        body = {"messages": [{"role": "user", "content": "Talk forever."}], "max_tokens": 100000, "stream": True}
        events = []
        with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 3:
                        os.kill(rank_pids(proc)[1], signal.SIGKILL)
                        tic = time.monotonic()
        # At once, even when rank 0's main thread is stuck in a collective that will never end (1 run in 2
        # here; the watcher then ends the process TERM_GRACE after mlx.launch's SIGTERM). It used to cut
        # the stream mid-chunk then: "peer closed connection without sending complete message body".
        assert '"error"' in events[-1] and "shutting down" in events[-1], events[-3:]
        assert time.monotonic() - tic < 5
        proc.wait(timeout=runtime.TERM_GRACE + 30)
        err = proc.stderr.read()
    finally:
        for pid in rank_pids(proc):
            os.kill(pid, signal.SIGKILL)
    ours = [line for line in err.splitlines() if not line.startswith(("[ring]", "\x1b["))]  # MLX's and the launcher's
    assert ours and ours[-1].startswith(("error: another rank stopped", runtime.TERMINATED)), err
    assert "Traceback" not in err


def serving(proc) -> str:
    """The base URL of a server under mlx.launch, once it serves."""
    line = ""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not line.startswith("serving "):
        line = proc.stderr.readline()
        assert line, "the server ended before serving"
    return line.split(" on ")[1].split()[0]


LAUNCH_MARK = "MIXTRAL_TEST_LAUNCH"  # in the environment of a launch's ranks: which launch they belong to


def rank_pids(proc) -> list:
    """The pids of the ranks that `proc` (a launch(..., wait=False)) started and that still run, rank 0
    first. By the launch's own mark in their environment: a rank left over by another test on the same
    model, or one whose launcher is gone, is never mistaken for one of these."""
    mine = f"{LAUNCH_MARK}={proc.mark}".encode()
    ranks = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            env = environ.read_bytes().split(b"\0")
            rank = next((v[len(b"MLX_RANK=") :] for v in env if v.startswith(b"MLX_RANK=")), None)
            if mine in env and rank is not None:
                ranks[int(rank)] = int(environ.parent.name)
    return [ranks[r] for r in sorted(ranks)]


# --------------------------------------------------------------------------- uneven shares (parallel.Plan)

MIXTRAL = mixtral.ModelArgs.from_dict(json.loads((ROOT / "params.json").read_text()))


def mixtral_sizes(bits: int):
    """Mixtral 8x7B's parts as convert.py writes them (float16 scales), from lazy arrays: nothing is
    made. -> bytes kept whole on every rank, of the attention, of the experts."""
    model = mixtral.Mixtral(MIXTRAL)
    mixtral.quantize_model(model, 64, bits, keep=lambda p: not p.endswith("feed_forward.gate"))
    model.update(
        tree_map(lambda p: p.astype(mx.float16) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters())
    )
    return parallel.part_sizes(model)


MIXTRAL_8BIT = mixtral_sizes(8)  # 0.28, 1.43 and 47.9 GB: 49.62 GB in all
MiB = 2**20


@given(
    n=st.integers(1, 8),
    memory=st.lists(st.integers(4 * 2**30, 200 * 2**30), min_size=8, max_size=8),
    shares=st.none() | st.lists(st.integers(1, 9), min_size=8, max_size=8),
)
@settings(max_examples=examples(200))
def test_a_plan_gives_every_rank_whole_heads_and_groups_that_add_up_to_the_layer(n, memory, shares):
    budgets = [m // MiB * MiB for m in memory[:n]]
    try:
        plan = parallel.make_plan(MIXTRAL, 64, MIXTRAL_8BIT, budgets, shares and shares[:n])
    except runtime.MixtralError as e:  # a share that cannot fit: refused, naming the rank and the ways out
        assert re.match(r"rank \d+ cannot hold its share .* use more ranks, other --shares, or 4-bit", str(e)), e
        return
    assert sum(plan.heads) == 8 and sum(plan.groups) == 224 and plan.unit == 64
    assert all(isinstance(x, int) and x >= 1 for x in plan.heads + plan.groups)
    for r in range(n):  # caps respected: every rank's share fits in what it can give
        assert plan.weight_bytes(r) + machine.ACTIVATIONS <= budgets[r]
    assert parallel.make_plan(MIXTRAL, 64, MIXTRAL_8BIT, budgets, shares and shares[:n]) == plan  # pure


@given(memory=st.lists(st.integers(30, 200), min_size=2, max_size=8, unique=True))
@settings(max_examples=examples(100))
def test_the_largest_share_goes_to_the_largest_memory(memory):
    budgets = [gb * 2**30 for gb in memory]
    plan = parallel.make_plan(MIXTRAL, 64, MIXTRAL_8BIT, budgets)
    largest = max(range(len(budgets)), key=lambda r: budgets[r])
    assert plan.weight_bytes(largest) == max(map(plan.weight_bytes, range(len(budgets)))), (memory, plan)
    # More memory, at least as much, to within what one head and one expert group weigh (heads are coarse).
    step = MIXTRAL_8BIT[1] // 8 + MIXTRAL_8BIT[2] // 224
    by_memory = sorted(range(len(budgets)), key=lambda r: budgets[r])
    weights = [plan.weight_bytes(r) for r in by_memory]
    assert all(a <= b + step for a, b in zip(weights, weights[1:])), (memory, plan)
    assert [plan.heads[r] for r in by_memory] == sorted(plan.heads[r] for r in by_memory)


def test_shares_follow_the_flag_and_even_ones_cut_mixtral_as_before():
    even = parallel.make_plan(MIXTRAL, 64, MIXTRAL_8BIT, [100 * 2**30] * 4, [1, 1, 1, 1])
    assert even.heads == (2, 2, 2, 2) and even.groups == (56, 56, 56, 56)
    plan = parallel.make_plan(MIXTRAL, 64, MIXTRAL_8BIT, [100 * 2**30] * 3, [2, 1, 1])
    assert plan.heads == (4, 2, 2) and plan.groups == (112, 56, 56)


def test_the_64_and_32_gb_macs_share_8bit_mixtral_which_an_even_split_cannot():
    macs = [48 * 2**30, int(32 * 2**30 * 2 / 3)]  # their GPU working sets
    with pytest.raises(runtime.MixtralError, match="rank 1 cannot hold its share"):
        parallel.make_plan(MIXTRAL, 64, MIXTRAL_8BIT, macs, [1, 1])
    plan = parallel.make_plan(MIXTRAL, 64, MIXTRAL_8BIT, macs)
    assert plan.heads == (6, 2) and plan.weight_bytes(1) < macs[1] - machine.ACTIVATIONS


def test_the_docs_show_the_plans_that_the_code_makes():
    readme = (ROOT / "docs" / "several-macs.md").read_text()
    kv = machine.kv_bytes_per_token(MIXTRAL, mx.float16)
    for budgets in ([48 * 2**30, int(32 * 2**30 * 2 / 3)], [int(36 * 2**30 * 2 / 3)] * 3):
        plan = parallel.make_plan(MIXTRAL, 64, MIXTRAL_8BIT, budgets)
        assert parallel.plan_table(plan, MIXTRAL, kv) in readme, parallel.plan_table(plan, MIXTRAL, kv)


@pytest.fixture(scope="module")
def four_heads(tmp_path_factory):
    """8-bit, 4 KV heads of 64 (whole groups) and an expert width of 16 groups: room for 3 uneven ranks."""
    hf = write_hf_checkpoint(
        tmp_path_factory.mktemp("hf") / "four-heads",
        seed=4,
        hidden_size=128,
        intermediate_size=1024,
        head_dim=64,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_hidden_layers=4,
    )
    return convert.convert(hf, tmp_path_factory.mktemp("mlx") / "four-heads", log=lambda s: None, q_bits=8)


def assert_same_as_one_process(ranks, one):
    for r in ranks:
        np.testing.assert_allclose(r["logits"], one["logits"], atol=1e-4, rtol=0)
        assert r["ids"].tolist() == one["ids"].tolist() and len(r["ids"]) >= 32
    assert all(r["heads"].tolist() == ranks[0]["heads"].tolist() for r in ranks)  # the same plan on every rank
    assert all(r["groups"].tolist() == ranks[0]["groups"].tolist() for r in ranks)


@pytest.mark.parametrize("shares, heads", [("3,1", [3, 1]), ("1,3", [1, 3]), ("1,1,1", [2, 1, 1])])
def test_uneven_shares_give_the_logits_and_greedy_tokens_of_one_process(
    tmp_path, four_heads, shares, heads, monkeypatch
):
    monkeypatch.setenv("MIXTRAL_KERNELS", "exact")  # as in the even test: sums in another order, to ~1e-6
    ranks, one = run_ranks(tmp_path, four_heads, n=len(heads), shares=shares)
    assert ranks[0]["heads"].tolist() == heads
    assert_same_as_one_process(ranks, one)
    bytes_ = [r["weight_bytes"] for r in ranks]
    assert bytes_ == [r["planned_bytes"] for r in ranks]  # each holds what the plan says
    if shares == "3,1":
        assert bytes_[0] > bytes_[1]


def test_capped_memory_weights_three_ranks_and_each_peak_follows_its_share(tmp_path, four_heads, monkeypatch):
    monkeypatch.setenv("MIXTRAL_KERNELS", "exact")
    monkeypatch.setenv(machine.MEMORY_CAP, "1.4,1.1,1.1")  # rank r takes the r-th: 0.4, 0.1, 0.1 GB beyond activations
    ranks, one = run_ranks(tmp_path, four_heads, n=3)
    assert ranks[0]["heads"].tolist() == [2, 1, 1] and ranks[0]["groups"][0] > ranks[0]["groups"][1]
    assert_same_as_one_process(ranks, one)
    for r in ranks:
        assert abs(r["peak_load"] / r["planned_bytes"] - 1) < 0.15, (r["peak_load"], r["planned_bytes"])


def test_a_rank_whose_share_cannot_fit_is_refused_in_one_line(four_heads, monkeypatch):
    monkeypatch.setenv(machine.MEMORY_CAP, "1.4,1.1,1.001")
    r = launch(3, ROOT / "mixtral.py", "--model-path", four_heads, "--prompt", "hi")
    ours = said(r.stderr)
    assert len(ours) == 1 and ours[0].startswith("error: rank 2 cannot hold its share (1 of 4 KV heads"), r.stderr
    assert "use more ranks, other --shares, or 4-bit weights" in ours[0]


def test_info_prints_the_plan_of_every_rank(four_heads, monkeypatch):
    monkeypatch.setenv(machine.MEMORY_CAP, "1.4,1.1,1.1")
    r = launch(3, ROOT / "mixtral.py", "--model-path", four_heads, "--info")
    assert "ranks         3: KV heads 2:1:1, expert groups " in r.stdout, r.stdout + r.stderr[-2000:]
    table = r.stdout.split("ranks         3:")[1].splitlines()[1:]
    assert table[0].split() == [
        "rank",
        "memory",
        "KV",
        "heads",
        "expert",
        "groups",
        "weights",
        "KV",
        "per",
        "1k",
        "tokens",
    ]
    assert [row.split()[0] for row in table[1:4]] == ["0", "1", "2"]


def test_a_session_resumes_under_its_shares_and_falls_back_in_one_line_under_others(tmp_path, four_heads, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    sessions = tmp_path / "mixtral-mlx" / "sessions"
    args = [ROOT / "chat.py", "--model-path", four_heads, "--max-tokens", 6, "--temp", 0, "--verbose"]
    first = launch(2, *args, "--shares", "3,1", "--session", "uneven", stdin="hello there\n/quit\n")
    assert "Traceback" not in first.stderr and first.stdout.strip(), first.stderr[-3000:]
    shutil.copytree(sessions / "uneven", sessions / "copy")  # the same conversation, to resume under 1:3
    same = launch(2, *args, "--shares", "3,1", "--session", "uneven", stdin="and then?\n/quit\n")
    assert "of the saved cache" not in same.stderr, same.stderr[-3000:]
    prefilled = re.search(r"\[prompt (\d+) tokens", same.stderr)
    # Only the new message (and the EOS that closed the last reply, cut off) was prefilled: 10 tokens here.
    assert prefilled and int(prefilled[1]) <= 12, same.stderr[-3000:]
    other = launch(2, *args, "--shares", "1,3", "--session", "copy", stdin="and then?\n/quit\n")
    lines = [line for line in other.stderr.splitlines() if "of the saved cache" in line]
    assert len(lines) == 1 and "saved with another shares (KV heads 3:1" in lines[0], other.stderr[-3000:]
    assert other.stdout == same.stdout  # the same reply, after a prefill of the whole conversation


def test_a_rank_killed_out_of_three_ends_all_with_one_line_each(four_heads, monkeypatch):
    monkeypatch.setenv(machine.MEMORY_CAP, "1.4,1.1,1.1")
    args = [ROOT / "chat.py", "--model-path", four_heads, "--max-tokens", 100000, "--max-context", 100000]
    proc = launch(3, *args, wait=False)
    proc.stdin.write("tell me a very long story\n")
    proc.stdin.flush()
    assert select.select([proc.stdout], [], [], 120)[0], "no reply"
    ranks = rank_pids(proc)
    assert len(ranks) == 3, ranks
    err = ended_after_killing(proc, ranks[1])
    # Each living rank's last line (rank 0's unmarked, the others' marked "[rank N]"), and no other word
    # from our programs: the launcher's colored lines, which the ranks' output can cut into pieces, aside
    # (a rank's line may also start after one of them on the same line: "...exited with code -9 [rank 2] error").
    final = re.compile(r"(?:^| )(\[rank (\d)\] )?(stopped \(SIGTERM: another rank failed|error: another rank stopped)")
    said = {}
    for line in err.splitlines():
        for m in final.finditer(line):
            said.setdefault(int(m[2] or 0), []).append(line)
    assert {rank: len(lines) for rank, lines in said.items()} == {0: 1, 2: 1}, err
    assert not re.search(r"^(\[rank \d\] )?(error|warning)", err.replace("error: another rank stopped", ""), re.M), err
    assert "Traceback" not in err
