"""convert.py: layout, fidelity against mlx-lm, mlx-lm and mlx-community sources, memory, and
what it says and leaves when the input is bad or the conversion dies."""

import importlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from mlx_lm.utils import load_model as mlx_lm_load_model

import convert
import folder
import mixtral
import ops
import runtime
from conftest import ROOT, assert_one_line_error, convert_form, popen_script, run_script
from synthetic import TOKENIZER, write_hf_checkpoint

# --------------------------------------------------------------------------- layout, memory, interruptions


def run_convert(*args, **kw):
    return run_script("convert.py", *args, **{"timeout": 300, **kw})


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
    assert config["quantization"] == {"group_size": 64, "bits": 8}  # the standard layout, the only one written
    assert json.loads((out / "manifest.json").read_text())["layout"] == "standard"
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
    proc = popen_script(
        "convert.py",
        "--hf-path",
        hf_big,
        "--mlx-path",
        tmp_path / "out",
        "--max-shard-gb",
        "0.02",
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


@pytest.mark.parametrize(
    "sig, code, line",
    [(signal.SIGINT, 130, "interrupted: nothing was written"), (signal.SIGTERM, 143, runtime.TERMINATED_ALONE)],
)
def test_a_conversion_stuck_inside_mlx_is_killed_after_a_signal_and_leaves_nothing(tmp_path, hf_big, sig, code, line):
    # MLX can hang when it cannot start a thread (under a tight ulimit -v): a signal then never reaches
    # Python code. A stopped child stands for it; the converter kills it 5 s after passing the signal on,
    # before its own SIGTERM deadline (runtime.TERM_GRACE) could end it with the child's folder left.
    proc, child = converting(tmp_path, hf_big)
    os.kill(child, signal.SIGSTOP)
    proc.send_signal(sig)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == code and err.splitlines()[-1] == line, err
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


# --------------------------------------------------------------------------- fidelity against mlx-lm, mlx-lm and mlx-community sources


mlx_lm_convert = importlib.import_module("mlx_lm.convert").convert


TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun."


def mlx_lm_checkpoint(hf_path, out, bits):
    """mlx-lm's own conversion, with float32 scales (its most faithful setting)."""
    mlx_lm_convert(str(hf_path), str(out), quantize=True, q_bits=bits, q_group_size=64, dtype="float32")
    return out


def logits_of_ours(path, ids, kv_dtype=None):
    model, _ = mixtral.load_model(path, dtype=mx.float32, kv_dtype=kv_dtype)
    return np.array(model(mx.array([ids]))[0][0])


def logits_of_mlx_lm(path, ids):
    model, _ = mlx_lm_load_model(Path(path))
    return np.array(model(mx.array([ids]))[0])


@pytest.fixture(scope="module")
def fidelity(tmp_path_factory):
    """RMS logit error against transformers (float32), 17 teacher-forced positions, averaged over three
    held-out checkpoints that route every token to all 8 experts (so no expert choice can flip and
    the figure measures rounding alone)."""
    errors = {"standard": [], "input-major": [], "mlx-lm": [], "float32 cache": []} | {
        f"{b}-bit {k}": [] for b in (8, 4) for k in PATHS
    }
    for seed in (20, 21, 22):
        d = tmp_path_factory.mktemp(f"fidelity{seed}")
        hf = write_hf_checkpoint(
            d / "hf",
            seed=seed,
            hidden_size=256,
            intermediate_size=512,
            head_dim=32,
            num_attention_heads=8,
            num_key_value_heads=4,
            num_experts_per_tok=8,
        )
        ids = mixtral.Tokenizer(TOKENIZER).encode(TEXT)[:17]
        ref_model = transformers.MixtralForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids])).logits[0].numpy()
        rms = lambda x: float(np.sqrt(np.mean((x - ref) ** 2)))
        convert_form(hf, d / "standard", q_bits=8)
        convert_form(hf, d / "input-major", q_bits=None, input_major=8)  # an earlier version's folder
        for layout in ("standard", "input-major"):
            errors[layout].append(rms(logits_of_ours(d / layout, ids)))  # the default kernels and cache
        errors["float32 cache"].append(rms(logits_of_ours(d / "standard", ids, kv_dtype="float32")))
        convert_form(hf, d / "4-bit", q_bits=4)
        before = dict(ops.KERNELS)
        try:
            for bits, path in ((8, d / "standard"), (4, d / "4-bit")):
                for kernels in PATHS:  # each kernel path on the same checkpoint
                    ops.use_kernels(kernels)
                    errors[f"{bits}-bit {kernels}"].append(rms(logits_of_ours(path, ids)))
        finally:
            ops.KERNELS.update(before)
        errors["mlx-lm"].append(rms(logits_of_mlx_lm(mlx_lm_checkpoint(hf, d / "lm", 8), ids)))
    return {k: float(np.mean(v)) for k, v in errors.items()}


