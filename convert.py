"""Convert a Hugging Face Mixtral checkpoint to MLX: config.json + weights.NN.npz shards + tokenizer.model.

    python convert.py --hf-path mistralai/Mixtral-8x7B-Instruct-v0.1 --mlx-path mlx_model

Streams: each output tensor is built from lazily loaded inputs, quantized, written into the current
output shard and dropped, so peak memory is about one output shard whatever the model's size.
"""

import argparse
import json
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mixtral import DTYPES, Mixtral, MixtralError, ModelArgs, on_cpu

# Hugging Face name -> our name. {l} is the layer; a row with {e} lists one tensor per expert, which
# we stack into (experts, out, in) for gather_mm. q_proj/k_proj stay as they are: Hugging Face stores
# them permuted for rotate-half RoPE, which is the RoPE mixtral.py applies.
NAME_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{l}.input_layernorm.weight": "layers.{l}.attention_norm.weight",
    "model.layers.{l}.self_attn.q_proj.weight": "layers.{l}.attention.wq.weight",
    "model.layers.{l}.self_attn.k_proj.weight": "layers.{l}.attention.wk.weight",
    "model.layers.{l}.self_attn.v_proj.weight": "layers.{l}.attention.wv.weight",
    "model.layers.{l}.self_attn.o_proj.weight": "layers.{l}.attention.wo.weight",
    "model.layers.{l}.post_attention_layernorm.weight": "layers.{l}.ffn_norm.weight",
    "model.layers.{l}.block_sparse_moe.gate.weight": "layers.{l}.feed_forward.gate.weight",
    "model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight": "layers.{l}.feed_forward.experts.w1.weight",
    "model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight": "layers.{l}.feed_forward.experts.w2.weight",
    "model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight": "layers.{l}.feed_forward.experts.w3.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}

# The 8-way router decides everything and is tiny: it stays in full precision (as in llama.cpp).
NOT_QUANTIZED = ("feed_forward.gate.weight",)

HUB_FILES = ["config.json", "tokenizer.model", "model.safetensors.index.json", "*.safetensors"]


def args_from_hf_config(config: dict, source: str) -> ModelArgs:
    if config.get("model_type") != "mixtral":
        raise MixtralError(f"{source}: model_type is {config.get('model_type')!r}, not 'mixtral'")
    if config.get("tie_word_embeddings"):
        raise MixtralError(f"{source}: tie_word_embeddings is set; Mixtral has a separate lm_head")
    try:
        return ModelArgs.from_dict(
            {
                "dim": config["hidden_size"],
                "n_layers": config["num_hidden_layers"],
                "head_dim": config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
                "hidden_dim": config["intermediate_size"],
                "n_heads": config["num_attention_heads"],
                "n_kv_heads": config.get("num_key_value_heads", config["num_attention_heads"]),
                "norm_eps": config["rms_norm_eps"],
                "vocab_size": config["vocab_size"],
                "moe": {"num_experts": config["num_local_experts"], "num_experts_per_tok": config["num_experts_per_tok"]},
                "rope_theta": config.get("rope_theta", 1e6),
            },
            source,
        )
    except KeyError as e:
        raise MixtralError(f"{source}: missing key {e}") from None


def plan(args: ModelArgs):
    """[(group name, [(our name, [hf names])])] in file order: embeddings, each layer, head."""
    rows = lambda keep: [(ours, hf) for hf, ours in NAME_MAP.items() if keep(hf)]
    expand = lambda rows, l: [
        (ours.format(l=l), [hf.format(l=l, e=e) for e in range(args.moe.num_experts)] if "{e}" in hf else [hf.format(l=l)])
        for ours, hf in rows
    ]
    layer_rows = rows(lambda hf: "{l}" in hf)
    groups = [("embeddings", expand(rows(lambda hf: hf.startswith("model.embed")), None))]
    groups += [(f"layer {l}", expand(layer_rows, l)) for l in range(args.n_layers)]
    groups.append(("head", expand(rows(lambda hf: hf in ("model.norm.weight", "lm_head.weight")), None)))
    return groups


