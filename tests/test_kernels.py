"""Our CPU kernels (kernels/, mixtral_kernels.qmm and .attend) against MLX's quantized_matmul,
gather_qmm and scaled_dot_product_attention.

Bounds, for one output y = sum_k x_k w_k over K inputs (w the dequantized weights):
- exact path: both sides sum K float32 products of float32 dequantized weights (scale * q + bias: two
  roundings), in different orders; each is within gamma_K * sum |x_k w_k| of the true sum (recursive
  summation, gamma_K = K eps / (1 - K eps)), so they differ by at most 2 (K + 3) eps sum |x_k w_k|.
- int16 path: x is rounded to int16 with one scale per weight group, max|x_group| / 32767, so each x_k
  moves by at most max|x_group| / 65534; y moves by at most sum_k |w_k| max|x_group(k)| / 65534, plus
  the exact path's rounding (the integer sums themselves are exact).
- attend (one query row): each score s_j = scale q.k_j is within gamma_D scale sum |q_d k_jd| of its
  true value on either side, so the two sides' scores differ by at most d = 2 (D + 2) eps max_j scale
  sum |q_d k_jd|; softmax moves each weight p_j by a factor within exp(+-2d), so the outputs differ by
  at most (exp(2d) - 1) max|v| from that, plus each side's rounding of the exponentials, the
  normalization and the weighted sum of S values: 2 (S + 4) eps max|v|.
- rope: the same float32 formulas as MLX's, angles theta = position * exp(-i log(base) / half); each side's
  exp, product, cos and sin are within a few ulps, so the angles differ by at most 8 eps theta and the
  outputs by at most (|x1| + |x2|) (8 eps theta + 8 eps) per pair.
- rms_norm: a sum of D squares in another order, then the same products: 2 (D + 4) eps |x w| / rms.
- swiglu, against float64's a b / (1 + exp(-a)): exp within 2 ulp (an error d in exp(-a) moves the
  result by at most d), then three roundings (a b, 1 + e, the division): 6 eps |result|; below -87,
  exp(-a) is clamped at exp(88), so tiny results are off by at most |a b| exp(-88) < 1e-38 |a b|. (MLX's own silu * b
  is 31 eps off on the same grid: the reference is float64, not MLX.)
"""

import os
import platform
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mixtral
import ops
from conftest import LAYOUTS, ROOT, convert_form, examples

EPS = np.finfo(np.float32).eps


def test_the_kernels_are_built_and_chosen_where_ci_runs(kernels):
    # CI must exercise them: a build that failed quietly (no compiler) would leave only MLX's kernels.
    line = kernels("auto")
    assert line.startswith("kernels: ours, int16 path") or not os.environ.get("CI"), line


def ours():
    import mixtral_kernels  # a test that needs them fails without them: it never skips

    return mixtral_kernels


def problem(seed, bits, group, K, N, batch, rows, experts=0):
    rng = np.random.default_rng(seed)
    lead = (experts,) if experts else ()
    w = mx.array(rng.standard_normal((*lead, N, K)).astype(np.float32))
    q = mx.quantize(w, group, bits)
    x = mx.array((rng.standard_normal((*batch, rows, K)) * rng.uniform(0.1, 10)).astype(np.float32))
    return x, q, np.array(mx.dequantize(*q, group, bits))


def bounds(x, wd, group, idx=None):
    """(exact bound, int16 extra) per output, as the module docstring derives them."""
    x = np.array(x, np.float64)
    blocks = np.abs(x).reshape(*x.shape[:-1], -1, group).max(-1).repeat(group, -1)  # max|x_group(k)| per k
    w = np.abs(wd.astype(np.float64))
    w = w[np.array(idx)] if idx is not None else w  # each batch element's expert
    K = x.shape[-1]
    absdot = np.einsum("...k,...nk->...n", np.abs(x), w) if idx is not None else np.abs(x) @ w.T
    moved = np.einsum("...k,...nk->...n", blocks, w) if idx is not None else blocks @ w.T
    return 2 * (K + 3) * EPS * absdot, moved / 65534


shapes = dict(
    seed=st.integers(0, 2**16),
    bits=st.sampled_from([4, 8]),
    group=st.sampled_from([32, 64, 128]),
    k_groups=st.integers(1, 6),
    N=st.integers(1, 80),
    rows=st.integers(1, 9),
)


