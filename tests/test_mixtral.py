"""mixtral.py: the model against Hugging Face's recipe and transformers, the tokenizer against
mistral-common, loading, sampling and generation, the one-shot CLI, and what it says of bad folders."""

import json
import random
import signal
import subprocess
import zipfile
from itertools import islice
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch  # noqa: E402  the reference: a missing one fails the suite, never skips it
import transformers  # noqa: E402
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mlx.utils import tree_map

import convert
import mixtral
import parallel
from conftest import LAYOUTS, assert_one_line_error, convert_form, copy_folder, examples, popen_script, run_script
from mixtral import MixtralError, ModelArgs
from synthetic import TOKENIZER, write_hf_checkpoint

# --------------------------------------------------------------------------- the model and its loader


def tiny_args(**kw):
    d = dict(
        dim=64,
        n_layers=2,
        head_dim=16,
        hidden_dim=128,
        n_heads=4,
        n_kv_heads=2,
        norm_eps=1e-5,
        vocab_size=100,
        moe={"num_experts": 8, "num_experts_per_tok": 2},
    )
    return ModelArgs.from_dict({**d, **kw})


def dense_expert_weights(layer, e):
    """Expert e's (w1, w2, w3) as float arrays, dequantized when the layer is quantized."""
    out = []
    for lin in (layer.w1, layer.w2, layer.w3):
        if isinstance(lin, mixtral.QuantizedLinear):
            out.append(mx.dequantize(lin.weight[e], lin.scales[e], lin.biases[e], lin.group_size, lin.bits))
        else:
            out.append(lin.weight[e])
    return out


def moe_reference(moe, x):
    """The plain per-token, per-expert loop (the original MLX example's formulation)."""
    B, T, D = x.shape
    out = np.zeros((B, T, D), np.float32)
    for b in range(B):
        for t in range(T):
            xt = x[b, t]
            gates = np.array(moe.gate(xt))
            top = np.argsort(-gates)[: moe.top_k]
            w = np.exp(gates[top] - gates[top].max())
            w /= w.sum()
            for e, we in zip(top, w):
                w1, w2, w3 = dense_expert_weights(moe.experts, int(e))
                out[b, t] += we * np.array(w2 @ (nn.silu(w1 @ xt) * (w3 @ xt)))
    return out


@pytest.fixture(scope="module")
def moe():
    mx.random.seed(1)
    layer = mixtral.MOEFeedForward(tiny_args())
    layer.update(
        {
            "experts": {
                n: {"weight": mx.random.normal(getattr(layer.experts, n).weight.shape) * 0.1}
                for n in ("w1", "w2", "w3")
            }
        }
    )
    return layer


@pytest.mark.parametrize("tokens", [1, 300])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_vectorized_moe_equals_per_token_loop(moe, tokens, bits, kernels):
    kernels("exact")  # float32 arithmetic, as the loop's (the int16 path's error is test_kernels.py's)
    layer = moe
    if bits:
        layer = mixtral.MOEFeedForward(tiny_args())
        layer.update(moe.parameters())
        nn.quantize(layer, 64, bits, class_predicate=lambda p, m: isinstance(m, mixtral.SwitchLinear))
    x = mx.random.normal((1, tokens, 64), key=mx.random.key(tokens))
    np.testing.assert_allclose(np.array(layer(x)), moe_reference(layer, x), atol=1e-4, rtol=1e-4)