def safetensors_header(path: Path) -> dict:
    """Read and check a safetensors header; a truncated or foreign file is an error naming it."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if 8 + n <= size else None
    except (struct.error, ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise MixtralError(f"{path}: not a safetensors file (bad header)")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise MixtralError(f"{path}: truncated ({size} bytes, the header needs {8 + n + end}); download it again")
    return {k: t for k, t in header.items() if k != "__metadata__"}


def open_checkpoint(hf_path: Path):
    """-> (ModelArgs, {hf name: lazy mx.array}) after checking the files against each other."""
    config_file = hf_path / "config.json"
    if not config_file.is_file():
        raise MixtralError(f"{config_file}: missing; --hf-path must be a Hugging Face Mixtral folder")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise MixtralError(f"{config_file}: not valid JSON ({e})") from None
    args = args_from_hf_config(config, str(config_file))

    index_file = hf_path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            files = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise MixtralError(f"{index_file}: not a safetensors index ({e})") from None
    else:
        files = sorted(p.name for p in hf_path.glob("*.safetensors"))
        if not files:
            raise MixtralError(f"{hf_path}: no *.safetensors files")
    tensors = {}
    for name in files:
        file = hf_path / name
        if not file.is_file():
            raise MixtralError(f"{file}: listed in {index_file.name} but missing; download it again")
        safetensors_header(file)
        tensors.update(mx.load(str(file)))  # lazy: each tensor is read when it is used
    return args, tensors


def fetch_from_hub(repo_id: str) -> Path:
    """Download only what conversion needs (resumable, with progress bars); offline uses the cache."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except ImportError:
        raise MixtralError("downloading needs huggingface_hub: pip install huggingface_hub") from None
    except Exception as e:
        raise MixtralError(f"{repo_id}: not a local folder and not downloadable ({type(e).__name__}: {e})") from None


def check_shapes(groups, tensors, expected):
    """Every input tensor against the shape config.json implies, before anything is written."""
    for _, rows in groups:
        for name, hfs in rows:
            want = tuple(expected[name][1:] if ".experts." in name else expected[name])
            for hf in hfs:
                if tuple(tensors[hf].shape) != want:
                    raise MixtralError(f"tensor {hf}: shape {tuple(tensors[hf].shape)} contradicts config.json (expected {want})")


def convert_tensor(name, sources, q_bits, q_group_size, dtype, input_major=False):
    """Stack experts, quantize -> {name(s): array}."""
    w = mx.stack(sources) if ".experts." in name else sources[0]
    if not q_bits or name.endswith(NOT_QUANTIZED) or w.ndim < 2:
        return {name: w.astype(dtype)}
    if w.shape[-1] % q_group_size:
        raise MixtralError(f"tensor {name}: last dimension {w.shape[-1]} is not a multiple of --q-group-size {q_group_size}")
    if input_major and name != "tok_embeddings.weight" and w.shape[-2] % q_group_size == 0:
        w = w.swapaxes(-1, -2)  # (..., in, out): see mixtral.InputMajor
    q, scales, biases = mx.quantize(w, q_group_size, q_bits)
    base = name.removesuffix(".weight")
    return {name: q, f"{base}.scales": scales.astype(dtype), f"{base}.biases": biases.astype(dtype)}