PATHS = ("int16", "exact", "mlx")  # our kernels' two paths, and MLX's own


@pytest.mark.parametrize("bits", [8, 4])
def test_the_default_int16_path_is_as_faithful_as_the_exact_one(fidelity, bits):
    # The CPU default rounds activations to int16 (blocks of 32): it may cost at most 10% more error.
    assert fidelity[f"{bits}-bit int16"] <= 1.10 * fidelity[f"{bits}-bit exact"], fidelity
    assert fidelity[f"{bits}-bit exact"] <= 1.01 * fidelity[f"{bits}-bit mlx"], fidelity  # the same arithmetic


def test_the_default_float16_kv_cache_costs_at_most_5_percent_more_logit_error_than_float32(fidelity):
    # Its rounding (2^-11 of each key and value) is small beside the 8-bit weights' (2^-9 of a group's range).
    assert fidelity["standard"] <= 1.05 * fidelity["float32 cache"], fidelity


def test_8bit_standard_layout_is_as_faithful_as_mlx_lm(fidelity):
    print(fidelity)
    assert fidelity["standard"] <= fidelity["mlx-lm"]


def test_an_input_major_folder_of_earlier_versions_rounded_again_at_load_is_within_1_5x_mlx_lm(fidelity):
    # Two independent roundings of the same size add in quadrature: sqrt(2) = 1.41x one (measured 1.33x).
    assert fidelity["input-major"] <= 1.5 * fidelity["mlx-lm"], fidelity


def test_scales_are_quantized_in_float32_and_stored_in_two_bytes(tmp_path, hf_tiny):
    # Independent reference: mx.quantize of the float32 weights, dequantized in float32.
    out = convert.convert(hf_tiny, tmp_path / "m", q_bits=8, log=lambda s: None)
    ours = mx.load(str(out / "weights.00.npz"))
    hf = mx.load(str(sorted(hf_tiny.glob("*.safetensors"))[1]))
    name = next(k for k in hf if k.endswith("self_attn.q_proj.weight"))
    layer = name.split(".")[2]
    w = hf[name].astype(mx.float32)
    q, s, b = mx.quantize(w, 64, 8)
    base = f"layers.{layer}.attention.wq"
    assert ours[f"{base}.scales"].dtype == mx.float16
    assert mx.array_equal(ours[f"{base}.weight"], q)
    exact = mx.dequantize(q, s, b, 64, 8)
    stored = mx.dequantize(
        q, ours[f"{base}.scales"].astype(mx.float32), ours[f"{base}.biases"].astype(mx.float32), 64, 8
    )
    as_bf16 = mx.dequantize(
        q, s.astype(mx.bfloat16).astype(mx.float32), b.astype(mx.bfloat16).astype(mx.float32), 64, 8
    )
    assert mx.abs(stored - exact).max().item() < mx.abs(as_bf16 - exact).max().item() / 4


def test_full_precision_tensors_keep_the_source_dtype(mlx_fp, hf_tiny):
    ours = {}
    for shard in mlx_fp.glob("weights.*.npz"):
        ours.update(mx.load(str(shard)))
    assert {v.dtype for v in ours.values()} == {mx.bfloat16}


def per_expert_names(lm_path, out):
    """The same checkpoint with the experts unstacked, as older mlx-community files name them."""
    shutil.copytree(lm_path, out)
    names = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    weights = {}
    for f in out.glob("*.safetensors"):
        for k, v in mx.load(str(f)).items():
            if ".switch_mlp." in k:
                prefix, proj, part = k.split(".switch_mlp.")[0], *k.split(".switch_mlp.")[1].split(".")
                for e in range(v.shape[0]):
                    weights[f"{prefix}.experts.{e}.{names[proj]}.{part}"] = v[e]
            else:
                weights[k] = v
        f.unlink()
    (out / "model.safetensors.index.json").unlink()
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    return out


