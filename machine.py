"""The machine we run on: CPU or GPU, its cores, its memory, and whether a model fits in it."""

import os
import sys
from pathlib import Path
from typing import Optional

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


def kv_bytes_per_token(args, dtype) -> int:
    """The KV cache's bytes per token of context: keys and values of every layer."""
    return args.n_layers * 2 * args.n_kv_heads * args.head_dim * mx.zeros((), dtype).itemsize


GB = 1e9
MACOS_HEADROOM = 4 * GB  # what macOS and the apps beside us need of the RAM


def memory_plan(weights: int, kv_per_token: int, context: int, working_set: Optional[int], ram: int):
    """Decide whether a model fits: (runs, advice or None). Pure: sizes in bytes.

    Refuse only what cannot fit in RAM at all. On a Mac the GPU may wire at most `working_set`
    (Metal's max_recommended_working_set_size: about 2/3 of RAM on small Macs, 3/4 on large ones),
    a limit `sysctl iogpu.wired_limit_mb` raises: past it, run, and say how to make it fit.
    """
    need = weights + kv_per_token * context + GB  # and a GB for activations
    if weights > ram - MACOS_HEADROOM:
        return False, (
            f"the weights take {weights / GB:.1f} GB but this machine has {ram / GB:.0f} GB of memory; convert with "
            "--q-bits 4 (about 26 GB for Mixtral 8x7B), or run it over several machines (README: Run on several Macs)"
        )
    if not working_set or need <= working_set:
        return True, None
    ways = []
    if need <= ram - MACOS_HEADROOM:
        mb = min(int(-(-need // 2**20)), int((ram - MACOS_HEADROOM) // 2**20))
        ways.append(f"let the GPU use more memory: sudo sysctl iogpu.wired_limit_mb={mb} (until the next restart)")
    if weights + kv_per_token * 1024 + GB <= working_set:
        ways.append(f"a smaller --max-context (about {int((working_set - weights - GB) // kv_per_token)} tokens fit)")
    ways += ["--q-bits 4", "several machines (README: Run on several Macs)"]
    return True, (
        f"the weights ({weights / GB:.1f} GB) and a {context}-token KV cache need {need / GB:.1f} GB, more than the "
        f"{working_set / GB:.1f} GB this Mac lets the GPU keep; macOS may page them out and slow every token. To fix: "
        + "; or ".join(ways)
    )


def keep_resident(model, path: Path, context: int = 4096):
    """On a Mac: check the memory plan, then wire the weights so macOS does not page them out between
    tokens (as mlx-lm does)."""
    info = mx.device_info()
    working_set = info.get("max_recommended_working_set_size")
    ram = info.get("memory_size") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    runs, advice = memory_plan(weights, kv_bytes_per_token(model.args, model.dtype), context, working_set, ram)
    if not runs:
        raise MixtralError(f"{path}: {advice}")
    if advice:
        print(f"warning: {advice}", file=sys.stderr)
    if working_set:
        mx.set_wired_limit(working_set)