def convert(hf_path, mlx_path, q_bits=8, q_group_size=64, dtype="bfloat16", max_shard_gb=5.0, force=False,
            layout="auto", log=print):
    out = Path(mlx_path)
    if layout == "auto":  # for the machine converting: it is usually the one that runs the model
        layout = "input-major" if on_cpu() else "standard"
    input_major = bool(q_bits) and layout == "input-major"
    src = Path(hf_path)
    if not src.exists():
        if str(hf_path).count("/") != 1 or str(hf_path).startswith((".", "/")):
            raise MixtralError(f"{hf_path}: no such folder (and not a Hub repo id like mistralai/Mixtral-8x7B-v0.1)")
        src = fetch_from_hub(str(hf_path))
    if out.exists() and not force:
        raise MixtralError(f"{out}: already exists; pass --force to replace it")
    if q_bits not in (None, 4, 8):
        raise MixtralError(f"--q-bits {q_bits}: use 8 or 4")
    tokenizer = src / "tokenizer.model"
    if not tokenizer.is_file():
        raise MixtralError(f"{tokenizer}: missing; the sentencepiece tokenizer ships with the checkpoint")
    args, tensors = open_checkpoint(src)
    expected = {k: v.shape for k, v in tree_flatten(Mixtral(args).parameters())}  # lazy zeros: shapes only
    groups = plan(args)
    needed = {hf for _, rows in groups for _, hfs in rows for hf in hfs}
    if missing := sorted(needed - tensors.keys()):
        raise MixtralError(f"{src}: missing tensor(s) {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if extra := sorted(tensors.keys() - needed):
        raise MixtralError(f"{src}: tensor(s) we cannot map {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
    check_shapes(groups, tensors, expected)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    except OSError as e:
        raise MixtralError(f"{out}: cannot write there ({e.strerror})") from None
    try:
        t0 = time.perf_counter()
        shard, shard_bytes, n_shards, total_bytes, n_params = {}, 0, 0, 0, 0
        max_bytes = max_shard_gb * 2**30

        def flush():
            nonlocal shard, shard_bytes, n_shards
            if shard:
                mx.savez(str(tmp / f"weights.{n_shards:02d}.npz"), **shard)
                shard, shard_bytes, n_shards = {}, 0, n_shards + 1
                mx.clear_cache()

        for g, (group, rows) in enumerate(groups):
            tic, in_bytes, out_bytes = time.perf_counter(), 0, 0
            for name, hfs in rows:
                sources = [tensors.pop(hf) for hf in hfs]  # pop: drop each input once it is used
                in_bytes += sum(s.nbytes for s in sources)
                n_params += sum(s.size for s in sources)
                arrays = convert_tensor(name, sources, q_bits, q_group_size, DTYPES[dtype], input_major)
                mx.eval(arrays)
                nbytes = sum(a.nbytes for a in arrays.values())
                if shard_bytes and shard_bytes + nbytes > max_bytes:
                    flush()
                shard.update(arrays)
                shard_bytes += nbytes
                out_bytes += nbytes
                del sources, arrays
                mx.clear_cache()  # hand freed inputs back to the OS rather than keep them for reuse
            total_bytes += out_bytes
            log(
                f"[{g + 1}/{len(groups)}] {group}: {in_bytes / 2**20:.1f} MB -> {out_bytes / 2**20:.1f} MB "
                f"in {time.perf_counter() - tic:.1f} s ({time.perf_counter() - t0:.0f} s elapsed)"
            )
        flush()
        config = args.to_dict()
        if q_bits:
            config["quantization"] = {"group_size": q_group_size, "bits": q_bits}
            if input_major:
                config["quantization"]["layout"] = "input-major"
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        if out.exists():  # --force: swap in the new folder, then remove the old one
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(
        f"converted {n_params:,} parameters to {out}: {total_bytes / 2**30:.2f} GB in {n_shards} shard(s), "
        f"{8 * total_bytes / n_params:.2f} bits/weight, {time.perf_counter() - t0:.1f} s"
    )
    return out


def build_parser():
    p = argparse.ArgumentParser(description="Convert Hugging Face Mixtral weights to MLX (8-bit by default).")
    p.add_argument("--hf-path", required=True, help="Hugging Face folder, or a Hub repo id such as mistralai/Mixtral-8x7B-Instruct-v0.1")
    p.add_argument("--mlx-path", default="mlx_model", help="output folder (default: %(default)s)")
    p.add_argument("--q-bits", type=int, choices=[8, 4], default=8, help="quantization bits (default: %(default)s)")
    p.add_argument("--q-group-size", type=int, choices=[32, 64, 128], default=64, help="weights per scale (default: %(default)s)")
    p.add_argument("--no-quantize", action="store_true", help="keep full-precision weights (--dtype)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="dtype of unquantized tensors and scales (default: %(default)s)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest output shard in GiB (default: %(default)s)")
    p.add_argument("--layout", choices=["auto", "standard", "input-major"], default="auto",
                   help="quantized layout: input-major runs ~5x faster on MLX's CPU backend, standard suits GPUs; "
                        "auto picks for this machine (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing --mlx-path")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.max_shard_gb <= 0:
        sys.exit("error: --max-shard-gb must be positive")
    try:
        convert(
            a.hf_path, a.mlx_path, None if a.no_quantize else a.q_bits, a.q_group_size, a.dtype, a.max_shard_gb, a.force,
            a.layout, log=lambda s: print(s, file=sys.stderr, flush=True),
        )
    except MixtralError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: nothing was written")


if __name__ == "__main__":
    main()