def test_moe_mixes_the_top_k_experts_with_hugging_face_weights():
    """MOEFeedForward against Hugging Face's recipe, in numpy: softmax over all 8 router logits, keep
    the top 2, renormalise, and mix those experts' outputs (each computed alone)."""
    args = ModelArgs(
        dim=32,
        n_layers=1,
        head_dim=8,
        hidden_dim=64,
        n_heads=4,
        n_kv_heads=2,
        norm_eps=1e-5,
        vocab_size=10,
        moe=mixtral.MoEArgs(num_experts=8, num_experts_per_tok=2),
    )
    moe = mixtral.MOEFeedForward(args)
    moe.update(tree_map(lambda p: mx.random.normal(p.shape, key=mx.random.key(p.size)) * 0.3, moe.parameters()))
    x = mx.random.normal((1, 20, 32), key=mx.random.key(7))
    gates = np.array(x[0] @ moe.gate.weight.T)
    probs = np.exp(gates - gates.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    w = {n: np.array(moe.experts[n].weight) for n in ("w1", "w2", "w3")}
    silu = lambda a: a / (1 + np.exp(-a))
    want = np.zeros((20, 32), np.float32)
    for t, xt in enumerate(np.array(x[0])):
        top = np.argsort(-probs[t])[:2]
        for e in top:
            expert = (silu(w["w1"][e] @ xt) * (w["w3"][e] @ xt)) @ w["w2"][e].T
            want[t] += probs[t, e] / probs[t, top].sum() * expert
    np.testing.assert_allclose(np.array(moe(x)[0]), want, atol=1e-4)


def test_rope_rotates_halves_like_hugging_face():
    T, H, hd, theta, offset = 5, 3, 16, 1e6, 7
    x = np.random.default_rng(0).normal(size=(1, H, T, hd)).astype(np.float32)
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = np.outer(np.arange(offset, offset + T), inv)
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rotate_half = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
    ref = x * cos + rotate_half * sin
    np.testing.assert_allclose(np.array(mixtral.RoPE(hd, theta)(mx.array(x), offset=offset)), ref, atol=1e-5)


@pytest.fixture(scope="module")
def fp_model(mlx_fp):
    return mixtral.load_model(mlx_fp)[0]


def test_step_by_step_decode_equals_full_recompute(fp_model):
    ids = mx.random.randint(0, 32000, (1, 40), key=mx.random.key(5))
    full, _ = fp_model(ids)
    logits, cache = fp_model(ids[:, :30])
    steps = [logits]
    for t in range(30, 40):
        logits, cache = fp_model(ids[:, t : t + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), np.array(full), atol=1e-4)


def test_multi_token_chunks_on_a_cache_equal_full_recompute(fp_model):
    # 300 tokens in chunks that cross the cache's 256-position growth step.
    ids = mx.random.randint(0, 32000, (1, 300), key=mx.random.key(6))
    full, _ = fp_model(ids)
    cache, outs, start = None, [], 0
    for n in (100, 150, 1, 7, 42):
        logits, cache = fp_model(ids[:, start : start + n], cache)
        outs.append(logits)
        start += n
    assert start == 300 and cache[0].offset == 300
    np.testing.assert_allclose(np.array(mx.concatenate(outs, axis=1)), np.array(full), atol=1e-4)


def test_cache_trim_then_refeed_equals_full_recompute(fp_model):
    ids = mx.random.randint(0, 32000, (1, 20), key=mx.random.key(7))
    full, _ = fp_model(ids)
    other = mx.random.randint(0, 32000, (1, 6), key=mx.random.key(8))
    _, cache = fp_model(mx.concatenate([ids[:, :14], other], axis=1))
    for c in cache:
        c.trim(6)
    logits, _ = fp_model(ids[:, 14:], cache)
    np.testing.assert_allclose(np.array(logits), np.array(full[:, 14:]), atol=1e-4)


def relative_rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))


@pytest.fixture(scope="module")
def dense_routing(tmp_path_factory):
    """The tiny model with every token using all 8 experts: no routing decision that rounding could
    flip (a flipped expert is a jump no bound on the weights' error covers), so logits move smoothly."""
    hf = write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "dense", seed=0, num_experts_per_tok=8)
    out = tmp_path_factory.mktemp("mlx")
    paths = {}
    for name, kw in {
        "fp": dict(q_bits=None),
        "q8": dict(q_bits=8),
        "q4": dict(q_bits=4),
        "q8-input-major": dict(q_bits=None, input_major=8),
    }.items():
        paths[name] = convert_form(hf, out / name, **kw)
    return paths