@pytest.fixture(scope="module", params=[8, 4])
def mlx_lm_folder(request, tmp_path_factory, hf_tiny):
    return mlx_lm_checkpoint(hf_tiny, tmp_path_factory.mktemp("lm") / f"lm{request.param}", request.param)


@pytest.mark.parametrize("naming", ["stacked", "per-expert"])
def test_mlx_lm_checkpoint_repacks_without_loss(tmp_path, mlx_lm_folder, naming, kernels):
    kernels("mlx")  # mlx-lm's own kernels on both sides: then any difference is the repacking's
    src = mlx_lm_folder if naming == "stacked" else per_expert_names(mlx_lm_folder, tmp_path / "old")
    out = convert.convert(src, tmp_path / "ours", tokenizer=TOKENIZER, log=lambda s: None)
    config = json.loads((out / "config.json").read_text())
    bits = json.loads((src / "config.json").read_text())["quantization"]["bits"]
    assert config["quantization"] == {"group_size": 64, "bits": bits}  # the source's, standard layout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization_error"] == {} and manifest["repacked_tensors"] > 0
    ids = mixtral.Tokenizer(TOKENIZER).encode(TEXT)
    np.testing.assert_allclose(logits_of_ours(out, ids), logits_of_mlx_lm(src, ids), atol=1e-4, rtol=0)


def test_mlx_lm_router_is_dequantized_to_full_precision(tmp_path, mlx_lm_folder):
    out = convert.convert(mlx_lm_folder, tmp_path / "ours", tokenizer=TOKENIZER, log=lambda s: None)
    ours = {}
    for shard in out.glob("weights.*.npz"):
        ours.update(mx.load(str(shard)))
    lm = mx.load(str(mlx_lm_folder / "model.safetensors"))
    p = "model.layers.0.block_sparse_moe.gate"
    bits = json.loads((mlx_lm_folder / "config.json").read_text())["quantization"]["bits"]
    expected = mx.dequantize(lm[f"{p}.weight"], lm[f"{p}.scales"], lm[f"{p}.biases"], 64, bits)
    assert "layers.0.feed_forward.gate.scales" not in ours
    assert mx.array_equal(ours["layers.0.feed_forward.gate.weight"], expected)


def test_the_input_major_layout_is_no_longer_written_and_says_so_in_one_line(tmp_path, hf_tiny):
    r = run_convert("--hf-path", hf_tiny, "--mlx-path", tmp_path / "im", "--layout", "input-major")
    assert_one_line_error(r, "--layout input-major", "leave --layout out")
    assert not (tmp_path / "im").exists()


def test_a_folder_without_tokenizer_model_names_the_flag_and_where_to_get_it(tmp_path, mlx_lm_folder):
    r = subprocess.run(
        [sys.executable, str(ROOT / "convert.py"), "--hf-path", mlx_lm_folder, "--mlx-path", tmp_path / "o"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert (
        "tokenizer.model: missing" in r.stderr
        and "--tokenizer" in r.stderr
        and "Mixtral-8x7B-Instruct-v0.1" in r.stderr
    )


def test_a_tokenizer_of_another_vocabulary_is_refused(tmp_path, hf_tiny):
    src = tmp_path / "hf"
    shutil.copytree(hf_tiny, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "vocab_size": 32064}))
    with pytest.raises(mixtral.MixtralError, match="vocabulary of 32000 tokens, but the model has 32064"):
        convert.convert(src, tmp_path / "o", log=lambda s: None)


