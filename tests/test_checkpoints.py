"""Checkpoints: 8-bit fidelity against transformers and mlx-lm, mlx-lm (mlx-community) folders
repacked without loss, and the error report every conversion writes."""

import importlib
import json
import shutil
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
from synthetic import TOKENIZER, write_hf_checkpoint

ROOT = Path(__file__).resolve().parent.parent
mlx_lm_convert = importlib.import_module("mlx_lm.convert").convert
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun."


def mlx_lm_checkpoint(hf_path, out, bits):
    """mlx-lm's own conversion, with float32 scales (its most faithful setting)."""
    mlx_lm_convert(str(hf_path), str(out), quantize=True, q_bits=bits, q_group_size=64, dtype="float32")
    return out


def logits_of_ours(path, ids):
    model, _ = mixtral.load_model(path, dtype=mx.float32)
    return np.array(model(mx.array([ids]))[0][0])


def logits_of_mlx_lm(path, ids):
    model, _ = mlx_lm_load_model(Path(path))
    return np.array(model(mx.array([ids]))[0])


# --------------------------------------------------------------------------- fidelity


@pytest.fixture(scope="module")
def fidelity(tmp_path_factory):
    """RMS logit error against transformers (float32), 17 teacher-forced positions, averaged over three
    held-out checkpoints that route every token to all 8 experts (so no expert choice can flip and
    the figure measures rounding alone)."""
    errors = {"standard": [], "input-major": [], "mlx-lm": []}
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
        for layout in ("standard", "input-major"):
            convert.convert(hf, d / layout, q_bits=8, layout=layout, log=lambda s: None)
            errors[layout].append(rms(logits_of_ours(d / layout, ids)))
        errors["mlx-lm"].append(rms(logits_of_mlx_lm(mlx_lm_checkpoint(hf, d / "lm", 8), ids)))
    return {k: float(np.mean(v)) for k, v in errors.items()}


def test_8bit_standard_layout_is_as_faithful_as_mlx_lm(fidelity):
    print(fidelity)
    assert fidelity["standard"] <= fidelity["mlx-lm"]


def test_8bit_input_major_layout_is_within_10_percent_of_mlx_lm(fidelity):
    assert fidelity["input-major"] <= 1.10 * fidelity["mlx-lm"]


def test_scales_are_quantized_in_float32_and_stored_in_two_bytes(tmp_path, hf_tiny):
    # Independent reference: mx.quantize of the float32 weights, dequantized in float32.
    out = convert.convert(hf_tiny, tmp_path / "m", q_bits=8, layout="standard", log=lambda s: None)
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


# --------------------------------------------------------------------------- mlx-lm checkpoints


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
def test_mlx_lm_checkpoint_repacks_without_loss(tmp_path, mlx_lm_folder, naming):
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


def test_input_major_from_a_quantized_source_is_said_to_round_twice(tmp_path, mlx_lm_folder):
    lines = []
    out = convert.convert(mlx_lm_folder, tmp_path / "im", layout="input-major", tokenizer=TOKENIZER, log=lines.append)
    assert any("rounds each weight a second time" in line for line in lines)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layout"] == "input-major" and manifest["quantization_error"]


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


# --------------------------------------------------------------------------- the report


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