# Affine quantization with groups of 64 Gaussian weights spans ~4.7 sigma, so the rounding error is
# ~4.7/((2^b - 1) sqrt(12)) sigma per weight: 0.5% at 8 bits, 9% at 4 bits. A token's path crosses
# ~16 quantized matrices (embedding, 7 per layer, head) whose errors add in quadrature: ~2% and ~36%
# expected on the logits (measured: 2.6% at 8 bits, 26-32% at 4 bits). The bounds allow about twice
# the estimate; an input-major folder of earlier versions, rounded a second time at load, stays within
# the 8-bit bound (measured: 2.08%, against 2.06% for the usual layout).
@pytest.mark.parametrize("name,bound", [("q8", 0.05), ("q8-input-major", 0.05), ("q4", 0.6)])
def test_quantized_logits_close_to_unquantized(dense_routing, name, bound, tokenizer):
    ids = mx.array([tokenizer.encode("Quantization should barely move the logits of this sentence.")])
    ref = np.array(mixtral.load_model(dense_routing["fp"])[0](ids)[0])
    got = np.array(mixtral.load_model(dense_routing[name])[0](ids)[0])
    assert relative_rms(got, ref) < bound
    if name.startswith("q8"):
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_an_input_major_folder_loads_in_the_usual_layout_and_says_how_to_convert_it_once(dense_routing, capfd):
    folder = dense_routing["q8-input-major"]
    model, _ = mixtral.load_model(folder, cpu_threads=1)
    w1 = model.layers[0].feed_forward.experts.w1
    assert isinstance(w1, mixtral.QuantizedLinear) and w1["weight"].shape == (8, 128, 64 * 8 // 32)  # (out, in)
    source = json.loads((folder / "manifest.json").read_text())["source"]
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"note: {folder} is in the input-major layout"), err
    assert f"python convert.py --hf-path {source} --mlx-path {folder} --force" in err


def test_router_stays_unquantized_and_experts_use_gather_qmm(mlx_q8):
    model, _ = mixtral.load_model(mlx_q8, cpu_threads=1)
    moe = model.layers[0].feed_forward
    assert isinstance(moe.gate, nn.Linear) and not isinstance(moe.gate, mixtral.QuantizedLinear)
    assert isinstance(moe.experts.w1, mixtral.QuantizedLinear) and moe.experts.w1.bits == 8
    assert isinstance(model.output, mixtral.QuantizedLinear)


def test_default_compute_dtype_is_float32_on_cpu_and_overridable(mlx_q8):
    with mx.stream(mx.cpu):
        assert mixtral.default_dtype() == (mx.float32 if mx.default_device() == mx.cpu else mx.float16)
    assert mixtral.load_model(mlx_q8)[0].dtype == mixtral.default_dtype()
    model, _ = mixtral.load_model(mlx_q8, dtype="bfloat16")
    assert model.dtype == mx.bfloat16
    assert model.layers[0].feed_forward.experts.w1.scales.dtype == mx.bfloat16


def stored_scales(path, name="layers.0.feed_forward.experts.w1.scales"):
    return next(v for f in sorted(Path(path).glob("weights.*.npz")) for k, v in mx.load(str(f)).items() if k == name)


@pytest.mark.parametrize("choice", ["int16", "exact"])
def test_our_kernels_keep_the_scales_as_stored_with_the_logits_of_float32_scales(mlx_q8, kernels, choice):
    """The checkpoint's half-precision scales and biases are read as they are (1.0625 bytes a weight, not
    1.125); widening a half is exact, so the logits are those of the same scales widened to float32."""
    kernels(choice)
    stored = stored_scales(mlx_q8)
    assert stored.dtype in (mx.float16, mx.bfloat16)
    model, _ = mixtral.load_model(mlx_q8)
    quantized = [m for m in model.modules() if isinstance(m, mixtral.QuantizedLinear)]
    assert model.layers[0].feed_forward.experts.w1.scales.dtype == stored.dtype
    tokens = mx.array([[1, 5, 9, 200, 7, 3]])
    kept = model(tokens)[0]
    for m in quantized:
        m.scales, m.biases = m.scales.astype(mx.float32), m.biases.astype(mx.float32)
    assert np.array_equal(np.array(kept), np.array(model(tokens)[0]))


def test_the_embedding_is_dequantized_in_the_compute_dtype_from_its_stored_scales(mlx_q8):
    """MLX dequantizes the embedding's rows in its scales' dtype: kept as stored (half precision) they came
    out rounded to 11 significant bits. Its scales compute in the model's dtype, so a row is exactly its
    stored scales and biases widened to float32."""
    model, _ = mixtral.load_model(mlx_q8)
    tokens = mx.array([1, 5, 9, 200])
    scales, biases = (stored_scales(mlx_q8, f"tok_embeddings.{name}") for name in ("scales", "biases"))
    assert scales.dtype in (mx.float16, mx.bfloat16)
    rows = model.tok_embeddings(tokens[None])[0]
    assert rows.dtype == model.dtype == mx.float32
    packed = model.tok_embeddings.weight[tokens]
    widened = (a[tokens].astype(mx.float32) for a in (scales, biases))
    assert np.array_equal(np.array(rows), np.array(mx.dequantize(packed, *widened, 64, 8)))