@settings(max_examples=examples(40))
@given(**shapes, batch=st.lists(st.integers(1, 3), max_size=2))
def test_a_dense_projection_equals_mlx_quantized_matmul(seed, bits, group, k_groups, N, rows, batch):
    mk = ours()
    x, q, wd = problem(seed, bits, group, group * k_groups, N, tuple(batch), rows)
    ref = np.array(mx.quantized_matmul(x, *q, transpose=True, group_size=group, bits=bits))
    exact, moved = bounds(x, wd, group)
    got = np.array(mk.qmm(x, *q, None, group_size=group, bits=bits, path=mk.EXACT))
    assert got.shape == ref.shape and np.all(np.abs(got - ref) <= exact), np.abs(got - ref).max()
    fast = np.array(mk.qmm(x, *q, None, group_size=group, bits=bits, path=mk.INT16))
    assert np.all(np.abs(fast - got) <= 2 * exact + moved), np.abs(fast - got).max()


@settings(max_examples=examples(40))
@given(**shapes, experts=st.integers(1, 8), chosen=st.integers(1, 3), sort=st.booleans())
def test_a_gathered_projection_equals_mlx_gather_qmm(seed, bits, group, k_groups, N, rows, experts, chosen, sort):
    mk = ours()
    # As the model calls it: decode, x (B, 1, 1, K) against indices (B, k); prefill, rows sorted by expert.
    x, q, wd = problem(seed, bits, group, group * k_groups, N, (rows, 1), 1, experts)
    idx = np.random.default_rng(seed).integers(0, experts, (rows, chosen))
    if sort:
        idx, x = np.sort(idx.ravel()), mx.broadcast_to(x, (rows, chosen, 1, x.shape[-1])).reshape(-1, 1, x.shape[-1])
    idx = mx.array(idx.astype(np.uint32))
    ref = mx.gather_qmm(x, *q, rhs_indices=idx, transpose=True, group_size=group, bits=bits, sorted_indices=sort)
    ref = np.array(ref)
    got = np.array(mk.qmm(x, *q, idx, group_size=group, bits=bits, path=mk.EXACT))
    xb = np.broadcast_to(np.array(x), (*ref.shape[:-1], x.shape[-1]))
    exact, moved = bounds(xb, wd, group, np.broadcast_to(np.array(idx)[..., None], ref.shape[:-1]))
    assert got.shape == ref.shape and np.all(np.abs(got - ref) <= exact), np.abs(got - ref).max()
    fast = np.array(mk.qmm(x, *q, idx, group_size=group, bits=bits, path=mk.INT16))
    assert np.all(np.abs(fast - got) <= 2 * exact + moved), np.abs(fast - got).max()


@settings(max_examples=examples(20))
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 5), experts=st.integers(2, 8), chosen=st.integers(1, 2))
def test_views_are_read_as_they_are(seed, rows, experts, chosen):
    """x as a transposed view and the indices as a slice of argpartition's (what the model passes,
    read in place with their strides: no copy op in the graph)."""
    mk = ours()
    x, q, _ = problem(seed, 8, 64, 128, 24, (), rows, experts)
    xt = mx.array(np.ascontiguousarray(np.array(x).T)).T  # (rows, K), column-major
    scores = mx.array(np.random.default_rng(seed).standard_normal((rows, experts)).astype(np.float32))
    idx = mx.argpartition(-scores, kth=chosen - 1, axis=-1)[..., :chosen]  # (rows, chosen), a strided view
    xe = mx.expand_dims(xt, (-2, -3))  # (rows, 1, 1, K)
    ref = np.array(mx.gather_qmm(xe, *q, rhs_indices=idx, transpose=True, group_size=64, bits=8))
    got = np.array(mk.qmm(xe, *q, idx, group_size=64, bits=8, path=mk.EXACT))
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    dense = np.array(mk.qmm(xt, q[0][0], q[1][0], q[2][0], None, group_size=64, bits=8, path=mk.EXACT))
    ref = np.array(mx.quantized_matmul(xt, q[0][0], q[1][0], q[2][0], transpose=True, group_size=64, bits=8))
    assert np.abs(dense - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("N", [40, 37])  # 37: a piece's last weight row has no partner (dots_int16 alone)
def test_a_row_gets_the_same_bits_alone_or_among_many(bits, N):
    """Prefill takes rows in passes of 3 to 6 (11 rows: 6 and 5; one widened weight row for all of them), decode
    one at a time: each output must be the same float either way, or a chat's cache would drift from a prefill."""
    mk = ours()
    x, q, _ = problem(7, bits, 64, 256, N, (), 11)
    for path in (mk.EXACT, mk.INT16):
        many = np.array(mk.qmm(x, *q, None, group_size=64, bits=bits, path=path))
        alone = np.concatenate(
            [np.array(mk.qmm(x[i : i + 1], *q, None, group_size=64, bits=bits, path=path)) for i in range(11)]
        )
        assert np.array_equal(many, alone)


@settings(max_examples=examples(12))
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 32), bits=st.sampled_from([4, 8]), chosen=st.integers(1, 2))
def test_a_decoding_row_gets_the_same_bits_alone_or_in_a_batch_with_any_mix_of_experts(seed, rows, bits, chosen):
    """A batch of decode steps (server.py): each sequence's row, routed to `chosen` of 8 experts, the rows
    sorted by expert as FeedForward does, must get the same floats as the row alone, unsorted."""
    mk = ours()
    x, q, _ = problem(seed, bits, 64, 256, 48, (rows, 1), 1, experts=8)  # x (rows, 1, 1, K)
    idx = np.random.default_rng(seed).integers(0, 8, (rows, chosen))
    order = np.argsort(idx.ravel(), kind="stable")
    xs = mx.broadcast_to(x, (rows, chosen, 1, x.shape[-1])).reshape(-1, 1, x.shape[-1])[mx.array(order)]
    for path in (mk.EXACT, mk.INT16):
        many = np.array(
            mk.qmm(xs, *q, mx.array(idx.ravel()[order].astype(np.uint32)), group_size=64, bits=bits, path=path)
        )
        for i in range(rows):
            row = np.array(
                mk.qmm(
                    x[i : i + 1], *q, mx.array(idx[i : i + 1].astype(np.uint32)), group_size=64, bits=bits, path=path
                )
            )
            assert np.array_equal(many[np.argsort(order)].reshape(rows, chosen, -1)[i], row.reshape(chosen, -1))


