"""The ops the model calls where MLX's CPU backend is slow, and which kernels run them.

On the CPU, ours (kernels/, an MLX C++ extension: mixtral_kernels) where they are built: the quantized
projections (qmm), attention (sdpa), RoPE, RMSNorm, SwiGLU and greedy argmax, each one op. On a GPU,
or where ours are not built (no compiler at install), MLX's own; `use_kernels` says which in one line,
with the remedy when ours cannot run. MIXTRAL_KERNELS=int16|exact|mlx chooses.

mixtral.py calls these seams and knows nothing else of the kernels.
"""

import os
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

import parallel
from machine import compute_dtype, on_cpu
from runtime import MixtralError


def rope(x, head_dim: int, base: float, offset: int):
    """Non-traditional (rotate-half) RoPE. Ours: one op, where MLX's CPU backend composes 28 (kernels/small.h)."""
    fast = KERNELS["module"]
    if fast is not None and x.dtype == mx.float32 and x.shape[-1] == head_dim:
        return fast.rope(x, offset=offset, base=base)
    return mx.fast.rope(x, head_dim, traditional=False, base=base, scale=1.0, offset=offset)


def rope_at(x, head_dim: int, base: float, positions: list):
    """RoPE of x (B, H, T, D), row t at positions[t] (several sequences' tokens one after another in a row,
    each at its own place). Ours: one op, each row the bits rope() gives it; MLX's: one per run of positions."""
    fast = KERNELS["module"]
    if fast is not None and x.dtype == mx.float32 and x.shape[-1] == head_dim:
        return fast.rope_at(x, positions, base=base)
    starts = [t for t in range(len(positions)) if t == 0 or positions[t] != positions[t - 1] + 1]
    runs = zip(starts, [*starts[1:], len(positions)])
    return mx.concatenate([rope(x[:, :, a:b], head_dim, base, positions[a]) for a, b in runs], axis=2)


def rms_norm(x, weight, eps: float):
    """Ours: one op, where MLX's CPU backend composes 10."""
    fast = KERNELS["module"]
    if fast is not None and x.dtype == mx.float32 and weight.dtype == mx.float32:
        return fast.rms_norm(x, weight, eps=eps)
    return mx.fast.rms_norm(x, weight, eps)


def sdpa(q, k, v, scale: float, mask=None):
    """Attention of q over the cached k, v (mask "causal", aligned to the end, or None for one new token).
    Ours on the CPU (kernels/attend.cpp: threads inside, each key read once for the query heads and rows
    that share it; MLX's general CPU path is 5x slower for one token, 10x for a prefill), else MLX's."""
    fast = KERNELS["module"]
    if fast is not None and (mask == "causal" or mask is None and q.shape[2] == 1) and q.dtype == mx.float32:
        return fast.attend(q, k, v, scale=scale)  # a float16 or bfloat16 cache read as it is stored
    if k.dtype != q.dtype:  # a cache in another dtype than the compute (--kv-dtype): MLX's kernel takes one
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def sdpa_segments(q, segments: list, scale: float, sdpa_one=sdpa):
    """Attention of several sequences' rows one after another in q (1, H, T, D), each over its own cache:
    segments are (keys, values, length, start, end), rows start:end of q the last of the cache's first
    `length` positions. Ours: one op (kernels/attend.cpp), each row the bits it gets alone; else
    sdpa_one (sdpa, or parallel's cut of it over CPU streams) per sequence."""
    fast = KERNELS["module"]
    if fast is not None and q.dtype == mx.float32:
        keys, values, lengths, starts, ends = (list(c) for c in zip(*segments))
        return fast.attend_segments(q, keys, values, lengths, starts, ends, scale=scale)
    return mx.concatenate(
        [
            sdpa_one(q[:, :, a:b], k[:, :, :n], v[:, :, :n], scale=scale, mask="causal" if b - a > 1 else None)
            for k, v, n, a, b in segments
        ],
        axis=2,
    )


def write_rows(rows, caches: list, offsets: list, starts: list, ends: list) -> list:
    """The caches (1, H, capacity, D), cache i with rows[:, :, starts[i]:ends[i]] written at positions offsets[i]
    on. Ours: one op for all (kernels/small.cpp), each new cache in its old one's buffer where nothing else holds
    it, as MLX's slice update does; else a slice update each."""
    fast = KERNELS["module"]
    if fast is not None and all(c.dtype == rows.dtype for c in caches):
        return fast.write_rows(rows, caches, offsets, starts, ends)
    for c, o, a, b in zip(caches, offsets, starts, ends):
        c[:, :, o : o + b - a] = rows[:, :, a:b]
    return caches


def kv_dtype(choice, compute):
    """The KV cache's dtype: `choice` (a name, an mx.Dtype), or by default (None, "auto") float16 where our
    attention reads it in place (the CPU: half the bytes a decode step reads at depth; docs/performance.md
    has its error), else the compute dtype (a GPU computes in float16 already; MLX's CPU attention would
    convert the whole cache every step)."""
    if choice not in (None, "auto"):
        return compute_dtype(choice)
    return mx.float16 if ours_compute(compute) else compute


def scales_dtype(stored, compute):
    """What the quantization scales and biases are kept as in memory: as the checkpoint stores them where
    our kernels read them (half precision widens exactly in registers, and a decode step reads 1.0625
    bytes a weight, not 1.125), else the compute dtype, as MLX's kernels want."""
    return stored if ours_compute(compute) and stored in (mx.float16, mx.bfloat16, mx.float32) else compute