def test_mlx_kernels_keep_the_scales_in_the_compute_dtype(mlx_q8, kernels):
    kernels("mlx")
    model, _ = mixtral.load_model(mlx_q8)
    assert model.layers[0].feed_forward.experts.w1.scales.dtype == model.dtype


def test_params_json_holds_mixtral_8x7b():
    from pathlib import Path

    args = ModelArgs.from_dict(json.loads((Path(mixtral.__file__).parent / "params.json").read_text()))
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.hidden_dim) == (4096, 32, 32, 8, 14336)
    assert (args.moe.num_experts, args.moe.num_experts_per_tok, args.rope_theta) == (8, 2, 1e6)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"n_kv_heads": 3}, "multiple of n_kv_heads"),
        ({"moe": {"num_experts": 2, "num_experts_per_tok": 3}}, "num_experts_per_tok"),
        ({"sliding_window": 4096}, "unknown key"),
        ({"dim": None}, "dim must be a positive integer"),
    ],
)
def test_inconsistent_config_is_an_error(change, message):
    with pytest.raises(MixtralError, match=message):
        tiny_args(**change)


def test_missing_config_key_is_an_error():
    d = tiny_args().to_dict()
    del d["norm_eps"]
    with pytest.raises(MixtralError, match="missing key.*norm_eps"):
        ModelArgs.from_dict(d)


def test_folder_without_shards_is_an_error_not_random_weights(tmp_path, mlx_fp):
    m = copy_folder(mlx_fp, tmp_path / "m")
    for f in m.glob("weights.*.npz"):
        f.unlink()
    with pytest.raises(MixtralError, match="no weights"):
        mixtral.load_model(m)


@pytest.mark.parametrize(
    "edit,message",
    [
        ("drop", "missing tensor.*norm.weight"),
        ("extra", "unexpected tensor.*bogus"),
        ("shape", "layers.0.attention.wq.weight has shape"),
    ],
)
def test_strict_loading_names_the_tensor(tmp_path, mlx_fp, edit, message):
    m = copy_folder(mlx_fp, tmp_path / "m")
    shard = next(m.glob("weights.*.npz"))
    w = dict(mx.load(str(shard)))
    mx.eval(w)  # read it all before overwriting the file
    if edit == "drop":
        del w["norm.weight"]
    elif edit == "extra":
        w["bogus"] = mx.zeros((2,))
    else:
        w["layers.0.attention.wq.weight"] = w["layers.0.attention.wq.weight"][:8]
    mx.savez(str(shard), **w)
    with pytest.raises(MixtralError, match=message):
        mixtral.load_model(m)


def test_sampling_greedy_top_p_and_seed():
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    assert mixtral.sample(logits).item() == 0
    mx.random.seed(0)
    draws = [mixtral.sample(logits, temp=1.0, top_p=0.7).item() for _ in range(300)]
    assert set(draws) == {0, 1}  # 0.5 + 0.3 reaches 0.7: the tail is cut
    assert abs(draws.count(0) / 300 - 0.5 / 0.8) < 0.1
    mx.random.seed(0)
    assert set(mixtral.sample(logits, temp=1.0, min_p=0.5).item() for _ in range(100)) == {0, 1}


def test_a_seed_reproduces_a_whole_sampled_sequence(fp_model, tokenizer):
    ids = tokenizer.encode("Once upon a time")
    runs = [[t for t, _ in zip(mixtral.generate(fp_model, ids, temp=1.0, seed=s), range(30))] for s in (42, 42, 43)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert len(set(runs[0])) > 5  # sampled, not stuck on one token


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, hf_tiny):
    out = tmp_path_factory.mktemp("layouts")
    return {k: convert_form(hf_tiny, out / k.replace(" ", "-"), **kw) for k, kw in LAYOUTS.items()}