@pytest.mark.parametrize("rows", [1, 513])
@pytest.mark.parametrize("bits", [4, 8])
def test_ragged_shapes_and_one_expert_for_every_row(rows, bits):
    mk = ours()
    N, K, group = 37, 96, 32  # outputs not a multiple of 8 (the vector width), inputs 3 groups
    x, q, wd = problem(rows, bits, group, K, N, (rows,), 1, experts=4)
    idx = mx.full((rows,), 2, mx.uint32)  # every row to expert 2
    ref = np.array(mx.gather_qmm(x, *q, rhs_indices=idx, transpose=True, group_size=group, bits=bits))
    exact, _ = bounds(np.array(x), wd, group, np.full((rows, 1), 2))
    for path in (mk.EXACT, mk.INT16):
        got = np.array(mk.qmm(x, *q, idx, group_size=group, bits=bits, path=path))
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= (exact.max() if path == mk.EXACT else 1e-3 * np.abs(ref).max())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("bits", [8, 4])
def test_half_precision_scales_give_the_bits_of_their_float32_values_one_row_or_many(dtype, bits):
    # A checkpoint's scales are float16 (convert.py): a tile of up to 4 rows (one pass) reads them as
    # stored, a larger tile from a block widened first; all must be the float32 values' bits. 9 groups: a
    # whole block and a part.
    mk = ours()
    x, (w, s, b), _ = problem(0, bits, 64, 64 * 9, 37, (), 6)
    s, b = s.astype(getattr(mx, dtype)), b.astype(getattr(mx, dtype))
    run = lambda x, s, b: np.array(mk.qmm(x, w, s, b, None, group_size=64, bits=bits, path=mk.INT16))
    ref = run(x, s.astype(mx.float32), b.astype(mx.float32))
    assert np.array_equal(run(x, s, b), ref)
    for i in range(6):
        assert np.array_equal(run(x[i : i + 1], s, b), ref[i : i + 1]), i
    for rows in (2, 3, 4):
        assert np.array_equal(run(x[:rows], s, b), ref[:rows]), rows


def test_a_bad_shape_is_refused_with_a_message():
    mk = ours()
    x, q, _ = problem(0, 8, 64, 128, 16, (), 2)
    with pytest.raises(ValueError, match="x's last axis must match"):
        mk.qmm(x[..., :64], *q, None, group_size=64, bits=8, path=mk.EXACT)


@pytest.fixture(scope="module")
def standard(tmp_path_factory, hf_tiny):
    out = tmp_path_factory.mktemp("standard")
    return {bits: convert_form(hf_tiny, out / str(bits), **LAYOUTS[f"{bits}-bit standard"]) for bits in (8, 4)}