def ours_compute(compute) -> bool:
    """Our kernels run a model computing in `compute` (the CPU, float32): they read half-precision caches
    and scales in place. Chooses the kernels now if not yet chosen."""
    if KERNELS["name"] is None:
        use_kernels()
    return KERNELS["module"] is not None and compute == mx.float32


def swiglu(a, b):
    """silu(a) * b. Ours on the CPU (kernels/small.cpp: one vectorized, threaded pass; MLX's CPU sigmoid
    is one scalar exp per element on one thread: 59 ms against 6.4 a layer in a 512-token prefill), else MLX's."""
    fast = KERNELS["module"]
    if fast is not None and a.dtype == b.dtype == mx.float32 and a.shape == b.shape:
        return fast.swiglu(a, b)
    return nn.silu(a) * b


def argmax(x):
    """The index of the largest value along the last axis: greedy decoding's draw. Ours on the CPU (kernels/small.h:
    vectorized, MLX's CPU loop compares one value at a time), else MLX's; the same index either way."""
    fast = KERNELS["module"]
    if fast is not None and x.dtype == mx.float32:
        return fast.argmax(x)
    return mx.argmax(x, axis=-1)


def qmm(x, w, scales, biases, group_size, bits, indices=None, sorted_indices=False):
    """x @ dequantize(w).T; with indices, w holds stacked experts and each batch element of x uses the
    one indices names. Ours on the CPU (kernels/, see use_kernels; scales in float32 or as a checkpoint
    stores them, float16 or bfloat16), else MLX's."""
    fast, path = KERNELS["module"], KERNELS["path"]
    if fast is not None and x.dtype == mx.float32:
        return fast.qmm(x, w, scales, biases, indices, group_size=group_size, bits=bits, path=path)
    if scales.dtype != x.dtype:  # kept as stored for ours (scales_dtype), then MLX's kernels chosen
        scales, biases = scales.astype(x.dtype), biases.astype(x.dtype)
    args = dict(transpose=True, group_size=group_size, bits=bits)
    if indices is None:
        return mx.quantized_matmul(x, w, scales, biases, **args)
    return mx.gather_qmm(x, w, scales, biases, rhs_indices=indices, sorted_indices=sorted_indices, **args)


KERNEL_CHOICES = ("auto", "int16", "exact", "mlx")
OUR_OPS = (
    "qmm",
    "attend",
    "attend_segments",
    "rope",
    "rope_at",
    "rms_norm",
    "swiglu",
    "write_rows",
    "argmax",
)  # what the model calls in mixtral_kernels
KERNELS = {"name": None, "module": None, "path": None, "line": ""}  # what qmm runs: use_kernels, or at load


def our_kernels():
    """-> (mixtral_kernels, None) where they are built and MLX computes on the CPU, else (None, why not)."""
    if not on_cpu():
        return None, "MLX computes on the GPU"
    try:
        import mixtral_kernels
    except ImportError as e:
        return None, f"{e}; pip install ./kernels builds them (a C++ compiler needed)"
    missing = [op for op in OUR_OPS if not hasattr(mixtral_kernels, op)]
    if missing:  # built from an older checkout
        return (
            None,
            f"the installed mixtral_kernels lacks {', '.join(missing)}: pip install --force-reinstall ./kernels",
        )
    return mixtral_kernels, None


def use_kernels(choice: Optional[str] = None) -> str:
    """Choose the kernels of the quantized projections in the usual layout:
    - "int16": ours (kernels/, the CPU only), activations rounded to int16 with one scale per weight
      group, integer dot products: the CPU default (its error against transformers equals the exact path's);
    - "exact": ours, float32 products and sums (MLX's arithmetic, in another order);
    - "mlx": MLX's own quantized_matmul and gather_qmm (on a GPU, always);
    - "auto" or None: $MIXTRAL_KERNELS if set, else int16 where ours are built and MLX computes on the CPU.
    -> one line that says which kernels run, and how to get the fast ones when they cannot."""
    choice = choice or os.environ.get("MIXTRAL_KERNELS") or "auto"
    if choice not in KERNEL_CHOICES:
        raise MixtralError(f"MIXTRAL_KERNELS={choice!r}: choose one of {', '.join(KERNEL_CHOICES)}")
    module, why = our_kernels() if choice != "mlx" else (None, "not asked for (MIXTRAL_KERNELS=mlx)")
    if module is None:
        if choice in ("int16", "exact") and on_cpu():
            raise MixtralError(f"MIXTRAL_KERNELS={choice}: our CPU kernels are not available ({why})")
        KERNELS.update(name="mlx", module=None, path=None, line=f"kernels: MLX's own ({why})")
        return KERNELS["line"]
    name = "int16" if choice == "auto" else choice
    KERNELS.update(name=name, module=module, path=module.INT16 if name == "int16" else module.EXACT)
    return set_kernel_threads(module.threads())


def set_kernel_threads(n: int) -> str:
    """Our kernels' threads inside each projection, when they run. -> the line that says which kernels run."""
    if KERNELS["module"] is not None:
        KERNELS["module"].set_threads(n)
        simd = KERNELS["module"].simd()
        KERNELS["line"] = f"kernels: ours, {KERNELS['name']} path, {simd}, {n} threads inside each projection"
    return KERNELS["line"]


def use_threads(model, n: int, projection: type):
    """n threads for the model: ours run them inside each op (chosen now, if not yet), MLX's own kernels
    are cut over n CPU streams instead (parallel.use_cpu_threads), attention included."""
    if KERNELS["name"] is None:
        use_kernels()
    set_kernel_threads(n)
    if n > 1:
        ours = KERNELS["module"] is not None
        threaded = lambda layer: ours and isinstance(layer, projection)
        parallel.use_cpu_threads(model, n, threaded=threaded, attention=not ours)