@pytest.mark.parametrize("kind", LAYOUTS)
def test_splitting_projections_and_heads_over_cpu_streams_changes_no_logit(
    monkeypatch, layouts, kind, tokenizer, kernels
):
    kernels("mlx")  # ours thread inside each projection instead (the next test)
    ids = mx.array([tokenizer.encode("The same numbers, computed by three threads instead of one.")])
    one, _ = mixtral.load_model(layouts[kind], cpu_threads=1)
    monkeypatch.setattr(parallel.SplitOutputs, "min_outputs", 1)  # split even the tiny model's projections
    three, _ = mixtral.load_model(layouts[kind], cpu_threads=3)  # uneven cuts
    assert isinstance(three.layers[0].feed_forward.experts.w1, parallel.SplitOutputs)
    assert len(three.layers[0].attention.sdpa.streams) == 2  # the 2 KV heads, one stream each
    np.testing.assert_allclose(np.array(three(ids)[0]), np.array(one(ids)[0]), atol=1e-5)


@pytest.mark.parametrize("path", ["exact", "int16"])
@pytest.mark.parametrize("kind", ["8-bit standard", "4-bit standard"])
def test_our_kernels_threads_inside_each_projection_change_no_logit(layouts, kind, path, tokenizer, kernels):
    kernels(path)
    ids = mx.array([tokenizer.encode("The same numbers, computed by three threads instead of one.")])
    one, _ = mixtral.load_model(layouts[kind], cpu_threads=1)
    expected = np.array(one(ids)[0])
    three, _ = mixtral.load_model(layouts[kind], cpu_threads=3)  # each output is one thread's: bit for bit
    assert not isinstance(three.layers[0].feed_forward.experts.w1, parallel.SplitOutputs)
    np.testing.assert_array_equal(np.array(three(ids)[0]), expected)