@pytest.mark.parametrize("bits", [8, 4])
def test_greedy_ids_of_the_exact_path_equal_mlx_kernels(standard, bits, kernels):
    ids = {}
    for name in ("mlx", "exact"):
        kernels(name)
        model, tokenizer = mixtral.load_model(standard[bits])
        prompt = tokenizer.encode("[INST] Tell me about the sea. [/INST]")
        out = []
        for y in mixtral.generate(model, prompt):
            out.append(y)
            if len(out) == 24:
                break
        ids[name] = out
    assert ids["exact"] == ids["mlx"]


@settings(max_examples=examples(40))
@given(
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 4),
    group=st.sampled_from([1, 2, 4]),
    positions=st.integers(1, 300),
    rows=st.sampled_from([1, 1, 2, 5, 16, 17, 40]),
    head_dim=st.sampled_from([8, 16, 24, 64, 128]),
    spare=st.integers(0, 40),
    strided_q=st.booleans(),
)
def test_attention_equals_mlx_sdpa_for_a_decode_step_and_a_causal_prefill(
    seed, batch, kv_heads, group, positions, rows, head_dim, spare, strided_q
):
    """Over the first `positions` of a larger cache (a view, as the model passes it), query heads in
    groups sharing a KV head; q's rows the last of the positions (one: a decode step; more: a prefill
    chunk, causal, in blocks of 16 rows); q as rope leaves it, or a transposed view."""
    mk, rng = ours(), np.random.default_rng(seed)
    rows = min(rows, positions)
    size = rng.uniform(0.1, 10)
    cache = lambda: mx.array(
        rng.standard_normal((batch, kv_heads, positions + spare, head_dim)).astype(np.float32) * size
    )
    k, v = cache()[:, :, :positions], cache()[:, :, :positions]
    heads = kv_heads * group
    shape = (batch, rows, heads, head_dim) if strided_q else (batch, heads, rows, head_dim)
    q = mx.array(rng.standard_normal(shape).astype(np.float32))
    q = q.transpose(0, 2, 1, 3) if strided_q else q
    scale = head_dim**-0.5
    got = np.array(mk.attend(q, k, v, scale=scale))
    ref = np.array(mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if rows > 1 else None))
    qn, kn, vn = (np.abs(np.array(a, np.float64)) for a in (q, k, v))
    kn = kn.repeat(group, axis=1)  # each query head's KV head
    d = 2 * (head_dim + 2) * EPS * scale * np.einsum("bhqd,bhsd->bhqs", qn, kn).max()
    bound = (np.expm1(2 * d) + 2 * (positions + 4) * EPS) * vn.max()
    assert got.shape == ref.shape and np.abs(got - ref).max() <= bound, (np.abs(got - ref).max(), bound)


def float64_attention(q, k, v, scale):
    """softmax(q k^T scale) v in float64, causal and aligned to the end of the keys; KV heads shared (GQA)."""
    q, k, v = (np.array(a.astype(mx.float32), np.float64) for a in (q, k, v))
    group, T, S = q.shape[1] // k.shape[1], q.shape[2], k.shape[2]
    k, v = k.repeat(group, axis=1), v.repeat(group, axis=1)
    s = np.einsum("bhtd,bhsd->bhts", q, k) * scale
    s[..., np.arange(S)[None, :] > (S - T + np.arange(T))[:, None]] = -np.inf
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return np.einsum("bhts,bhsd->bhtd", p / p.sum(axis=-1, keepdims=True), v)


