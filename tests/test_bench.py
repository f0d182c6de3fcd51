"""bench.py at a tiny size: a smoke run, not a measurement."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import bench
from conftest import assert_one_line_error, run_script

TINY = [
    "--dim",
    64,
    "--hidden-dim",
    128,
    "--n-layers",
    1,
    "--n-heads",
    4,
    "--n-kv-heads",
    2,
    "--head-dim",
    16,
    "--prompt-tokens",
    8,
    "--gen-tokens",
    4,
    "--chat-turns",
    3,
    "--turn-tokens",
    4,
    "--reply-tokens",
    4,
]


def run_bench(*args):
    r = run_script("bench.py", *args, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_synthetic_bench_reports_every_figure():
    result = run_bench("--synthetic", *TINY)
    for key in (
        "load_s",
        "prompt_tps",
        "generation_tps",
        "ttft_turn1_s",
        "ttft_turn3_s",
        "peak_memory_gb",
        "compute_dtype",
        "device",
        "decode_kernels_ms",
        "decode_python_ms",
        "experts_cost",
    ):
        assert key in result
    assert result["prompt_tps"] > 0 and result["generation_tps"] > 0
    assert result["compute_dtype"] == "float32"


def test_bench_runs_on_a_converted_model(mlx_q8):
    result = run_bench("--model-path", mlx_q8, *TINY[-10:])
    assert result["generation_tps"] > 0 and result["model"] == str(mlx_q8)


def test_bench_measures_the_server_through_http(mlx_q8):
    result = run_bench("--model-path", mlx_q8, "--server", *TINY[-10:], "--clients", "1,3", "--client-tokens", 4)
    for key in ("server_reuse_ttft_ratio", "server_no_reuse_ttft_ratio"):
        assert result[key] > 0, result
    assert result["server_parallel"] == 16
    assert result["one_stream_before_server_tps"] == pytest.approx(
        result["server_generation_tps"] / result["server_vs_generate_tps"]
    )
    for label in ("server", "server_parallel_1"):
        for n in (1, 3):
            assert result[f"{label}_{n}_clients_tokens_per_s"] > 0, result
            assert result[f"{label}_{n}_clients_decode_tokens_per_s"] > 0, result
            assert 0 < result[f"{label}_{n}_clients_ttft_median_s"] <= result[f"{label}_{n}_clients_ttft_p95_s"]
    assert (
        result["server_1_client_vs_parallel_1_paired"] > 0
        and result["server_3_clients_decode_vs_one_client_paired"] > 0
    )


def test_the_clients_decode_rate_counts_only_the_tokens_while_all_of_them_decode():
    # Client b's prompt waits (its first token at 10 s) while a decodes from 1 s on: the stretch when both
    # decode is 10..12 s, and a's tokens before it (prefill's time, for the two together) are not counted.
    a = [1.0 + 0.5 * i for i in range(23)]  # 1 .. 12 s
    b = [10.0 + 0.25 * i for i in range(13)]  # 10 .. 13 s
    assert bench.decode_rate([a, b]) == pytest.approx((4 + 8) / 2)
    assert bench.decode_rate([a]) == pytest.approx(22 / 11)  # one client: its tokens after the first
    # Never all at once: every token after each one's first, over the whole span.
    assert bench.decode_rate([[0.0, 1.0], [2.0, 3.0, 4.0]]) == pytest.approx(3 / 4)


def test_tokens_held_back_into_a_later_event_are_spread_over_the_silence_before_it():
    # 14 tokens in 5 text events, the last one carrying 10 (byte tokens that never made a character):
    # the stream was silent 10 s while they were decoded, one a second like the others.
    times = bench.token_times([0.0, 1.0, 2.0, 3.0, 13.0], 14)
    assert times == pytest.approx([float(t) for t in range(14)])
    assert bench.decode_rate([times]) == pytest.approx(1.0)
    assert bench.token_times([0.0, 1.0, 2.0], 3) == [0.0, 1.0, 2.0]  # one token an event: as they came


def test_a_reply_s_tokens_are_the_server_s_usage_count_not_its_text_events():
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert body["stream_options"] == {"include_usage": True}
            self.send_response(200)
            self.end_headers()
            for text in ("a", "b", "\ufffd" * 6):
                self.wfile.write(b"data: " + json.dumps({"choices": [{"delta": {"content": text}}]}).encode() + b"\n\n")
            self.wfile.write(b'data: {"choices": [], "usage": {"completion_tokens": 8}}\n\ndata: [DONE]\n\n')

        def log_message(self, *a):
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        text, first, last, tokens, times = bench.ask(f"http://127.0.0.1:{httpd.server_port}/", [], 8)
        httpd.shutdown()
    assert text == "ab" + "\ufffd" * 6 and tokens == 8 and len(times) == 8 and first <= last


# llama-server's side of the protocol bench.py uses: /health, then streamed chat chunks; it writes its argv beside it.
FAKE_LLAMA_SERVER = """#!/usr/bin/env python3
import json, pathlib, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
pathlib.Path(sys.argv[0]).with_suffix(".args").write_text(json.dumps(sys.argv[1:]))
port = int(sys.argv[sys.argv.index("--port") + 1])
class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["ignore_eos"] and body["stream"]
        self.send_response(200); self.send_header("Content-Type", "text/event-stream"); self.end_headers()
        for _ in range(body["max_tokens"]):
            self.wfile.write(b'data: {"choices": [{"delta": {"content": "x"}}]}\\n\\n')
        self.wfile.write(b"data: [DONE]\\n\\n")
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def test_llama_server_gets_the_same_clients_with_slots_equal_to_our_parallel(tmp_path, mlx_q8):
    fake = tmp_path / "llama-server"
    fake.write_text(FAKE_LLAMA_SERVER)
    fake.chmod(0o755)
    flags = ["--server", "--core-only", "--clients", "2", "--client-tokens", 5, "--cpu-threads", 1]
    result = run_bench("--model-path", mlx_q8, *TINY[-10:], *flags, "--llama-server", f"{fake} -m model.gguf")
    args = json.loads(fake.with_suffix(".args").read_text())
    assert (
        args[:2] == ["-m", "model.gguf"] and args[args.index("-np") + 1] == "16" and args[args.index("-t") + 1] == "1"
    )
    assert result["llama_server_2_clients_tokens_per_s"] > 0
    assert result["server_vs_llama_server_2_clients"] == pytest.approx(
        result["server_2_clients_tokens_per_s"] / result["llama_server_2_clients_tokens_per_s"]
    )
    assert result["server_vs_llama_server_2_clients_decode"] == pytest.approx(
        result["server_2_clients_decode_tokens_per_s"] / result["llama_server_2_clients_decode_tokens_per_s"]
    )