def test_an_input_major_folder_of_earlier_versions_loads_as_the_source_weights_rounded_twice(layouts, hf_tiny):
    """Earlier versions' input-major layout, repacked at load, against the source weights."""
    src = {}
    for f in hf_tiny.glob("*.safetensors"):
        src.update(mx.load(str(f)))
    w = mx.stack([src[f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight"] for e in range(8)]).astype(mx.float32)
    error = {}
    for kind in ("8-bit standard", "8-bit input-major"):
        model, _ = mixtral.load_model(layouts[kind], cpu_threads=1, dtype=mx.float32)
        m = model.layers[1].feed_forward.experts.w1
        assert isinstance(m, mixtral.QuantizedLinear) and m["weight"].shape == (8, 128, 64 * 8 // 32)
        d = mx.dequantize(m["weight"], m["scales"], m["biases"], m.group_size, m.bits)
        error[kind] = float(mx.sqrt(mx.mean((d - w) ** 2)) / mx.sqrt(mx.mean(w**2)))
    bound = convert.error_bound(8, 64)
    assert error["8-bit standard"] < bound / 2
    # Two roundings, each within bound / 2, grouped along different axes: their errors add up to at most bound.
    assert error["8-bit standard"] < error["8-bit input-major"] < bound


def test_chunked_prefill_generates_the_same_tokens(fp_model, tokenizer):
    from itertools import islice

    ids = tokenizer.encode("A prompt long enough to be cut into several prefill chunks of seven tokens each.")
    whole = list(islice(mixtral.generate(fp_model, ids), 8))
    chunked = list(islice(mixtral.generate(fp_model, ids, prefill_chunk=7), 8))
    assert chunked == whole


# --------------------------------------------------------------------------- against transformers


PROMPT = "Mixtral is a sparse mixture of experts: each token is routed to two of eight feed-forward blocks."


STEPS = 10


@pytest.fixture(scope="module")
def hf_model(hf_tiny):
    model, info = transformers.MixtralForCausalLM.from_pretrained(
        hf_tiny, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # every tensor of our layout was recognised
    return model.eval()


def hf_forward(hf_model, ids):
    with torch.no_grad():
        out = hf_model(torch.tensor([ids]), output_router_logits=True)
    return out.logits[0].numpy(), [r.numpy() for r in out.router_logits]


# The float32 cache computes what transformers does, to float32 rounding. The default float16 cache
# rounds each key and value to 11 significant bits (within 2^-11 relative): that moves these logits (|x| < 5)
# by up to 4e-3 (measured), the 8-bit checkpoints' logits by 5% of their error at most (test_convert).
@pytest.mark.parametrize("kv_dtype, atol", [("float32", 1e-4), ("float16", 1e-2)])
def test_logits_match_transformers_after_prompt_and_each_cached_greedy_step(
    hf_model, mlx_fp, tokenizer, kv_dtype, atol
):
    model, _ = mixtral.load_model(mlx_fp, dtype=mx.float32, kv_dtype=kv_dtype)
    ids = tokenizer.encode(PROMPT)
    assert len(ids) >= 20

    ref, _ = hf_forward(hf_model, ids)
    logits, cache = model(mx.array([ids]))
    assert cache[0].keys.dtype == getattr(mx, kv_dtype)
    np.testing.assert_allclose(np.array(logits[0]), ref, atol=atol, rtol=0)

    for _ in range(STEPS):
        ids.append(int(np.argmax(ref[-1])))  # greedy by the reference
        logits, cache = model(mx.array([ids[-1:]]), cache)
        ref, router_logits = hf_forward(hf_model, ids)  # full recompute, no cache
        np.testing.assert_allclose(np.array(logits[0, -1]), ref[-1], atol=atol, rtol=0)

    # The comparison is only meaningful if no token had a near-tie between its 2nd and 3rd expert.
    for layer in router_logits:
        top = np.sort(layer, axis=-1)
        assert (top[:, -2] - top[:, -3]).min() > 1e-3


def test_greedy_ids_from_generate_equal_transformers_greedy(hf_model, mlx_fp, tokenizer):
    model, _ = mixtral.load_model(mlx_fp)
    ids = tokenizer.encode(PROMPT)
    ours = [t for t, _ in zip(mixtral.generate(model, ids), range(STEPS))]
    ref = list(ids)
    for _ in range(STEPS):
        logits, _ = hf_forward(hf_model, ref)
        ref.append(int(np.argmax(logits[-1])))
    assert ours == ref[len(ids) :]


# --------------------------------------------------------------------------- the tokenizer against mistral-common


TEXTS = [
    "Hello, world!",
    " leading and trailing spaces ",
    "line one\nline two\n\n\ttabbed",
    "Emoji: 😀🦙🥷👍🏽 and CJK: 你好，世界。日本語のテキスト",
    "[INST] literal tags [/INST] </s> <s>",
    "",
]


@pytest.fixture(scope="module")
def reference():
    return MistralTokenizer.v1().instruct_tokenizer.tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_mistral_common(tokenizer, reference, text):
    assert tokenizer.encode(text) == reference.encode(text, bos=True, eos=False)
    assert tokenizer.eos_id == reference.eos_id == 2


@pytest.mark.parametrize("text", TEXTS)
def test_stream_of_real_text_joins_to_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    assert "".join(tokenizer.decode_stream(ids)) == tokenizer.decode(ids)


def test_stream_of_random_ids_joins_to_decode(tokenizer):
    rng = random.Random(0)
    byte_ids = list(range(3, 259))  # the <0xNN> byte-fallback pieces
    for _ in range(300):
        n = rng.randint(1, 40)
        ids = [rng.choice(byte_ids) if rng.random() < 0.3 else rng.randrange(tokenizer.vocab_size) for _ in range(n)]
        assert "".join(tokenizer.decode_stream(ids)) == tokenizer.decode(ids), ids


def test_stream_never_yields_half_a_character(tokenizer):
    ids = tokenizer.encode("a 🦙 b 🥷 c ꙮ 你好")
    assert any(tokenizer._sp.is_byte(i) for i in ids)  # the emoji really are split into byte tokens
    pieces = list(tokenizer.decode_stream(ids))
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_stream_yields_as_tokens_arrive(tokenizer):
    ids = tokenizer.encode("one two three four")
    seen, shown_at = [], []

    def feed():
        for i in ids:
            seen.append(i)
            yield i

    for piece in tokenizer.decode_stream(feed()):
        shown_at.append((len(seen), piece))
    # "two" was printed while tokens were still to come, and every piece before the end of the ids.
    assert any("two" in piece and n < len(ids) for n, piece in shown_at), shown_at
    assert len(shown_at) >= 3 and shown_at[0][0] < len(ids)


# --------------------------------------------------------------------------- the one-shot CLI


def expected_text(model_path, prompt, n, **kw):
    model, tok = mixtral.load_model(model_path)
    ids = []
    for y in islice(mixtral.generate(model, tok.encode(prompt), **kw), n):
        if y == tok.eos_id:
            break
        ids.append(y)
    return tok.decode(ids)


@pytest.mark.parametrize("sampling", [[], ["--temp", "0.9", "--top-p", "0.95", "--seed", "7"]])
def test_prompt_prints_decode_of_generated_ids(mlx_q8, sampling):
    # Bytes: text mode would turn a carriage return in the reply into a newline.
    r = run_script(
        "mixtral.py", "--model-path", mlx_q8, "--prompt", "Once upon a time", "--max-tokens", 30, *sampling, text=False
    )
    assert r.returncode == 0, r.stderr.decode()
    kw = dict(temp=0.9, top_p=0.95, seed=7) if sampling else {}
    text = expected_text(mlx_q8, "Once upon a time", 30, **kw)
    assert text and r.stdout.decode() == text + "\n"
    assert "tokens/s" in r.stderr.decode() and "peak" in r.stderr.decode()


def test_prompt_dash_reads_stdin(mlx_q8):
    r = run_script("mixtral.py", "--model-path", mlx_q8, "--prompt", "-", "--max-tokens", 12, stdin="Once upon a time")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected_text(mlx_q8, "Once upon a time", 12, seed=0) + "\n"


def test_missing_model_is_a_one_line_error(tmp_path):
    r = run_script("mixtral.py", "--model-path", tmp_path / "nothing", "--prompt", "hi")
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "nothing: no such folder" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- sampling and streaming, by property (hypothesis)


TOK = mixtral.Tokenizer(TOKENIZER)


BYTE_TOKENS = st.integers(3, 258)  # <0x00>..<0xFF>: pieces of a character split over tokens


@settings(max_examples=examples(200))
@given(st.lists(st.one_of(BYTE_TOKENS, BYTE_TOKENS, st.integers(259, 31999)), min_size=1, max_size=40))
def test_decode_stream_joins_to_decode(ids):
    assert "".join(TOK.decode_stream(iter(ids))) == TOK.decode(ids)


probabilities = st.lists(st.floats(0.001, 1.0), min_size=2, max_size=12).map(lambda p: np.array(p) / np.sum(p))


def kept(logits, **kw):
    """The set of tokens sample() can return, from 400 draws."""
    mx.random.seed(0)
    draws = mixtral.sample(mx.broadcast_to(logits, (400, logits.shape[-1])), temp=1.0, **kw)
    return set(np.array(draws).tolist())


@settings(max_examples=examples(25))
@given(probabilities, st.floats(0.05, 0.95))
def test_top_p_keeps_the_smallest_set_reaching_p(p, top_p):
    order = np.argsort(-p, kind="stable")
    mass_before = np.cumsum(p[order]) - p[order]
    allowed = set(order[mass_before < top_p].tolist())
    got = kept(mx.log(mx.array(p, mx.float32))[None], top_p=top_p)
    assert got <= allowed and order[0] in got


@settings(max_examples=examples(25))
@given(probabilities, st.floats(0.05, 0.95))
def test_min_p_drops_tokens_below_a_share_of_the_top_one(p, min_p):
    allowed = set(np.nonzero(p >= min_p * p.max() * (1 - 1e-5))[0].tolist())
    assert kept(mx.log(mx.array(p, mx.float32))[None], min_p=min_p) <= allowed


@settings(max_examples=examples(25))
@given(st.lists(st.floats(-20, 20, width=32), min_size=2, max_size=50))
def test_temperature_zero_is_the_argmax(logits):
    assume(len(set(logits)) == len(logits))
    assert mixtral.sample(mx.array([logits])).item() == int(np.argmax(logits))


# --------------------------------------------------------------------------- bad folders, bad input, Ctrl-C


@pytest.mark.parametrize("block", [{"bits": 8}, "8-bit", {"bits": 8, "group_size": 64, "layout": "sideways"}])
def test_a_bad_quantization_block_is_one_line(model_copy, block):
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**config, "quantization": block}))
    assert_one_line_error(
        run_script("mixtral.py", "--model-path", model_copy, "--prompt", "hi"), "'quantization' must be"
    )


def test_a_tokenizer_of_another_vocabulary_is_refused_at_load(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**config, "vocab_size": 32064}))
    with pytest.raises(MixtralError, match="a vocabulary of 32000 tokens, but the model has 32064"):
        mixtral.load_model(model_copy)