@settings(max_examples=examples(40))
@given(
    seed=st.integers(0, 2**16),
    kv_dtype=st.sampled_from(["float16", "bfloat16"]),
    kv_heads=st.integers(1, 4),
    group=st.sampled_from([1, 4]),
    positions=st.integers(1, 600),
    rows=st.sampled_from([1, 1, 3, 16, 33]),
    head_dim=st.sampled_from([8, 20, 64, 128]),
    spare=st.integers(0, 40),
)
def test_attention_over_a_half_size_cache_is_float32_attention_over_its_values(
    seed, kv_dtype, kv_heads, group, positions, rows, head_dim, spare
):
    """A float16 or bfloat16 cache is read as stored and widened in registers (exactly: every half value
    is a float32), so the output has the same bits as the kernel on the widened float32 copy, and is within
    the float32 bound of the module's docstring of float64 attention over the stored values. What the
    cache's rounding costs the whole model is test_mixtral's (against transformers)."""
    mk, rng = ours(), np.random.default_rng(seed)
    rows, dtype = min(rows, positions), getattr(mx, kv_dtype)
    size = rng.uniform(0.1, 10)
    cache = lambda: mx.array(rng.standard_normal((1, kv_heads, positions + spare, head_dim)) * size).astype(dtype)
    k, v = cache()[:, :, :positions], cache()[:, :, :positions]  # views of a larger cache, as the model passes
    q = mx.array(rng.standard_normal((1, kv_heads * group, rows, head_dim)).astype(np.float32))
    scale = head_dim**-0.5
    got = np.array(mk.attend(q, k, v, scale=scale))
    assert k.dtype == dtype and got.dtype == np.float32
    assert np.array_equal(got, np.array(mk.attend(q, k.astype(mx.float32), v.astype(mx.float32), scale=scale)))
    qn, kn, vn = (np.abs(np.array(a.astype(mx.float32), np.float64)) for a in (q, k, v))
    d = 2 * (head_dim + 2) * EPS * scale * np.einsum("bhqd,bhsd->bhqs", qn, kn.repeat(group, axis=1)).max()
    bound = (np.expm1(2 * d) + 2 * (positions + 4) * EPS) * vn.max()
    err = np.abs(got - float64_attention(q, k, v, scale)).max()
    assert err <= bound, (err, bound)


@settings(max_examples=examples(40))
@given(
    seed=st.integers(0, 2**16),
    rows=st.lists(st.sampled_from([1, 1, 1, 2, 17, 33]), min_size=1, max_size=6),
    past=st.lists(st.integers(0, 300), min_size=6, max_size=6),
    kv_dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 4]),
    head_dim=st.sampled_from([8, 20, 128]),
    spare=st.integers(0, 40),
)
def test_attention_over_segments_gives_each_the_bits_of_attention_alone(
    seed, rows, past, kv_dtype, kv_heads, group, head_dim, spare
):
    """batch.py's row: sequences' rows one after another in q (as the projections leave it, a transposed
    view), each over the first positions of its own cache (a decode step's one row, or a prefill chunk's
    causal rows on top of its past), in one op: each segment's output equals attend() on it alone."""
    mk, rng = ours(), np.random.default_rng(seed)
    dtype, scale = getattr(mx, kv_dtype), head_dim**-0.5
    lengths = [p + r for p, r in zip(past, rows)]
    cache = lambda n: mx.array(rng.standard_normal((1, kv_heads, n + spare, head_dim))).astype(dtype)
    keys, values = [cache(n) for n in lengths], [cache(n) for n in lengths]
    q = mx.array(rng.standard_normal((1, sum(rows), kv_heads * group, head_dim)).astype(np.float32))
    q = q.transpose(0, 2, 1, 3)
    ends = np.cumsum(rows).tolist()
    starts = [0, *ends[:-1]]
    got = mk.attend_segments(q, keys, values, lengths, starts, ends, scale=scale)
    for k, v, n, a, b in zip(keys, values, lengths, starts, ends):
        alone = mk.attend(q[:, :, a:b], k[:, :, :n], v[:, :, :n], scale=scale)
        assert np.array_equal(np.array(got[:, :, a:b]), np.array(alone)), (a, b, n)


@settings(max_examples=examples(30))
@given(
    seed=st.integers(0, 2**16),
    rows=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    offsets=st.lists(st.integers(0, 32768), min_size=5, max_size=5),
    head_dim=st.sampled_from([2, 64, 128]),
)
def test_rope_at_positions_gives_each_row_the_bits_of_rope_at_its_offset(seed, rows, offsets, head_dim):
    mk, rng = ours(), np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((1, sum(rows), 4, head_dim)).astype(np.float32)).transpose(0, 2, 1, 3)
    positions = [o + t for o, r in zip(offsets, rows) for t in range(r)]
    got = np.array(mk.rope_at(x, positions, base=1e6))
    a = 0
    for o, r in zip(offsets, rows):
        assert np.array_equal(got[:, :, a : a + r], np.array(mk.rope(x[:, :, a : a + r], offset=o, base=1e6)))
        a += r


def test_segments_that_do_not_cover_q_in_order_are_refused_with_a_message():
    mk = ours()
    q, k = mx.zeros((1, 4, 3, 16)), mx.zeros((1, 2, 8, 16))
    with pytest.raises(ValueError, match="must cover q's rows"):
        mk.attend_segments(q, [k, k], [k, k], [2, 2], [0, 1], [1, 2], scale=0.25)
    with pytest.raises(ValueError, match="the last of its cache's first"):
        mk.attend_segments(q, [k], [k], [2], [0], [3], scale=0.25)


