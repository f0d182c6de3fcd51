"""What a converted folder holds, and the tools that read it without the model.

    config.json      ModelArgs plus an optional "quantization" block
    weights.NN.npz   the tensors, in shards (SHARDS)
    tokenizer.model  sentencepiece
    manifest.json    the source, the error report, and each file's size and sha256 (MANIFEST)

convert.py writes it; mixtral.load_model, `mixtral.py --verify` and `--info` read it.
"""

import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import List

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from machine import MAX_POSITIONS
from runtime import MixtralError

DEFAULT_MODEL_PATH = "mlx_model"
SHARDS = "weights.*.npz"
MANIFEST = "manifest.json"
# The quantized layouts a folder's config.json may name: "input-major" folders, written by earlier
# versions for MLX's own CPU kernels, are repacked at load (from_input_major).
LAYOUTS = {
    "standard": "standard layout",
    "input-major": "input-major layout (earlier versions': repacked at every load; convert it again)",
}


def shard_name(i: int) -> str:
    return f"weights.{i:02d}.npz"


def shards(path: Path) -> List[Path]:
    return sorted(Path(path).glob(SHARDS))


def cache_root() -> Path:
    """Where converted models and sessions are kept."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mixtral-mlx"


def identity(path: Path) -> str:
    """What the weights are, not where: a hash of the manifest's file hashes (of config.json and the
    shards' names and sizes for a folder converted before manifests). Reads no weight."""
    path = Path(path)
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        files = {"config.json": (path / "config.json").read_text(errors="replace")}
        files |= {s.name: s.stat().st_size for s in shards(path)}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def is_hub_id(name: str) -> bool:
    """Whether a --model-path or --hf-path that is no folder here names a Hugging Face Hub repo (ORG/NAME)."""
    return not Path(name).exists() and str(name).count("/") == 1 and not str(name).startswith((".", "/"))


def check_tensor_names(where, expected, found, allowed=None):
    """Every expected tensor present and none beyond `allowed` (default: the expected ones)."""
    listed = lambda names: ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    if missing := sorted(set(expected) - set(found)):
        raise MixtralError(f"{where}: missing tensor(s) {listed(missing)}")
    if extra := sorted(set(found) - set(expected if allowed is None else allowed)):
        raise MixtralError(f"{where}: unexpected tensor(s) {listed(extra)}")


