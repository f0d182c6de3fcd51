"""The machine we run on: CPU or GPU, its cores, its memory, and whether a model fits in it."""

import functools
import os
import sys
from typing import Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from runtime import MixtralError


def on_cpu() -> bool:
    """Whether MLX computes on the CPU (Linux, or a machine without a GPU)."""
    return mx.default_device().type == mx.DeviceType.cpu


def default_cpu_threads() -> int:
    """One stream per core (up to 8) on the CPU; 1 on a GPU, whose kernels use the whole device."""
    if not on_cpu():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, 8)


def default_dtype():
    # MLX's CPU kernels are several times faster in float32 (and gather_mm supports only float32
    # there); on a GPU, float16 halves the memory traffic that decoding is bound by.
    return mx.float32 if on_cpu() else mx.float16


DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def compute_dtype(dtype):
    """An mx.Dtype from a name, an mx.Dtype, or None (the machine's default)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise MixtralError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype or default_dtype()


def kv_bytes_per_token(args, dtype) -> int:
    """The KV cache's bytes per token of context: keys and values of every layer."""
    return args.n_layers * 2 * args.n_kv_heads * args.head_dim * mx.zeros((), dtype).itemsize


def rank_kv_bytes_per_token(model) -> int:
    """The KV cache's bytes per token on this rank: its KV heads' (all of them, alone)."""
    heads = model.layers[0].attention.n_kv_heads
    return kv_bytes_per_token(model.args, model.kv_dtype or model.dtype) * heads // model.args.n_kv_heads


GB = 1e9  # every size we print in GB is 10^9 bytes
MACOS_HEADROOM = 4 * GB  # what macOS and the apps beside us need of the RAM
ACTIVATIONS = GB  # a prefill chunk's activations, roughly
MAX_POSITIONS = 32768  # Mixtral's context length


MEMORY_CAP = "MIXTRAL_MEMORY_GB"  # at most this much for the model; "A,B,C": rank r takes the r-th


@functools.cache
def memory() -> Tuple[int, Optional[int]]:
    """(RAM, the GPU's working set or None) in bytes, read once. On a Mac the GPU may wire at most the
    working set (Metal's max_recommended_working_set_size: about 2/3 of RAM on small Macs, 3/4 on large
    ones), a limit `sysctl iogpu.wired_limit_mb` raises. MIXTRAL_MEMORY_GB caps what the model may
    have of it (model_budget): to leave memory to other programs, or to test uneven ranks on one machine."""
    info = mx.device_info()
    ram = info.get("memory_size") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    working_set = info.get("max_recommended_working_set_size")
    if (cap := memory_cap()) is not None:
        ram, working_set = min(ram, cap + MACOS_HEADROOM), min(working_set, cap) if working_set else None
    return ram, working_set


def memory_cap() -> Optional[int]:
    """MIXTRAL_MEMORY_GB in bytes (this rank's entry of a list), or None."""
    text = os.environ.get(MEMORY_CAP, "").strip()
    if not text:
        return None
    values = text.split(",")
    rank = int(os.environ.get("MLX_RANK", "0") or 0)
    try:
        gb = float(values[rank] if len(values) > 1 else values[0])
        if not gb > 0:
            raise ValueError
    except (ValueError, IndexError):
        raise MixtralError(
            f"{MEMORY_CAP}={text!r}: give the GB the model may use here, one positive number, or one per rank "
            f"under mlx.launch (e.g. 3,2,2: this is rank {rank})"
        ) from None
    return int(gb * GB)


def model_budget() -> int:
    """Bytes this machine can give the model (weights, KV cache, activations): the GPU's working set on a
    Mac, else the RAM less what the system needs; MIXTRAL_MEMORY_GB caps it."""
    ram, working_set = memory()
    return working_set or ram - MACOS_HEADROOM


def weight_bytes(model) -> int:
    """Bytes of the model's tensors on this rank (lazy ones too: nothing is read)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def largest_context(weights: int, kv_per_token: int, working_set: Optional[int], ram: int) -> int:
    """The most tokens of KV cache that fit beside the weights: in the GPU's working set on a Mac, in
    the RAM less what the system needs elsewhere."""
    budget = working_set or ram - MACOS_HEADROOM
    return max(0, int((budget - weights - ACTIVATIONS) // kv_per_token))


def memory_plan(
    weights: int,
    kv_per_token: int,
    context: int,
    working_set: Optional[int],
    ram: int,
    context_flag: Optional[str] = "--max-context",
):
    """Decide whether a model and `context` tokens of cache fit: (runs, advice or None). Pure: bytes.

    Refuse only what cannot fit in RAM at all. Past the GPU's working set, run, and say how to make it
    fit; the advice names `context_flag`, the program's way to need less context (None: it has none).
    """
    need = weights + kv_per_token * context + ACTIVATIONS
    if weights > ram - MACOS_HEADROOM:
        return False, (
            f"the weights take {weights / GB:.1f} GB but this machine has {ram / GB:.0f} GB of memory; convert with "
            "--q-bits 4 (about 26 GB for Mixtral 8x7B), or run it over several machines (README: Run on several Macs)"
        )
    if not working_set or need <= working_set:
        return True, None
    ways = []
    if need <= ram - MACOS_HEADROOM:
        mb = min(int(-(-need // 2**20)), int((ram - MACOS_HEADROOM) // 2**20))  # sysctl counts MiB
        ways.append(f"let the GPU use more memory: sudo sysctl iogpu.wired_limit_mb={mb} (until the next restart)")
    fits = largest_context(weights, kv_per_token, working_set, ram)
    if context_flag and fits >= 1024:
        ways.append(f"a smaller {context_flag} (about {fits} tokens fit)")
    ways += ["4-bit weights (convert.py --q-bits 4)", "several machines (README: Run on several Macs)"]
    return True, (
        f"the weights ({weights / GB:.1f} GB) and a {context}-token KV cache need {need / GB:.1f} GB, more than the "
        f"{working_set / GB:.1f} GB this Mac lets the GPU keep; macOS may page them out and slow every token. To fix: "
        + "; or ".join(ways)
    )


def check_memory(model, context: int, context_flag: Optional[str], where) -> None:
    """Refuse (MixtralError) a model that cannot fit; warn, on stderr, when `context` tokens will not
    stay resident, naming the program's own flags."""
    ram, working_set = memory()
    kv = rank_kv_bytes_per_token(model)
    runs, advice = memory_plan(weight_bytes(model), kv, context, working_set, ram, context_flag)
    if not runs:
        raise MixtralError(f"{where}: {advice}")
    if advice:
        print(f"warning: {advice}", file=sys.stderr)


def default_context(model) -> int:
    """Mixtral's 32k positions, capped to what the KV cache can take beside the weights (1024 at least)."""
    ram, working_set = memory()
    fits = largest_context(weight_bytes(model), rank_kv_bytes_per_token(model), working_set, ram)
    return max(1024, min(MAX_POSITIONS, fits))


def keep_resident(model, where) -> None:
    """Before any weight is read: refuse a model larger than the RAM. On a Mac, wire the weights so
    macOS does not page them out between tokens (as mlx-lm does)."""
    ram, working_set = memory()
    runs, advice = memory_plan(weight_bytes(model), 0, 0, None, ram)
    if not runs:
        raise MixtralError(f"{where}: {advice}")
    if working_set:
        mx.set_wired_limit(working_set)