@settings(max_examples=examples(30))
@given(
    seed=st.integers(0, 2**16),
    runs=st.lists(st.tuples(st.integers(1, 9), st.integers(0, 40)), min_size=1, max_size=5),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    fresh=st.booleans(),
    transposed=st.booleans(),
)
def test_write_rows_gives_each_cache_what_a_slice_update_gives_it(seed, runs, dtype, fresh, transposed):
    # runs: (rows, offset) of each cache; a fresh cache is MLX's broadcast zeros, else an evaluated array.
    mk, rng, dt = ours(), np.random.default_rng(seed), getattr(mx, dtype)
    T = sum(n for n, _ in runs)
    rows = mx.array(rng.standard_normal((1, T, 2, 8)).astype(np.float32)).astype(dt).transpose(0, 2, 1, 3)
    rows = rows if transposed else mx.contiguous(rows)  # a view, as a step's values are
    caches = [
        mx.zeros((1, 2, 64, 8), dt) if fresh else mx.array(rng.standard_normal((1, 2, 64, 8))).astype(dt) for _ in runs
    ]
    mx.eval(caches)
    expected, a = [], 0
    for c, (n, o) in zip(caches, runs):
        e = mx.array(c)
        e[:, :, o : o + n] = rows[:, :, a : a + n]
        expected.append(e)
        a += n
    starts = np.cumsum([0] + [n for n, _ in runs])[:-1].tolist()
    got = mk.write_rows(rows, caches, [o for _, o in runs], starts, [s + n for s, (n, _) in zip(starts, runs)])
    for g, e in zip(got, expected):
        assert g.dtype == dt and np.array_equal(np.array(g.astype(mx.float32)), np.array(e.astype(mx.float32)))


def test_write_rows_writes_in_place_only_where_nothing_else_holds_the_cache():
    mk = ours()
    rows = mx.ones((1, 2, 1, 8), mx.float16)
    held = mx.zeros((1, 2, 16, 8), mx.float16) + 0  # an evaluated buffer
    mx.eval(held)
    before = np.array(held)
    got = mk.write_rows(rows, [held], [3], [0], [1])[0]
    mx.eval(got)
    assert np.array_equal(np.array(held), before) and np.array(got)[0, :, 3].min() == 1


def test_write_rows_refuses_a_run_that_does_not_fit_with_a_message():
    mk, rows, cache = ours(), mx.zeros((1, 2, 3, 8)), mx.zeros((1, 2, 4, 8))
    with pytest.raises(ValueError, match="fit its cache"):
        mk.write_rows(rows, [cache], [2], [0], [3])
    with pytest.raises(ValueError, match="the rows' H, D and dtype"):
        mk.write_rows(rows, [cache.astype(mx.float16)], [0], [0], [1])


def test_mlx_attention_takes_a_cache_in_another_dtype_than_the_compute(kernels):
    """MIXTRAL_KERNELS=mlx (and a GPU) with --kv-dtype other than the compute dtype: MLX's kernel takes
    one dtype, so ops.sdpa widens the cache for it; the result is our kernel's within float32 rounding."""
    rng = np.random.default_rng(0)
    q = mx.array(rng.standard_normal((1, 8, 5, 64)).astype(np.float32))
    k, v = (mx.array(rng.standard_normal((1, 2, 40, 64))).astype(mx.float16) for _ in range(2))
    kernels("exact")
    ours_ = np.array(ops.sdpa(q, k, v, 0.125, mask="causal"))
    kernels("mlx")
    theirs = np.array(ops.sdpa(q, k, v, 0.125, mask="causal"))
    assert theirs.dtype == np.float32 and np.abs(theirs - ours_).max() < 1e-5


def test_attention_runs_ours_for_decode_and_prefill_and_mlx_for_another_mask(kernels):
    mk = ours()
    q1, q5, k = mx.zeros((1, 4, 1, 16)), mx.zeros((1, 4, 5, 16)), mx.ones((1, 2, 5, 16))
    kernels("exact")
    assert "MixtralAttend" in primitive_names(ops.sdpa(q1, k, k, 0.25))
    assert "MixtralAttend" in primitive_names(ops.sdpa(q5, k, k, 0.25, mask="causal"))
    assert "MixtralAttend" not in primitive_names(ops.sdpa(q5, k, k, 0.25, mask=mx.zeros((5, 5))))
    kernels("mlx")
    assert "MixtralAttend" not in primitive_names(ops.sdpa(q1, k, k, 0.25))
    assert mk.attend  # (imported: the test fails without our kernels)