def damage(shard: Path, how: str):
    data = bytearray(shard.read_bytes())
    with zipfile.ZipFile(shard) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)  # the largest member
    central = data.rfind(b"PK\x01\x02")
    if how == "member data":
        data[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF
    elif how == "member header":
        data[info.header_offset + 30 : info.header_offset + 30 + len(info.filename)] = b"x" * len(info.filename)
    elif how == "zip directory":
        data[central : central + 4] = b"XXXX"
    elif how == "truncated tail":
        data = data[: len(data) - 1000]
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["member data", "member header", "zip directory", "truncated tail"])
def test_a_damaged_shard_is_named_before_the_first_token(model_copy, how):
    damage(model_copy / "weights.00.npz", how)
    r = run_script("mixtral.py", "--model-path", model_copy, "--prompt", "hi")
    assert_one_line_error(r, "weights.00.npz")
    assert r.stdout == ""


@pytest.mark.parametrize("how", ["member data", "truncated tail"])
def test_verify_names_the_damaged_file_and_passes_an_intact_copy(model_copy, mlx_q8, how):
    r = run_script("mixtral.py", "--verify", "--model-path", mlx_q8)
    assert r.returncode == 0 and "every file is intact" in r.stderr
    damage(model_copy / "weights.00.npz", how)
    r = run_script("mixtral.py", "--verify", "--model-path", model_copy)
    assert r.returncode == 1 and "error: " in r.stderr and "weights.00.npz" in r.stderr and "Traceback" not in r.stderr