class Asked:
    """A server for bench.side_by_side that notes, in one list for all, who was asked; each reply is two
    tokens `1 / rate` seconds apart."""

    def __init__(self, name, asked, rate=1.0):
        self.name, self.asked, self.rate = name, asked, rate

    def ask(self, messages, max_tokens):
        self.asked.append(self.name)
        return "", 0.0, 1.0 / self.rate, max_tokens, [0.0, 1.0 / self.rate]

    def close(self):
        pass


def side_by_side_order(tmp_path, monkeypatch, budget, pair_rounds=0, clients=(1, 2), slots=16):
    asked = []
    monkeypatch.setattr(bench, "llama_command", lambda *a: ["llama-server"])
    monkeypatch.setattr(bench, "LlamaServer", lambda *a: Asked("llama", asked))
    monkeypatch.setattr(bench, "Served", lambda *a: Asked("serial", asked, rate=0.8))
    monkeypatch.setattr(bench.machine, "model_budget", lambda: budget)
    (tmp_path / "weights.00.npz").write_bytes(b"0" * 1000)
    opts = bench.argparse.Namespace(
        model_path=str(tmp_path),
        llama_server="llama-server",
        clients=list(clients),
        turn_tokens=4,
        client_tokens=3,
        pair_rounds=pair_rounds,
    )
    return asked, bench.side_by_side(Asked("ours", asked), opts, 1, slots)


