"""Quantized projections, attention (one sequence, or several in a row), RoPE, RMSNorm, SwiGLU, cache writes and argmax for Mixtral on MLX's CPU backend
(qmm.cpp, attend.cpp, small.cpp).

    from mixtral_kernels import qmm, EXACT, INT16
    y = qmm(x, w, scales, biases, indices, group_size=64, bits=8, path=EXACT)

Importing it fails with an ImportError whose message is one line when the module was not built (no
compiler) or was built with a nanobind that differs from mlx's own.
"""

import mlx.core as mx

try:
    from ._ext import (
        accepts_arrays,
        argmax,
        attend,
        attend_segments,
        qmm,
        rms_norm,
        rope,
        rope_at,
        set_threads,
        simd,
        swiglu,
        threads,
        write_rows,
    )
except ImportError as e:
    raise ImportError(f"mixtral_kernels was installed without its compiled module ({e})") from None

EXACT, INT16 = 0, 1  # the paths: float32 products and sums; int16 activations in blocks of 32

try:
    accepts_arrays(mx.zeros(1))
except TypeError:
    raise ImportError(
        "mixtral_kernels was built with a nanobind that differs from mlx's own, so it cannot take MLX arrays: "
        "pip install --force-reinstall ./kernels (its pyproject.toml pins the matching nanobind)"
    ) from None

__all__ = [
    "qmm",
    "attend",
    "attend_segments",
    "rope",
    "rope_at",
    "rms_norm",
    "swiglu",
    "write_rows",
    "argmax",
    "set_threads",
    "threads",
    "simd",
    "EXACT",
    "INT16",
]
