"""Convert a Hugging Face Mixtral checkpoint to MLX: config.json + weights.NN.npz shards + tokenizer.model.

    python convert.py --hf-path mistralai/Mixtral-8x7B-Instruct-v0.1 --mlx-path mlx_model

Streams: each output tensor is built from lazily loaded inputs, quantized, written into the current
output shard and dropped, so peak memory is about one output shard whatever the model's size.
"""

import signal

if __name__ == "__main__":  # Ctrl-C during the imports below ends the program quietly; run_program() takes over after
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import contextlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

import folder
from folder import sha256
from machine import GB
from mixtral import DTYPES, Mixtral, ModelArgs, Tokenizer, check_vocabulary
from runtime import MixtralError, Terminated, run_program, signals_held

# Source module -> our module; each holds .weight (and .scales/.biases when the source is quantized).
# {l} is the layer. Experts come either one module per expert ({e}: Hugging Face, older mlx-community
# files), which we stack into (experts, out, in) for gather_mm, or already stacked (mlx-lm's
# switch_mlp). q_proj/k_proj stay as they are: Hugging Face stores them permuted for rotate-half RoPE,
# which is the RoPE mixtral.py applies.
NAME_MAP = {
    "model.embed_tokens": "tok_embeddings",
    "model.layers.{l}.input_layernorm": "layers.{l}.attention_norm",
    "model.layers.{l}.self_attn.q_proj": "layers.{l}.attention.wq",
    "model.layers.{l}.self_attn.k_proj": "layers.{l}.attention.wk",
    "model.layers.{l}.self_attn.v_proj": "layers.{l}.attention.wv",
    "model.layers.{l}.self_attn.o_proj": "layers.{l}.attention.wo",
    "model.layers.{l}.post_attention_layernorm": "layers.{l}.ffn_norm",
    "model.layers.{l}.block_sparse_moe.gate": "layers.{l}.feed_forward.gate",
    "model.layers.{l}.block_sparse_moe.experts.{e}.w1": "layers.{l}.feed_forward.experts.w1",
    "model.layers.{l}.block_sparse_moe.experts.{e}.w2": "layers.{l}.feed_forward.experts.w2",
    "model.layers.{l}.block_sparse_moe.experts.{e}.w3": "layers.{l}.feed_forward.experts.w3",
    "model.layers.{l}.block_sparse_moe.switch_mlp.gate_proj": "layers.{l}.feed_forward.experts.w1",
    "model.layers.{l}.block_sparse_moe.switch_mlp.down_proj": "layers.{l}.feed_forward.experts.w2",
    "model.layers.{l}.block_sparse_moe.switch_mlp.up_proj": "layers.{l}.feed_forward.experts.w3",
    "model.norm": "norm",
    "lm_head": "output",
}

# The 8-way router decides everything and is tiny: it stays in full precision (as in llama.cpp);
# a quantized one (mlx-lm quantizes it) is dequantized.
NOT_QUANTIZED = ("feed_forward.gate",)

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
                "moe": {
                    "num_experts": config["num_local_experts"],
                    "num_experts_per_tok": config["num_experts_per_tok"],
                },
                "rope_theta": config.get("rope_theta", 1e6),
            },
            source,
        )
    except KeyError as e:
        raise MixtralError(f"{source}: missing key {e}") from None


def plan(args: ModelArgs, names=frozenset()):
    """[(group name, [(our module, [source modules])])] in file order: embeddings, each layer, head.

    Where several source rows map to one module of ours, the one present in `names` is used."""

    def expand(src, l):
        e_range = range(args.moe.num_experts) if "{e}" in src else [None]
        return [src.format(l=l, e=e) for e in e_range]

    def rows(l, keep):
        out = {}
        for src, ours in NAME_MAP.items():
            if keep(src):
                found = expand(src, l)
                if ours.format(l=l) not in out or f"{found[0]}.weight" in names:
                    out[ours.format(l=l)] = found
        return list(out.items())

    groups = [("embeddings", rows(None, lambda src: src.startswith("model.embed")))]
    groups += [(f"layer {l}", rows(l, lambda src: "{l}" in src)) for l in range(args.n_layers)]
    groups.append(("head", rows(None, lambda src: src in ("model.norm", "lm_head"))))
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
    for k, t in header.items():
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if k != "__metadata__" and not (
            isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
        ):
            raise MixtralError(
                f"{path}: header entry {k!r} has no valid data_offsets; the file is damaged, download it again"
            )
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise MixtralError(f"{path}: truncated ({size} bytes, the header needs {8 + n + end}); download it again")
    return {k: t for k, t in header.items() if k != "__metadata__"}