def test_parallel_1_and_llama_server_take_each_count_of_clients_right_after_ours(tmp_path, monkeypatch):
    # The same minute of a shared machine for both sides of each ratio.
    order = ["ours", "serial", "llama", "ours", "ours", "serial", "serial", "llama", "llama"]
    assert side_by_side_order(tmp_path, monkeypatch, 4001)[0] == order


def test_the_servers_run_one_after_another_where_memory_does_not_hold_them_all(tmp_path, monkeypatch):
    order = ["ours"] * 3 + ["serial"] * 3 + ["llama"] * 3
    assert side_by_side_order(tmp_path, monkeypatch, 4000, pair_rounds=2)[0] == order


def test_the_batching_bar_s_ratios_come_from_adjacent_rounds(tmp_path, monkeypatch):
    # Each round: one client on ours and on --parallel 1 (first in turn), then the largest count on ours.
    asked, out = side_by_side_order(tmp_path, monkeypatch, 4001, pair_rounds=2)
    assert asked[9:] == ["ours", "serial", "ours", "ours", "serial", "ours", "ours", "ours"]
    # ours decodes 1 token/s alone, --parallel 1 0.8; the 2 clients together 2 tokens/s.
    assert out["server_1_client_vs_parallel_1_each_round"] == pytest.approx([1.25, 1.25])
    assert out["server_1_client_vs_parallel_1_paired"] == pytest.approx(1.25)
    assert out["server_2_clients_decode_vs_one_client_paired"] == pytest.approx(2.0)


def test_the_rounds_batch_is_the_largest_count_of_clients_up_to_our_parallel(tmp_path, monkeypatch):
    _, out = side_by_side_order(tmp_path, monkeypatch, 4001, pair_rounds=1, clients=(1, 4, 8), slots=4)
    assert out["server_4_clients_decode_vs_one_client_paired"] == pytest.approx(4.0)


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("--chat-turns", 0, "--chat-turns must be at least 1, got 0"),
        ("--gen-tokens", -1, "--gen-tokens must be at least 1, got -1"),
        ("--repeat", 0, "--repeat must be at least 1, got 0"),
        ("--top-k", 9, "--top-k (9) cannot exceed --n-experts (8)"),
    ],
)
def test_a_count_flag_out_of_range_is_a_one_line_error(flag, value, says):
    # --chat-turns 0 ended in an IndexError from statistics.median, after the model had loaded.
    assert_one_line_error(run_script("bench.py", "--synthetic", *TINY, flag, value), says)


def test_compare_kernels_runs_each_kernel_choice_side_by_side():
    result = run_bench("--synthetic", *TINY, "--compare-kernels")
    rows = result["compared"]
    assert [r["kernels"] for r in rows] == ["int16", "exact", "mlx"]  # CI builds ours: int16 is the default
    for r in rows:
        assert r["prompt_tps"] > 0 and r["generation_tps"] > 0 and r["decode_weight_gbps"] > 0, r


# llama-bench's output format (one JSON object per test, -o jsonl), with the command it got written beside it.
FAKE_LLAMA_BENCH = """#!/usr/bin/env python3
import json, pathlib, sys
pathlib.Path(sys.argv[0]).with_suffix(".args").write_text(json.dumps(sys.argv[1:]))
with pathlib.Path(sys.argv[0]).with_suffix(".calls").open("a") as calls:
    calls.write(json.dumps(sys.argv[1:]) + "\\n")
depths = sys.argv[sys.argv.index("-d") + 1].split(",") if "-d" in sys.argv else ["0"]
p, n = (int(sys.argv[sys.argv.index(flag) + 1]) for flag in ("-p", "-n"))
for d in map(int, depths):
    if p:
        print(json.dumps({"model_type": "llama 8x7B Q8_0", "n_prompt": p, "n_gen": 0, "n_depth": d, "avg_ts": 200.0 - d}))
    if n:
        print(json.dumps({"model_type": "llama 8x7B Q8_0", "n_prompt": 0, "n_gen": n, "n_depth": d, "avg_ts": 50.0 - d}))
"""


