"""Small Mixtral checkpoints in exact Hugging Face layout (names, shapes, bf16 safetensors shards,
model.safetensors.index.json, config.json, the real tokenizer.model), built from a fixed seed."""

import hashlib
import json
import math
import shutil
from pathlib import Path

import mistral_common
import mlx.core as mx

TOKENIZER = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"

# GQA (4 query heads share 2 KV heads), 8 experts, top-2, the real vocabulary.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=8,
    num_experts_per_tok=2,
    vocab_size=32000,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    max_position_embeddings=4096,
)


def hf_config(**overrides):
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        **TINY,
        **overrides,
    }


def hf_tensor_shapes(c):
    """Hugging Face tensor names and shapes, in the order the real checkpoint lists them."""
    D, H, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], D)}
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "self_attn.q_proj.weight"] = (c["num_attention_heads"] * hd, D)
        shapes[p + "self_attn.k_proj.weight"] = (c["num_key_value_heads"] * hd, D)
        shapes[p + "self_attn.v_proj.weight"] = (c["num_key_value_heads"] * hd, D)
        shapes[p + "self_attn.o_proj.weight"] = (D, c["num_attention_heads"] * hd)
        shapes[p + "block_sparse_moe.gate.weight"] = (c["num_local_experts"], D)
        for e in range(c["num_local_experts"]):
            shapes[p + f"block_sparse_moe.experts.{e}.w1.weight"] = (H, D)
            shapes[p + f"block_sparse_moe.experts.{e}.w2.weight"] = (D, H)
            shapes[p + f"block_sparse_moe.experts.{e}.w3.weight"] = (H, D)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
    shapes["model.norm.weight"] = (D,)
    shapes["lm_head.weight"] = (c["vocab_size"], D)
    return shapes


def make_tensor(name, shape, key):
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * mx.random.normal(shape, key=key)
    if name.endswith("gate.weight"):
        # The router: orthogonal directions scaled up, so that each token's top-2 experts are clear
        # (a near-tie would let rounding alone pick different experts in two implementations).
        q, _ = mx.linalg.qr(mx.random.normal((shape[1], shape[1]), key=key), stream=mx.cpu)
        return 3.0 * q[: shape[0]]
    return mx.random.normal(shape, key=key) * shape[-1] ** -0.5


def write_hf_checkpoint(path, seed=0, n_shards=4, **overrides):
    """Write a Mixtral checkpoint in Hugging Face layout to path; returns path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = hf_config(**overrides)
    shapes = hf_tensor_shapes(config)
    nbytes = [2 * math.prod(s) for s in shapes.values()]
    starts = [sum(nbytes[:i]) for i in range(len(nbytes))]
    # Cut by bytes like Hugging Face does, so a layer's experts can straddle two files; a small
    # model whose embedding outweighs a shard gets fewer files than asked.
    shard_of = [min(n_shards - 1, s * n_shards // sum(nbytes)) for s in starts]
    used = sorted(set(shard_of))
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    weight_map = {}
    for n, shard in enumerate(used):
        file = f"model-{n + 1:05d}-of-{len(used):05d}.safetensors"
        tensors = {
            name: make_tensor(name, shapes[name], keys[i]).astype(mx.bfloat16)
            for i, name in enumerate(shapes)
            if shard_of[i] == shard
        }
        mx.save_safetensors(str(path / file), tensors, metadata={"format": "pt"})
        weight_map.update({k: file for k in tensors})
    total = sum(nbytes)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": int(total)}, "weight_map": weight_map}, indent=2)
    )
    (path / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(TOKENIZER, path / "tokenizer.model")
    return path


def write_input_major(unquantized, path, bits=8, group_size=64):
    """A folder as convert.py wrote it with --layout input-major before our CPU kernels (no longer
    written; such folders still load, repacked): from an unquantized conversion (ours), each projection
    whose outputs fill whole groups quantized transposed, (..., in, out) along out; the embeddings and
    the rest as usual; the router in full precision."""
    src, path = Path(unquantized), Path(path)
    path.mkdir(parents=True)
    weights = {}
    for shard in sorted(src.glob("weights.*.npz")):
        weights.update(mx.load(str(shard)))
    out = {}
    for name, w in weights.items():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or w.ndim < 2 or module.endswith("feed_forward.gate"):
            out[name] = w
            continue
        transposed = module != "tok_embeddings" and w.shape[-2] % group_size == 0
        w = w.astype(mx.float32)
        q = mx.quantize(w.swapaxes(-1, -2) if transposed else w, group_size, bits)
        out |= {f"{module}.{k}": a for k, a in zip(("weight", "scales", "biases"), q)}
    mx.savez(str(path / "weights.00.npz"), **out)
    config = json.loads((src / "config.json").read_text())
    config["quantization"] = {"group_size": group_size, "bits": bits, "layout": "input-major"}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(src / "tokenizer.model", path / "tokenizer.model")
    manifest = json.loads((src / "manifest.json").read_text())
    files = {
        f.name: {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
        for f in path.iterdir()
    }
    manifest.update(bits=bits, group_size=group_size, layout="input-major", files=files)
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return path


# Mixtral 8x7B's layer sizes: what bench.py's real-size figures run on (docs/performance.md).
REAL_SIZE = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    num_local_experts=8,
    vocab_size=32000,
)


def write_large_checkpoint(path, layers: int, seed=0, shard_bytes=1 << 30, sizes=REAL_SIZE):
    """A checkpoint of Mixtral's real layer sizes with `layers` layers, in Hugging Face layout, for benchmarks:
    numpy's generator and 1 GiB shards (write_hf_checkpoint's router QR and MLX's CPU sampling take an hour
    at these sizes); the router's rows random, not orthogonal (no test compares its choices). ~3 GB a layer."""
    import numpy as np

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = hf_config(**sizes, num_hidden_layers=layers)
    shapes, rng = hf_tensor_shapes(config), np.random.default_rng(seed)
    names, shard, size = [], {}, 0
    weight_map = {}
    for name, shape in shapes.items():
        a = rng.standard_normal(shape, dtype=np.float32)
        a = 1.0 + 0.1 * a if name.endswith("norm.weight") else a * shape[-1] ** -0.5
        shard[name], size = mx.array(a).astype(mx.bfloat16), size + 2 * a.size
        if size > shard_bytes or name == list(shapes)[-1]:
            names.append(f"part-{len(names)}.safetensors")
            mx.save_safetensors(str(path / names[-1]), shard, metadata={"format": "pt"})
            weight_map |= {k: names[-1] for k in shard}
            shard, size = {}, 0
    final = {n: f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i, n in enumerate(names)}
    for n, f in final.items():
        (path / n).rename(path / f)
    total = sum(2 * math.prod(s) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(TOKENIZER, path / "tokenizer.model")
    return path


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Write a Mixtral checkpoint of the real layer sizes (random weights).")
    p.add_argument("path", help="the Hugging Face folder to write (then: convert.py --hf-path PATH ...)")
    p.add_argument("--layers", type=int, default=4, help="layers of Mixtral's 32 (default: %(default)s, ~12 GB)")
    a = p.parse_args()
    print(write_large_checkpoint(a.path, a.layers))