def read_config(path: Path):
    """-> (config dict, quantization dict or None) from a converted folder's config.json."""
    if not path.is_dir():
        raise MixtralError(f"{path}: no such folder; convert a model first (python convert.py --help)")
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise MixtralError(f"{config_file}: missing; is {path} a converted model (python convert.py)?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MixtralError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise MixtralError(f"{config_file}: not a JSON object")
    quantization = config.pop("quantization", None)
    if quantization is not None and not (
        isinstance(quantization, dict)
        and quantization.get("bits") in (2, 3, 4, 5, 6, 8)
        and quantization.get("group_size") in (32, 64, 128)
        and quantization.get("layout", "standard") in LAYOUTS
    ):
        raise MixtralError(
            f'{config_file}: \'quantization\' must be {{"bits": 8 or 4, "group_size": 32, 64 or 128}}, got {quantization!r}; '
            "convert the model again"
        )
    return config, quantization


def manifest(path: Path) -> dict:
    """convert.py's record of a folder ({} when absent: converted by an older convert.py)."""
    try:
        data = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def source(path: Path) -> str:
    """What a folder was converted from, as convert.py's --hf-path; SOURCE when it is not recorded."""
    return str(manifest(path).get("source") or "SOURCE")


def damaged(shard: str) -> bool:
    """Whether an .npz fails its own CRC-32 checks (reads the whole file)."""
    try:
        with zipfile.ZipFile(shard) as z:
            return z.testzip() is not None
    except (zipfile.BadZipFile, OSError, EOFError):
        return True


def describe(model_path, args, quantization, kv_per_token: int, kv_dtype: str) -> str:
    """What a converted folder holds, from its config (args, quantization: mixtral.read_config), manifest
    and file sizes (no weight is read); kv_per_token bytes of cache per token in kv_dtype."""
    path = Path(model_path)
    record = manifest(path)
    files = shards(path)
    size = sum(f.stat().st_size for f in files)
    q = quantization or {}
    quant = (
        f"{q['bits']} bits, group {q['group_size']}, {LAYOUTS[q.get('layout', 'standard')]}"
        if q
        else "none (full precision)"
    )
    n_params = record.get("parameters")
    errors = record.get("quantization_error") or {}
    if errors:
        worst = max(errors, key=errors.get)
        error = f"mean {100 * sum(errors.values()) / len(errors):.2f}%, worst {worst} {100 * errors[worst]:.2f}% (relative RMS, {len(errors)} tensors)"
    elif record.get("repacked_tensors"):
        error = f"none added: {record['repacked_tensors']} quantized tensors repacked as they were"
    else:
        error = "none (nothing rounded)" if record else "unknown (no manifest.json: converted by an older convert.py)"
    kv = kv_per_token
    return "\n".join(
        [
            f"{path}",
            f"  source        {record.get('source', 'unknown')} ({record.get('source_format', 'unknown format')})",
            f"  model         {args.n_layers} layers, {args.dim} wide, {args.moe.num_experts} experts (top {args.moe.num_experts_per_tok}), "
            f"vocabulary {args.vocab_size}" + (f", {n_params:,} parameters" if n_params else ""),
            f"  quantization  {quant}",
            f"  files         {len(files)} shard(s), {format_bytes(size)}",
            f"  error         {error}",
            f"  memory        {format_bytes(size)} of weights + KV cache {format_bytes(kv)} per token in {kv_dtype} "
            f"({format_bytes(kv * MAX_POSITIONS)} at {MAX_POSITIONS} tokens)",
        ]
    )


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def verify(model_path, log=lambda s: print(s, file=sys.stderr, end="", flush=True)):
    """Check every file against manifest.json (size and sha256), or each shard's CRC-32 when there is no
    manifest; raise MixtralError naming the first bad file. Reads everything: minutes for 50 GB."""
    path = Path(model_path)
    read_config(path)
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        files = None
    except (ValueError, KeyError, TypeError) as e:
        raise MixtralError(f"{path / MANIFEST}: unreadable ({e}); convert the model again") from None
    try:
        _verify_files(path, files, log)
    finally:
        log("\n")


def _verify_files(path: Path, files, log):
    if files is None:  # converted before manifests: the zip CRCs are all there is
        for shard in shards(path):
            log(f"\r[verify] {shard.name} (CRC only: no manifest.json)\x1b[K")
            if damaged(str(shard)):
                raise MixtralError(f"{shard}: damaged (a CRC-32 check fails); copy or convert it again")
        return
    total, done = sum(f["bytes"] for f in files.values()), 0
    for name, want in files.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != want["bytes"]:
            size = file.stat().st_size if file.is_file() else "no"
            raise MixtralError(f"{file}: {size} bytes, the manifest says {want['bytes']}; copy it again")

        def progress(n):
            nonlocal done
            done += n
            log(f"\r[verify] {name} {100 * done / max(total, 1):.0f}% of {format_bytes(total)}\x1b[K")

        if sha256(file, progress) != want["sha256"]:
            raise MixtralError(f"{file}: its sha256 differs from the manifest's: the file is damaged; copy it again")


def sha256(path, progress=lambda n: None) -> str:
    """The file's sha256, read 16 MB at a time (progress(bytes) after each)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            progress(len(chunk))
    return h.hexdigest()


# --------------------------------------------------------------------------- the layout of earlier versions

INPUT_MAJOR_NOTE = (
    "{path} is in the input-major layout of earlier versions: repacked to the usual layout at every load "
    "(each weight rounded a second time); convert it again for the usual layout, a faster load and no "
    "second rounding: python convert.py --hf-path {source} --mlx-path {path} --force"
)


def from_input_major(path: Path, model, weights: dict, group_size: int, bits: int, projection: type) -> dict:
    """A folder that convert.py wrote "input-major" before our CPU kernels (each projection whose
    outputs fill whole groups stored (..., in, out), quantized along out) -> the usual layout, lazily:
    each such weight is dequantized, transposed and quantized again along in (a second rounding)."""
    print(f"note: {INPUT_MAJOR_NOTE.format(path=path, source=source(path))}", file=sys.stderr)
    out = dict(weights)
    for name, layer in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if not isinstance(layer, projection) or layer["weight"].shape[-2] % group_size:
            continue
        old = [weights[f"{name}.{k}"] for k in ("weight", "scales", "biases")]
        w = mx.dequantize(old[0], *(a.astype(mx.float32) for a in old[1:]), group_size, bits)
        for k, a in zip(("weight", "scales", "biases"), mx.quantize(w.swapaxes(-1, -2), group_size, bits)):
            out[f"{name}.{k}"] = a
    return out