def test_info_describes_a_folder_without_reading_its_weights(model_copy):
    damage(model_copy / "weights.00.npz", "member data")  # --info must not care
    r = run_script("mixtral.py", "--info", "--model-path", model_copy)
    assert r.returncode == 0, r.stderr
    for field in ("source", "8 bits, group 64", "mean 0.5", "KV cache"):
        assert field in r.stdout, r.stdout


def test_a_prompt_on_stdin_that_is_not_utf8_is_one_line(mlx_q8):
    assert_one_line_error(
        run_script("mixtral.py", "--model-path", mlx_q8, "--prompt", "-", stdin=b"caf\xe9"), "not UTF-8"
    )


def test_ctrl_c_during_one_shot_generation_exits_130_without_a_traceback(mlx_q8):
    p = popen_script(
        "mixtral.py",
        "--model-path",
        mlx_q8,
        "--prompt",
        "Once",
        "--max-tokens",
        1000000,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    p.stdout.read(10)  # generating
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and b"interrupted" in err and b"Traceback" not in err, err


# --------------------------------------------------------------------------- the loading line


def on_a_terminal(*args, size=(24, 100), timeout=120) -> str:
    """Run mixtral.py with stdout and stderr on a pseudo-terminal of size (rows, columns); -> all it printed there."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import termios
    import time

    fd, tty = pty.openpty()
    fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
    p = popen_script("mixtral.py", *args, stdin=subprocess.DEVNULL, stdout=tty, stderr=tty)
    os.close(tty)
    out, end = b"", time.monotonic() + timeout
    while time.monotonic() < end:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the other side closed: the program ended
                break
            if not chunk:
                break
            out += chunk
        elif p.poll() is not None:
            break
    p.wait(timeout=10)
    os.close(fd)
    return out.decode(errors="replace")


def test_loading_shows_one_line_on_a_terminal_and_nothing_in_a_pipe(mlx_q8):
    shown = on_a_terminal("--model-path", mlx_q8, "--prompt", "hi", "--max-tokens", 2)
    assert "loading  " in shown and " GB " in shown and "left" in shown and "\r" in shown, shown
    piped = run_script("mixtral.py", "--model-path", mlx_q8, "--prompt", "hi", "--max-tokens", 2)
    assert piped.returncode == 0 and "loading" not in piped.stderr and "\r" not in piped.stderr, piped.stderr


def test_loading_shows_its_line_on_a_terminal_that_reports_no_size(mlx_q8):
    # A new pseudo-terminal reports 0x0 (some CI terminals and `script` do): tqdm trimmed the line to nothing.
    shown = on_a_terminal("--model-path", mlx_q8, "--prompt", "hi", "--max-tokens", 2, size=(0, 0))
    assert "loading  " in shown and " GB " in shown and "left" in shown, shown