def open_checkpoint(hf_path: Path):
    """-> (ModelArgs, {source name: lazy mx.array}, source quantization or None), the files checked
    against each other."""
    config_file = hf_path / "config.json"
    if not config_file.is_file():
        raise MixtralError(f"{config_file}: missing; --hf-path must be a Hugging Face Mixtral folder")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise MixtralError(f"{config_file}: not valid JSON ({e})") from None
    args = args_from_hf_config(config, str(config_file))
    quant = source_quantization(config, str(config_file))

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
    return args, tensors, quant


def fetch_from_hub(repo_id: str) -> Path:
    """Download only what conversion needs (resumable, with progress bars); offline uses the cache."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except ImportError:
        raise MixtralError("downloading needs huggingface_hub: pip install huggingface_hub") from None
    except Exception as e:
        raise MixtralError(f"{repo_id}: not a local folder and not downloadable ({type(e).__name__}: {e})") from None


def source_quantization(config: dict, source: str):
    """mlx-lm's "quantization" block (None for a float checkpoint): {"bits", "group_size"} plus
    optional per-module overrides, keyed by module name."""
    q = config.get("quantization")
    if q is None:
        return None
    if not (isinstance(q, dict) and isinstance(q.get("bits"), int) and isinstance(q.get("group_size"), int)):
        raise MixtralError(f"{source}: 'quantization' must hold integer 'bits' and 'group_size', got {q!r}")
    if q.get("mode", "affine") != "affine":
        raise MixtralError(
            f"{source}: quantization mode {q['mode']!r} is not supported; use an affine (default) checkpoint"
        )
    return q


def module_bits(quant: dict, module: str):
    """(bits, group_size) of a quantized source module."""
    q = quant.get(module) if isinstance(quant.get(module), dict) else quant
    return q["bits"], q["group_size"]


def logical_shape(tensors, module, quant):
    """A source module's weight shape as a float matrix (a packed one unpacked)."""
    shape = tuple(tensors[f"{module}.weight"].shape)
    if f"{module}.scales" in tensors:
        shape = shape[:-1] + (shape[-1] * 32 // module_bits(quant, module)[0],)
    return shape


def check_shapes(groups, tensors, expected, quant):
    """Every input tensor against the shape config.json implies, before anything is written."""
    for _, rows in groups:
        for name, modules in rows:
            want = expected[f"{name}.weight"]
            want = tuple(want[1:] if ".experts." in name and ".switch_mlp." not in modules[0] else want)
            for m in modules:
                if (got := logical_shape(tensors, m, quant)) != want:
                    raise MixtralError(f"tensor {m}.weight: shape {got} contradicts config.json (expected {want})")


def quantize_tensor(w, group_size: int, bits: int, chunk: int = 2**22):
    """Quantize in float32; store the scales and biases in the 2-byte float that rebuilds w best.

    -> ({"weight", "scales", "biases"}, relative RMS error). Quantizing bf16 weights in bf16 gives
    bf16 scales, whose 8-bit mantissa is as coarse as an 8-bit code: 1.5x the error of mlx-lm's
    float32 conversion. float16 keeps 11 bits but overflows above 65504 and loses bits below 6e-5,
    so both are tried and the smaller error wins (float16 nearly always). Groups run along the last
    axis, so rows are quantized `chunk` weights at a time: memory stays near one chunk in float32.
    """
    rows = w.reshape(-1, w.shape[-1])
    step = max(1, chunk // rows.shape[1])
    candidates = (mx.float16, mx.bfloat16)
    parts, err2, norm2 = [], [0.0] * len(candidates), 0.0
    for a in range(0, rows.shape[0], step):
        x = rows[a : a + step].astype(mx.float32)
        q = mx.quantize(x, group_size, bits)
        mx.eval(q)
        parts.append(q)
        norm2 += mx.sum(mx.square(x)).item()
        for i, dtype in enumerate(candidates):
            approx = mx.dequantize(q[0], q[1].astype(dtype), q[2].astype(dtype), group_size, bits)
            err2[i] += mx.sum(mx.square(approx - x)).item()
    best = min(range(len(candidates)), key=err2.__getitem__)
    join = lambda k, dtype=None: (
        mx.concatenate([p[k] for p in parts]).reshape(*w.shape[:-1], -1).astype(dtype or parts[0][k].dtype)
    )
    arrays = {"weight": join(0), "scales": join(1, candidates[best]), "biases": join(2, candidates[best])}
    return arrays, (err2[best] / max(norm2, 1e-30)) ** 0.5


def error_bound(bits: int, group_size: int) -> float:
    """The largest relative RMS error affine rounding can give: each weight moves at most half a step,
    a step is (max - min) / (2^bits - 1) <= 2 max|w| / (2^bits - 1), and max|w| <= sqrt(group) x the
    group's RMS. 3.1% at 8 bits, 53% at 4 bits (group 64); typical weights get a sixth of that."""
    return group_size**0.5 / (2**bits - 1)


def convert_module(name, modules, tensors, quant, q_bits, q_group_size, dtype):
    """Read (and drop) one module's source tensors; stack experts; quantize, or repack what is already
    quantized as we would write it. -> ({our tensor: array}, relative error, or None if not rounded)."""
    parts = {
        k: [tensors.pop(f"{m}.{k}") for m in modules]
        for k in ("weight", "scales", "biases")
        if f"{modules[0]}.{k}" in tensors
    }
    stack = ".experts." in name and ".switch_mlp." not in modules[0]
    parts = {k: mx.stack(v) if stack else v[0] for k, v in parts.items()}
    w = parts["weight"]
    quantized = q_bits and not name.endswith(NOT_QUANTIZED) and w.ndim >= 2
    if "scales" in parts:
        bits, group = module_bits(quant, modules[0])
        if quantized and (bits, group) == (q_bits, q_group_size):
            return {f"{name}.{k}": v for k, v in parts.items()}, None  # repacked as it is: lossless
        # float32 holds scale * q + bias exactly (an 8-bit integer times an 11-bit mantissa)
        f32 = lambda a: a.astype(mx.float32)
        w = mx.dequantize(w, f32(parts["scales"]), f32(parts["biases"]), group, bits)
    if not quantized:
        return {f"{name}.weight": w.astype(dtype or w.dtype)}, None
    if w.shape[-1] % q_group_size:
        raise MixtralError(
            f"tensor {name}: last dimension {w.shape[-1]} is not a multiple of --q-group-size {q_group_size}"
        )
    arrays, err = quantize_tensor(w, q_group_size, q_bits)
    if not err <= 1.5 * error_bound(q_bits, q_group_size):  # nan fails too
        raise MixtralError(
            f"tensor {name}: quantization error {err:.3g} is beyond the {error_bound(q_bits, q_group_size):.3g} that "
            f"{q_bits}-bit rounding can give; the source holds non-finite or corrupt values"
        )
    return {f"{name}.{k}": v for k, v in arrays.items()}, err


def error_summary(errors: dict, worst: int = 3) -> str:
    if not errors:
        return "no tensor rounded (full precision, or repacked as it was)"
    top = sorted(errors.items(), key=lambda kv: -kv[1])[:worst]
    mean = sum(errors.values()) / len(errors)
    return f"quantization error (relative RMS) mean {100 * mean:.2f}% over {len(errors)} tensors, worst " + ", ".join(
        f"{k} {100 * v:.2f}%" for k, v in top
    )


def convert(
    hf_path,
    mlx_path,
    q_bits="auto",
    q_group_size=None,
    dtype=None,
    max_shard_gb=5.0,
    force=False,
    layout="auto",
    tokenizer=None,
    log=print,
):
    """Convert a Hugging Face or mlx-lm (mlx-community) Mixtral folder or Hub id to ours.

    q_bits: 8, 4, None (no quantization) or "auto" (the source's bits if it is quantized, else 8).
    q_group_size: default the source's, else 64. dtype: of full-precision tensors, default the source's.
    """
    if layout not in ("auto", "standard"):
        raise MixtralError(
            f"--layout {layout}: no longer written; every device now runs the standard layout fastest "
            "(our CPU kernels, Metal): leave --layout out"
        )
    out, src = Path(mlx_path), Path(hf_path)
    if not src.exists():
        if not folder.is_hub_id(str(hf_path)):
            raise MixtralError(f"{hf_path}: no such folder (and not a Hub repo id like mistralai/Mixtral-8x7B-v0.1)")
        src = fetch_from_hub(str(hf_path))
    if out.exists() and not force:
        raise MixtralError(f"{out}: already exists; pass --force to replace it")
    args, tensors, quant = open_checkpoint(src)
    if q_bits == "auto":
        q_bits = quant["bits"] if quant else 8
    if q_bits not in (None, 4, 8):
        raise MixtralError(f"--q-bits {q_bits}: use 8 or 4")
    q_group_size = q_group_size or (quant["group_size"] if quant else 64)
    tokenizer = check_tokenizer(Path(tokenizer) if tokenizer else src / "tokenizer.model", args)
    expected = {k: v.shape for k, v in tree_flatten(Mixtral(args).parameters())}  # lazy zeros: shapes only
    groups = plan(args, tensors.keys())
    needed = {f"{m}.weight" for _, rows in groups for _, ms in rows for m in ms}
    allowed = needed | {f"{m[: -len('.weight')]}.{k}" for m in needed for k in ("scales", "biases")}
    folder.check_tensor_names(src, needed, tensors.keys(), allowed)
    check_shapes(groups, tensors, expected, quant)

    report = Report(log)
    with staging(out, log) as tmp:
        writer = ShardWriter(tmp, max_shard_gb * GB)
        for g, (group, rows) in enumerate(groups):
            tic, out_bytes = time.perf_counter(), 0
            for name, modules in rows:
                arrays, err = convert_module(name, modules, tensors, quant, q_bits, q_group_size, DTYPES.get(dtype))
                mx.eval(arrays)
                report.add(
                    name,
                    math.prod(expected[f"{name}.weight"]),
                    err,
                    repacked=err is None and f"{name}.scales" in arrays,
                )
                out_bytes += writer.add(arrays)
                del arrays
                mx.clear_cache()  # hand freed inputs back to the OS rather than keep them for reuse
            report.group(g, len(groups), group, [n for n, _ in rows], out_bytes, tic)
        writer.close()
        config = args.to_dict()
        if q_bits:
            config["quantization"] = {"group_size": q_group_size, "bits": q_bits}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        manifest = {
            "source": str(hf_path),
            "source_format": "mlx-lm" if quant else "hugging face",
            "bits": q_bits,
            "group_size": q_group_size if q_bits else None,
            "layout": "standard" if q_bits else None,
            "parameters": report.n_params,
            "repacked_tensors": report.repacked,
            "quantization_error": report.errors,
            "files": {
                f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256(tmp / f)}
                for f in writer.names + ["config.json", "tokenizer.model"]
            },
        }
        (tmp / folder.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    report.done(out, writer)
    return out


class ShardWriter:
    """Tensors into weights.NN.npz files of at most max_bytes each (a tensor larger than that gets a
    shard of its own); only the shard being filled is in memory."""

    def __init__(self, folder_path: Path, max_bytes: float):
        self.path, self.max_bytes = folder_path, max_bytes
        self.names, self.total_bytes = [], 0
        self.shard, self.shard_bytes = {}, 0

    def add(self, arrays: dict) -> int:
        """Add evaluated arrays; -> their bytes."""
        nbytes = sum(a.nbytes for a in arrays.values())
        if self.shard_bytes and self.shard_bytes + nbytes > self.max_bytes:
            self._flush()
        self.shard.update(arrays)
        self.shard_bytes += nbytes
        self.total_bytes += nbytes
        return nbytes

    def close(self):
        self._flush()

    def _flush(self):
        if self.shard:
            self.names.append(folder.shard_name(len(self.names)))
            with signals_held():  # a Ctrl-C is delivered once the zip is written, not inside it
                mx.savez(str(self.path / self.names[-1]), **self.shard)
            self.shard, self.shard_bytes = {}, 0
            mx.clear_cache()


class Report:
    """What the conversion did, tensor by tensor: parameters, rounding error, lossless repacks; a line
    per group as it goes, a summary at the end."""

    def __init__(self, log):
        self.log, self.start = log, time.perf_counter()
        self.n_params, self.errors, self.repacked = 0, {}, 0

    def add(self, name: str, n_params: int, err, repacked: bool):
        self.n_params += n_params
        if err is not None:
            self.errors[name] = err
        self.repacked += repacked

    def group(self, g: int, n: int, title: str, names, out_bytes: int, tic: float):
        worst = max((self.errors.get(name, 0) for name in names), default=0)
        self.log(
            f"[{g + 1}/{n}] {title}: {out_bytes / 1e6:.1f} MB"
            + (f", worst error {100 * worst:.2f}%" if worst else "")
            + f" in {time.perf_counter() - tic:.1f} s ({time.perf_counter() - self.start:.0f} s elapsed)"
        )

    def done(self, out: Path, writer: ShardWriter):
        total = writer.total_bytes
        self.log(
            f"converted {self.n_params:,} parameters to {out}: {total / GB:.2f} GB in {len(writer.names)} shard(s), "
            f"{8 * total / self.n_params:.2f} bits/weight, {time.perf_counter() - self.start:.1f} s"
            + (f"; {self.repacked} quantized tensors repacked without loss" if self.repacked else "")
        )
        self.log(error_summary(self.errors))


@contextlib.contextmanager
def staging(out: Path, log):
    """A hidden folder beside `out` to write into, renamed to `out` on success (an --force'd old one
    swapped out, then removed) and removed on failure: `out` is never half-written. Its name holds our
    pid, so a later run can tell a killed conversion's leftovers (remove_leftovers)."""
    remove_leftovers(out, log)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    except OSError as e:
        raise MixtralError(f"{out}: cannot write there ({e.strerror})") from None
    try:
        yield tmp
        if out.exists():  # --force: swap in the new folder, then remove the old one
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MixtralError(f"{out}: cannot write ({e.strerror or e}); nothing was written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_leftovers(out: Path, log):
    """Remove what a killed conversion (SIGKILL, the OOM killer) left beside `out`: up to a whole
    model. The folder names its process; one whose process is gone is a leftover."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.removeprefix(f".{out.name}.tmp-").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
            shutil.rmtree(tmp, ignore_errors=True)
            log(f"removed {tmp.name}, {size / GB:.2f} GB left by an interrupted conversion")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def check_tokenizer(path: Path, args: ModelArgs) -> Path:
    """The sentencepiece tokenizer.model, with the vocabulary the embeddings have."""
    if not path.is_file():
        raise MixtralError(
            f"{path}: missing (mlx-lm writes only tokenizer.json); pass --tokenizer with Mixtral's tokenizer.model "
            "(huggingface-cli download mistralai/Mixtral-8x7B-Instruct-v0.1 tokenizer.model, or mistral_common's "
            "data/tokenizer.model.v1)"
        )
    check_vocabulary(Tokenizer(path), args, path, "use the checkpoint's own tokenizer")
    return path


def build_parser():
    p = argparse.ArgumentParser(description="Convert Hugging Face Mixtral weights to MLX (8-bit by default).")
    p.add_argument(
        "--hf-path",
        required=True,
        help="Hugging Face or mlx-lm (mlx-community) folder, or a Hub repo id such as mistralai/Mixtral-8x7B-Instruct-v0.1",
    )
    p.add_argument("--mlx-path", default=folder.DEFAULT_MODEL_PATH, help="output folder (default: %(default)s)")
    p.add_argument(
        "--q-bits", type=int, choices=[8, 4], help="quantization bits (default: 8, or the source's if it is quantized)"
    )
    p.add_argument(
        "--q-group-size", type=int, choices=[32, 64, 128], help="weights per scale (default: 64, or the source's)"
    )
    p.add_argument("--no-quantize", action="store_true", help="keep full-precision weights")
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="dtype of full-precision tensors (default: the source's, so bf16 stays bf16)",
    )
    p.add_argument("--tokenizer", help="tokenizer.model to use (default: the one in --hf-path)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest output shard in GB (default: %(default)s)")
    p.add_argument(
        "--layout",
        default="standard",
        help="quantized layout: standard, (out, in) packed along in, the only one written (our CPU kernels and "
        "Metal run it fastest; folders written input-major by earlier versions still load)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --mlx-path")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # the child of supervise()
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = build_parser().parse_args(argv)

    def run():
        if opts.max_shard_gb <= 0:
            raise MixtralError("--max-shard-gb must be positive")
        log = lambda s: print(s, file=sys.stderr, flush=True)
        if not opts.in_process:
            return supervise(argv, Path(opts.mlx_path), log)
        end_with_parent()
        convert(
            opts.hf_path,
            opts.mlx_path,
            None if opts.no_quantize else opts.q_bits or "auto",
            opts.q_group_size,
            opts.dtype,
            opts.max_shard_gb,
            opts.force,
            opts.layout,
            opts.tokenizer,
            log=log,
        )

    run_program(run, interrupted="interrupted: nothing was written", out_of_memory=CONVERT_OUT_OF_MEMORY)


CONVERT_OUT_OF_MEMORY = (
    "nothing was written. Free memory or raise the limit, lower --max-shard-gb (the shard being filled "
    "stays in memory), and run it again"
)


def supervise(argv, out: Path, log=print, grace: float = 5.0):
    """Convert in a child process, and answer for it. A process cannot report its own end when an
    allocation fails inside MLX's CPU backend (it does not check: SIGSEGV) or when the OOM killer
    picks it (SIGKILL). Its parent can, and can remove what it left. Ctrl-C and SIGTERM are passed on;
    a child that has not ended `grace` seconds later is stuck inside MLX (it can hang when it cannot
    start a thread) and is killed."""
    child = subprocess.Popen(
        [sys.executable, __file__, *argv, "--in-process"], stderr=subprocess.PIPE, text=True, start_new_session=True
    )  # a Ctrl-C typed reaches it once: passed on by us
    came = []

    def pass_on(sig, _):
        child.send_signal(sig)
        came.append((sig, time.monotonic()))

    held = [""]  # the child's progress is passed on as it comes; its last line says how it ended

    def pump():
        for line in child.stderr:
            if held[0]:
                log(held[0].rstrip("\n"))
            held[0] = line

    owners = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        while child.poll() is None:
            if came and time.monotonic() - came[0][1] > grace:
                child.kill()
            time.sleep(0.05)
        reader.join(timeout=5)
    finally:
        for sig, owner in owners.items():
            signal.signal(sig, owner)
    code, last = child.returncode, held[0]
    if code != 0:  # killed, crashed, or ended stuck (runtime's watcher): it may have removed nothing itself
        remove_leftovers(out, log=lambda s: None)
    if code < 0 and came:  # killed by us, past the grace
        code = 130 if came[0][0] == signal.SIGINT else 143
    if code == 0 or (code == 1 and not last.startswith("error: ")):  # done, or a bug of ours (its traceback)
        log(last.rstrip("\n"))
        if code:
            raise SystemExit(code)
    elif code == 1:
        raise MixtralError(last.strip().removeprefix("error: "))
    elif code in (130, 143):
        raise KeyboardInterrupt if code == 130 else Terminated
    else:
        how = signal.Signals(-code).name if code < 0 else f"status {code}"
        why = (
            "the system ran out of memory?"
            if code == -signal.SIGKILL
            else "MLX's CPU backend ends so when an allocation fails: out of memory, or ulimit -v?"
        )
        raise MixtralError(f"{out}: the conversion died ({how}: {why}); {CONVERT_OUT_OF_MEMORY}")


def end_with_parent():
    """The child of supervise() stops, cleaning up as after SIGTERM, when its parent is gone."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
    main()