def primitive_names(a) -> str:
    """The graph that computes `a`, as MLX exports it (DOT text names each primitive)."""
    import io

    out = io.StringIO()
    mx.export_to_dot(out, a)
    return out.getvalue()


@settings(max_examples=examples(30))
@given(
    seed=st.integers(0, 2**16),
    shape=st.tuples(st.integers(1, 2), st.integers(1, 8), st.integers(1, 9)),
    head_dim=st.sampled_from([2, 16, 64, 128]),
    offset=st.integers(0, 32768),
    transposed=st.booleans(),
)
def test_rope_equals_mlx_fast_rope(seed, shape, head_dim, offset, transposed):
    mk, rng = ours(), np.random.default_rng(seed)
    B, H, T = shape
    x = rng.standard_normal((B, T, H, head_dim) if transposed else (B, H, T, head_dim)).astype(np.float32)
    x = mx.array(x).transpose(0, 2, 1, 3) if transposed else mx.array(x)  # as attention passes it: a view
    got = np.array(mk.rope(x, offset=offset, base=1e6))
    ref = np.array(mx.fast.rope(x, head_dim, traditional=False, base=1e6, scale=1.0, offset=offset))
    half, xn = head_dim // 2, np.abs(np.array(x, np.float64))
    pair = np.concatenate([xn[..., :half] + xn[..., half:]] * 2, axis=-1)  # |x1| + |x2| of each output's pair
    theta = (offset + np.arange(T))[:, None].astype(np.float64)  # the largest angle of each position (i = 0)
    bound = pair * (8 * EPS * theta + 8 * EPS)
    assert np.all(np.abs(got - ref) <= bound), np.abs(got - ref).max()


@settings(max_examples=examples(30))
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 6), dims=st.integers(1, 300), eps=st.sampled_from([1e-5, 1e-6]))
def test_rms_norm_equals_mlx_fast_rms_norm(seed, rows, dims, eps):
    mk, rng = ours(), np.random.default_rng(seed)
    x = mx.array((rng.standard_normal((rows, dims)) * rng.uniform(0.01, 100)).astype(np.float32))
    w = mx.array(rng.standard_normal(dims).astype(np.float32))
    got, ref = np.array(mk.rms_norm(x, w, eps=eps)), np.array(mx.fast.rms_norm(x, w, eps))
    xn = np.array(x, np.float64)
    rms = np.sqrt((xn**2).mean(-1, keepdims=True) + eps)
    bound = 2 * (dims + 4) * EPS * np.abs(xn * np.array(w)) / rms
    assert np.all(np.abs(got - ref) <= bound), np.abs(got - ref).max()


@settings(max_examples=examples(30))
@given(
    seed=st.integers(0, 2**16),
    shape=st.tuples(st.integers(1, 70), st.integers(1, 2), st.integers(1, 300)),
    spread=st.sampled_from([1.0, 10.0, 100.0]),
    transposed=st.booleans(),
)
def test_swiglu_is_within_6_eps_of_silu_a_times_b_in_float64(seed, shape, spread, transposed):
    mk, rng = ours(), np.random.default_rng(seed)
    a, b = (rng.standard_normal(shape).astype(np.float32) * s for s in (spread, 1.0))
    am, bm = mx.array(a), mx.array(b)
    if transposed:  # views read in place: the last axis with a stride
        am, bm, a, b = am.swapaxes(0, 2), bm.swapaxes(0, 2), a.swapaxes(0, 2), b.swapaxes(0, 2)
    got = np.array(mk.swiglu(am, bm), np.float64)
    an, bn = a.astype(np.float64), b.astype(np.float64)
    ref = an * bn / (1 + np.exp(-an))
    assert np.all(np.abs(got - ref) <= 6 * EPS * np.abs(ref) + 1e-38 * np.abs(an * bn)), np.abs(got - ref).max()


def test_swiglu_covers_the_whole_float_range_and_big_inputs_on_threads():
    # 2M points from -120 to 120 (the clamp at both ends), in 1000 rows: the pool's threads share them.
    a = np.linspace(-120, 120, 2_000_000, dtype=np.float32).reshape(1000, -1)
    got = np.array(ours().swiglu(mx.array(a), mx.ones(a.shape)), np.float64)
    ref = a / (1 + np.exp(-a.astype(np.float64)))
    assert np.all(np.abs(got - ref) <= 6 * EPS * np.abs(ref) + 1e-38 * np.abs(a)), np.abs(got - ref).max()