def test_every_conversion_reports_each_quantized_tensor_within_the_rounding_bound(tmp_path, hf_tiny):
    lines = []
    out = convert.convert(hf_tiny, tmp_path / "m", q_bits=4, log=lines.append)
    manifest = json.loads((out / "manifest.json").read_text())
    errors = manifest["quantization_error"]
    # Every projection and the embeddings/head are quantized; the router and the norms are not.
    assert len(errors) == 2 + 2 * 7 and not any("gate" in k or "norm" in k for k in errors)
    # Gaussian weights in groups of 64 at 4 bits: about 9% (a step of ~4.8 sigma / 15, / sqrt(12)).
    assert all(0.05 < e < convert.error_bound(4, 64) for e in errors.values())
    assert lines[-1].startswith("quantization error (relative RMS) mean") and "worst" in lines[-1]
    for name, entry in manifest["files"].items():
        assert (out / name).stat().st_size == entry["bytes"] and folder.sha256(out / name) == entry["sha256"]


def test_a_tensor_holding_nan_is_refused_and_nothing_is_written(tmp_path, hf_tiny):
    src = tmp_path / "hf"
    shutil.copytree(hf_tiny, src)
    shard = sorted(src.glob("*.safetensors"))[1]
    tensors = dict(mx.load(str(shard)))
    name = next(k for k in tensors if k.endswith("self_attn.o_proj.weight"))
    tensors[name] = mx.where(
        mx.arange(tensors[name].size).reshape(tensors[name].shape) == 7, mx.nan, tensors[name]
    ).astype(mx.bfloat16)
    mx.save_safetensors(str(shard), tensors, metadata={"format": "pt"})
    with pytest.raises(mixtral.MixtralError, match="attention.wo: quantization error nan is beyond"):
        convert.convert(src, tmp_path / "out", log=lambda s: None)
    assert not list(tmp_path.glob("*out*"))


def test_chat_runs_on_an_mlx_community_folder_converting_it_once(tmp_path, mlx_lm_folder):
    env = {**__import__("os").environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    cmd = [
        sys.executable,
        str(ROOT / "chat.py"),
        "--model-path",
        str(mlx_lm_folder),
        "--tokenizer",
        str(TOKENIZER),
        "--prompt",
        "hi",
        "--max-tokens",
        "3",
        "--temp",
        "0",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert first.returncode == 0 and "converting" in first.stderr and first.stdout.strip(), first.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0 and "converting" not in again.stderr and again.stdout == first.stdout


# --------------------------------------------------------------------------- output folders that cannot be written, leftovers, damaged sources


def test_a_failing_write_is_one_line_and_leaves_nothing(tmp_path, hf_tiny):
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # a full disk, for this process
    r = subprocess.run(
        [sys.executable, str(ROOT / "convert.py"), "--hf-path", hf_tiny, "--mlx-path", tmp_path / "out"],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert (
        r.stderr.splitlines()[-1].startswith("error: ")
        and "out: cannot write" in r.stderr
        and "nothing was written" in r.stderr
    )
    assert list(tmp_path.iterdir()) == []


def test_a_target_folder_that_cannot_be_written_is_one_line(tmp_path, hf_tiny):
    # root writes through permissions: /sys stays read-only to it (on Linux; elsewhere it is missing)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    target = Path("/sys/mixtral-out") if os.geteuid() == 0 else locked / "out"
    assert_one_line_error(
        run_script("convert.py", "--hf-path", hf_tiny, "--mlx-path", target), f"{target}: cannot write there"
    )
    assert not target.exists() and list(locked.iterdir()) == []


def test_a_rerun_removes_what_a_killed_conversion_left(tmp_path, hf_tiny):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    leftover = tmp_path / f".out.tmp-{dead}-abcd"
    leftover.mkdir()
    (leftover / "weights.00.npz").write_bytes(b"x" * 1000)
    mine = tmp_path / f".out.tmp-{os.getpid()}-efgh"  # a live process's: not touched
    mine.mkdir()
    r = run_script("convert.py", "--hf-path", hf_tiny, "--mlx-path", tmp_path / "out")
    assert r.returncode == 0 and "left by an interrupted conversion" in r.stderr, r.stderr
    assert not leftover.exists() and mine.exists()


def test_a_safetensors_entry_without_data_offsets_is_one_line(tmp_path, hf_tiny):
    src = tmp_path / "hf"
    shutil.copytree(hf_tiny, src)
    shard = sorted(src.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    del header[name]["data_offsets"]
    new = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n :])
    assert_one_line_error(
        run_script("convert.py", "--hf-path", src, "--mlx-path", tmp_path / "out"), "has no valid data_offsets"
    )
