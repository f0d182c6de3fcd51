"""convert.py: output layout, streaming memory, atomicity and one-line errors on bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import convert
import mixtral
from synthetic import write_hf_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def run_convert(*args, **kw):
    return subprocess.run(
        [sys.executable, str(ROOT / "convert.py"), *map(str, args)],
        capture_output=True,
        text=True,
        **{"timeout": 300, **kw},
    )


def peak_rss_mb(args):
    """Run a Python script with args and return its peak RSS in MB (VmHWM: this process alone, not
    the test runner it was forked from, which ru_maxrss would count)."""
    wrapper = (
        "import runpy, sys\n"
        "sys.argv = sys.argv[1:]\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "finally:\n    print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1], file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", wrapper, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return int(r.stderr.split()[-1]) / 1024


def test_output_layout_config_and_shard_budget(tmp_path, hf_tiny):
    out = tmp_path / "m"
    r = run_convert("--hf-path", hf_tiny, "--mlx-path", out, "--max-shard-gb", 0.004)
    assert r.returncode == 0, r.stderr
    shards = sorted(out.glob("weights.*.npz"))
    assert [s.name for s in shards] == [f"weights.{i:02d}.npz" for i in range(len(shards))] and len(shards) > 1
    # A shard only exceeds the budget when one tensor alone does (the 32000-row embedding here).
    for s in shards:
        if s.stat().st_size > 0.004 * 1e9 * 1.01:
            assert len(mx.load(str(s))) <= 3
    config = json.loads((out / "config.json").read_text())
    layout = "input-major" if mx.default_device() == mx.cpu else "standard"  # --layout auto
    assert config["quantization"] == {
        "group_size": 64,
        "bits": 8,
        **({"layout": layout} if layout != "standard" else {}),
    }
    assert config["rope_theta"] == 1e6 and config["moe"] == {"num_experts": 8, "num_experts_per_tok": 2}
    assert (out / "tokenizer.model").read_bytes() == (hf_tiny / "tokenizer.model").read_bytes()
    assert "bits/weight" in r.stderr.splitlines()[-2] and "quantization error" in r.stderr.splitlines()[-1]
    assert sum(line.startswith("[") and "] layer " in line for line in r.stderr.splitlines()) == 2  # one per layer


def test_experts_are_stacked_in_order(mlx_fp, hf_tiny):
    w = {}
    for s in sorted(mlx_fp.glob("weights.*.npz")):
        w.update(mx.load(str(s)))
    hf = {}
    for s in hf_tiny.glob("*.safetensors"):
        hf.update(mx.load(str(s)))
    stacked = w["layers.1.feed_forward.experts.w2.weight"]
    assert stacked.shape == (8, 64, 128)
    for e in range(8):
        assert mx.array_equal(stacked[e], hf[f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"])


@pytest.fixture(scope="module")
def hf_big(tmp_path_factory):
    # 16 layers of 8 experts of 512x1792 in 16 bf16 shards (~50 MB each, ~0.7 GB in all): a converter
    # that held the model in memory would need many shards' worth.
    return write_hf_checkpoint(
        tmp_path_factory.mktemp("hf") / "big",
        seed=1,
        n_shards=16,
        hidden_size=512,
        intermediate_size=1792,
        num_hidden_layers=16,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
    )


def test_peak_memory_stays_near_one_shard(tmp_path, hf_big):
    shards = list(hf_big.glob("*.safetensors"))
    largest = max(s.stat().st_size for s in shards) / 2**20
    total = sum(s.stat().st_size for s in shards) / 2**20
    (tmp_path / "imports.py").write_text(f"import sys; sys.path.insert(0, {str(ROOT)!r}); import convert")
    baseline = peak_rss_mb([tmp_path / "imports.py"])
    peak = peak_rss_mb(
        [
            ROOT / "convert.py",
            "--hf-path",
            hf_big,
            "--mlx-path",
            tmp_path / "out",
            "--max-shard-gb",
            str(largest * 2**20 / 1e9),
            "--in-process",
        ]
    )  # the process that converts
    # The output shard being filled (--max-shard-gb = the largest input shard), the tensor in flight
    # (its inputs, the stacked experts and their float32 copy while quantizing) and allocator slack:
    # four shards' worth, a quarter of this checkpoint; a converter holding the model needs it all.
    bound = baseline + 4 * largest
    print(
        f"peak RSS {peak:.0f} MB, baseline {baseline:.0f} MB, largest shard {largest:.0f} MB, checkpoint {total:.0f} MB"
    )
    assert peak < bound < total
    mixtral.load_model(tmp_path / "out", lazy=True)


def converting(tmp_path, hf_big):
    """convert.py writing shards into tmp_path/out -> (the converter, the pid of its child that converts)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "convert.py"),
            "--hf-path",
            hf_big,
            "--mlx-path",
            tmp_path / "out",
            "--max-shard-gb",
            "0.02",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stderr:  # wait until it is writing shards
        if line.startswith("[4/"):
            break
    (tmp,) = tmp_path.glob(".out.tmp-*")  # named after the process writing it
    assert (tmp / "weights.00.npz").exists()
    return proc, int(tmp.name.split("-")[1])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_conversion_leaves_nothing_loadable(tmp_path, hf_big, sig):
    proc, _ = converting(tmp_path, hf_big)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not (tmp_path / "out").exists()
    with pytest.raises(mixtral.MixtralError):
        mixtral.load_model(tmp_path / "out")
    if sig == signal.SIGINT:  # a clean interrupt also removes its temporary folder
        assert not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize(
    "sig, says",
    [
        (signal.SIGKILL, "SIGKILL: the system ran out of memory?"),
        (signal.SIGSEGV, "SIGSEGV: MLX's CPU backend ends so when an allocation fails"),
    ],
)
def test_a_conversion_that_dies_is_reported_in_one_line_and_leaves_nothing(tmp_path, hf_big, sig, says):
    # The OOM killer's SIGKILL, and the SIGSEGV of an allocation MLX's CPU backend does not check,
    # end the process that converts: the converter runs it as a child and answers for it.
    proc, child = converting(tmp_path, hf_big)
    os.kill(child, sig)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 1 and "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and says in last and "nothing was written" in last, err
    assert list(tmp_path.iterdir()) == []