SPECIAL = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, 2.0, -1.0, 3.4e38, -3.4e38, 1e-45]


@settings(max_examples=examples(60))
@given(
    seed=st.integers(0, 2**16),
    shape=st.tuples(st.integers(1, 5), st.integers(1, 300)),
    special=st.floats(0, 1),
    transposed=st.booleans(),
)
def test_argmax_gives_numpy_and_mlx_argmax_index_nan_first_then_the_first_largest(seed, shape, special, transposed):
    # Ties, NaNs, infinities and signed zeros at random places, and few distinct values (many ties).
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=shape).astype(np.float32)
    odd = rng.random(shape) < special
    x[odd] = rng.choice(SPECIAL, size=int(odd.sum()))
    xm = mx.array(x.T.copy()).T if transposed else mx.array(x)  # a view: the last axis with a stride
    got = np.array(ours().argmax(xm))
    assert got.dtype == np.uint32 and np.array_equal(got, np.argmax(x, axis=-1))
    assert np.array_equal(got, np.array(mx.argmax(xm, axis=-1)))


def test_argmax_of_many_long_rows_on_threads_equals_numpy():
    # A step of 64 sequences' logits over a 32000-token vocabulary: rows shared among the pool's threads.
    x = np.random.default_rng(0).standard_normal((64, 32000)).astype(np.float32)
    x[5, 31999], x[9, 7] = 100, np.nan
    assert np.array_equal(np.array(ours().argmax(mx.array(x))), np.argmax(x, axis=-1))


def test_a_kernels_build_that_lacks_an_op_the_model_calls_falls_back_to_mlx_in_one_line(monkeypatch):
    # A mixtral_kernels built from an older checkout: the model must not fail mid-prefill on it.
    monkeypatch.delattr(ours(), "swiglu")
    module, why = ops.our_kernels()
    assert module is None and "lacks swiglu" in why and "pip install --force-reinstall ./kernels" in why


# --------------------------------------------------------------------------- each instruction set

KERNELS = ROOT / "kernels"
ARM64 = ("aarch64-linux-gnu-g++", "qemu-aarch64")  # Debian's g++-aarch64-linux-gnu and qemu-user


def run_check_dot(tmp_path, compiler, *flags, runner=()):
    """Build kernels/check_dot.cpp (dot.h alone) with these flags, run it -> its one line."""
    exe = tmp_path / f"check_dot{len(list(tmp_path.iterdir()))}"
    cmd = [compiler, "-std=c++20", "-O3", "-Wno-psabi", *flags, "-I", KERNELS, KERNELS / "check_dot.cpp", "-o", exe]
    build = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    r = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip()


def cpu_flags() -> set:
    return set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the x86 paths")
def test_every_x86_path_this_cpu_runs_is_within_the_float32_bound_of_a_double_reference(tmp_path):
    """dot.h's AVX-512 (VNNI or not), AVX2 and scalar dot products, each built on its own."""
    builds = {"scalar": (), "avx2": ("-mavx2", "-mfma")}
    if {"avx512f", "avx512bw", "avx512vl"} <= cpu_flags():  # what dot.h's MK_AVX512 asks of the build
        builds["avx512"] = ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl")
    builds.setdefault(ours().simd(), ("-march=native",))  # the build pip made (CMakeLists.txt), e.g. avx512-vnni
    for simd, flags in builds.items():
        assert run_check_dot(tmp_path, "g++", *flags).endswith(f" {simd}")


def test_the_arm64_neon_path_is_within_the_float32_bound_of_a_double_reference(tmp_path):
    """dot.h's NEON dot products, built for arm64 and run under qemu (Linux on arm64 builds them)."""
    missing = [tool for tool in ARM64 if not shutil.which(tool)]
    assert not missing, (
        f"{missing} missing: bash tests/run.sh installs them (or apt-get install g++-aarch64-linux-gnu qemu-user)"
    )
    assert run_check_dot(tmp_path, ARM64[0], "-static", runner=(ARM64[1],)).endswith(" neon")


def test_the_whole_extension_compiles_for_arm64(tmp_path):
    """Every source, with MLX's own headers: no x86 instruction outside its guard."""
    include = Path(mx.__file__).parent / "include"
    for source in ("qmm.cpp", "attend.cpp", "small.cpp"):
        cmd = [ARM64[0], "-std=c++20", "-O1", "-Wno-psabi", "-c", "-I", include, "-I", KERNELS, KERNELS / source]
        r = subprocess.run([*map(str, cmd), "-o", str(tmp_path / "out.o")], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