def test_llama_bench_runs_at_the_same_sizes_and_its_ratios_are_reported(tmp_path):
    fake = tmp_path / "llama-bench"
    fake.write_text(FAKE_LLAMA_BENCH)
    fake.chmod(0o755)
    result = run_bench("--synthetic", *TINY, "--core-only", "--llama-bench", f"{fake} -m model.gguf --repack 0")
    calls = [json.loads(line) for line in fake.with_suffix(".calls").read_text().splitlines()]
    t = str(result["cpu_threads"])
    same = ["-t", t, "-r", "1", "-o", "jsonl"]
    assert calls == [  # its prefill right before ours, its decode right after ours
        ["-m", "model.gguf", "--repack", "0", "-p", "8", "-n", "0", *same],
        ["-m", "model.gguf", "--repack", "0", "-p", "0", "-n", "4", *same],
    ]
    assert result["llama_cpp"] == {"prompt_tps": 200.0, "generation_tps": 50.0}
    assert result["decode_vs_llama_cpp"] == pytest.approx(result["generation_tps"] / 50.0)
    assert result["prompt_vs_llama_cpp"] == pytest.approx(result["prompt_tps"] / 200.0)


def test_depth_times_prefill_and_decode_over_a_filled_cache_beside_llama_bench_d(tmp_path):
    fake = tmp_path / "llama-bench"
    fake.write_text(FAKE_LLAMA_BENCH)
    fake.chmod(0o755)
    result = run_bench("--synthetic", *TINY, "--core-only", "--depth", "16,40", "--llama-bench", str(fake))
    args = json.loads(fake.with_suffix(".args").read_text())
    assert args[args.index("-d") :][:6] == ["-d", "16,40", "-ctk", "f16", "-ctv", "f16"]
    assert result["llama_cpp"]["depth_40_generation_tps"] == 10.0
    for d in (16, 40):
        assert result[f"depth_{d}_prompt_tps"] > 0 and result[f"depth_{d}_generation_tps"] > 0
        assert result[f"depth_{d}_generation_vs_llama_cpp"] == pytest.approx(
            result[f"depth_{d}_generation_tps"] / (50.0 - d)
        )


def test_llama_bench_runs_once_beside_each_of_our_runs(tmp_path):
    # Each of our --repeat runs has llama-bench's prefill right before it and its decode right after: each
    # pair sees the same minute of a shared machine, where its memory's speed drifts.
    fake = tmp_path / "llama-bench"
    fake.write_text(FAKE_LLAMA_BENCH)
    fake.chmod(0o755)
    result = run_bench("--synthetic", *TINY, "--core-only", "--repeat", "2", "--llama-bench", str(fake))
    calls = [json.loads(line) for line in fake.with_suffix(".calls").read_text().splitlines()]
    assert len(calls) == 4 and all(c[c.index("-r") + 1] == "1" and "-d" not in c for c in calls)
    each = result["decode_vs_llama_cpp_each_run"]
    assert len(each) == 2 and result["decode_vs_llama_cpp_paired"] == pytest.approx((each[0] + each[1]) / 2)
    assert result["llama_cpp"] == {"prompt_tps": 200.0, "generation_tps": 50.0}


def test_a_llama_bench_that_is_not_there_is_a_one_line_error(tmp_path):
    r = run_script("bench.py", "--synthetic", *TINY, "--core-only", "--llama-bench", str(tmp_path / "nowhere"))
    assert_one_line_error(r, "--llama-bench:", "nowhere", "pass the llama-bench binary's path")