def test_a_conversion_stuck_inside_mlx_is_killed_after_ctrl_c_and_leaves_nothing(tmp_path, hf_big):
    # MLX can hang when it cannot start a thread (under a tight ulimit -v): a signal then never reaches
    # Python code. A stopped child stands for it; the converter kills it 10 s after passing Ctrl-C on.
    proc, child = converting(tmp_path, hf_big)
    os.kill(child, signal.SIGSTOP)
    proc.send_signal(signal.SIGINT)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 130 and err.splitlines()[-1] == "interrupted: nothing was written", err
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force_and_force_replaces(tmp_path, hf_tiny):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_convert("--hf-path", hf_tiny, "--mlx-path", out)
    assert r.returncode != 0 and "--force" in r.stderr and (out / "keep.txt").exists()
    r = run_convert("--hf-path", hf_tiny, "--mlx-path", out, "--force", "--q-bits", 4)
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def broken(tmp_path, hf_tiny, what):
    src = tmp_path / "hf"
    shutil.copytree(hf_tiny, src)
    config = json.loads((src / "config.json").read_text())
    if what == "truncated":
        shard = sorted(src.glob("*.safetensors"))[1]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif what == "not mixtral":
        (src / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    elif what == "shape":
        (src / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    elif what == "missing shard":
        sorted(src.glob("*.safetensors"))[-1].unlink()
    elif what == "no tokenizer":
        (src / "tokenizer.model").unlink()
    elif what == "no config":
        (src / "config.json").unlink()
    elif what == "bad json":
        (src / "config.json").write_text("{")
    return src


@pytest.mark.parametrize(
    "what,message",
    [
        ("truncated", "model-00002-of-00003.safetensors: truncated"),
        ("not mixtral", "model_type is 'llama', not 'mixtral'"),
        ("shape", "experts.0.w1.weight: shape (128, 64) contradicts config.json"),
        ("missing shard", "model-00003-of-00003.safetensors: listed in model.safetensors.index.json but missing"),
        ("no tokenizer", "tokenizer.model: missing"),
        ("no config", "config.json: missing"),
        ("bad json", "config.json: not valid JSON"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, hf_tiny, what, message):
    src = broken(tmp_path, hf_tiny, what)
    r = run_convert("--hf-path", src, "--mlx-path", tmp_path / "out")
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_missing_folder_and_unwritable_output_are_one_line_errors(tmp_path, hf_tiny):
    r = run_convert("--hf-path", tmp_path / "nowhere", "--mlx-path", tmp_path / "out")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "nowhere: no such folder" in r.stderr
    (tmp_path / "file").write_text("")
    r = run_convert("--hf-path", hf_tiny, "--mlx-path", tmp_path / "file" / "out")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "cannot write there" in r.stderr, r.stderr


def hub_cache(tmp_path, hf_tiny, repo="test-org/tiny-mixtral"):
    """A pre-populated Hugging Face cache, as huggingface_hub lays it out after a download."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(hf_tiny, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}


def test_hub_repo_id_converts_from_the_cache_offline(tmp_path, hf_tiny, mlx_fp):
    env = hub_cache(tmp_path, hf_tiny)
    r = run_convert("--hf-path", "test-org/tiny-mixtral", "--mlx-path", tmp_path / "out", "--no-quantize", env=env)
    assert r.returncode == 0, r.stderr
    ids = mx.array([[1, 415, 2936, 9060, 285, 1142]])
    a, _ = mixtral.load_model(tmp_path / "out")
    b, _ = mixtral.load_model(mlx_fp)
    np.testing.assert_array_equal(np.array(a(ids)[0]), np.array(b(ids)[0]))
    r = run_convert("--hf-path", "test-org/unknown", "--mlx-path", tmp_path / "out2", env=env)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "test-org/unknown" in r.stderr, r.stderr


def test_the_real_mixtral_config_maps_to_params_json():
    # config.json of mistralai/Mixtral-8x7B-Instruct-v0.1 (no head_dim key: it is hidden_size / heads).
    hf = {
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "model_type": "mixtral",
        "num_attention_heads": 32,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 32000,
    }
    params = json.loads((ROOT / "params.json").read_text())
    assert convert.args_from_hf_config(hf, "config.json").to_dict() == params
