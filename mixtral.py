"""Mixtral 8x7B in MLX: the model, its tokenizer, loading, generation and a one-shot CLI.

python mixtral.py --model-path mlx_model --prompt "The capital of France is"
"""

import signal

if __name__ == "__main__":  # Ctrl-C during the imports below ends the program quietly; run_program() takes over after
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

import folder
import grammar
import machine
import ops
import parallel
import runtime
from folder import DEFAULT_MODEL_PATH
from machine import DTYPES, compute_dtype, default_cpu_threads, default_dtype, dtype_name, on_cpu  # noqa: F401 (mixtral.default_dtype)
from runtime import MixtralError, is_out_of_memory, quiet_unless_rank0, run_program, signals_held
from tokenizer import Tokenizer  # mixtral.Tokenizer, as ever

# --------------------------------------------------------------------------- config


@dataclass
class MoEArgs:
    num_experts: int
    num_experts_per_tok: int


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    moe: MoEArgs
    rope_theta: float = 1e6

    @classmethod
    def from_dict(cls, config: dict, source: str = "config") -> "ModelArgs":
        """Build from a params.json-style dict; unknown, missing or inconsistent keys are errors."""
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.name != "rope_theta"}
        if unknown := sorted(config.keys() - names):
            raise MixtralError(f"{source}: unknown key(s) {', '.join(unknown)}")
        if missing := sorted(required - config.keys()):
            raise MixtralError(f"{source}: missing key(s) {', '.join(missing)}")
        moe = config["moe"]
        if not isinstance(moe, dict) or set(moe) != {"num_experts", "num_experts_per_tok"}:
            raise MixtralError(f'{source}: \'moe\' must be {{"num_experts": N, "num_experts_per_tok": K}}, got {moe!r}')
        args = cls(**{**config, "moe": MoEArgs(**moe)})
        args.validate(source)
        return args

    def validate(self, source: str = "config"):
        ints = ["dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size"]
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MixtralError(f"{source}: {name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise MixtralError(
                f"{source}: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        e, k = self.moe.num_experts, self.moe.num_experts_per_tok
        if not (isinstance(e, int) and isinstance(k, int) and 1 <= k <= e):
            raise MixtralError(f"{source}: moe.num_experts_per_tok ({k}) must be between 1 and moe.num_experts ({e})")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise MixtralError(f"{source}: norm_eps and rope_theta must be positive")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["moe"] = vars(self.moe).copy()
        return d


# --------------------------------------------------------------------------- model


def all_sum(x, group):
    """Add up the ranks' partial outputs of a layer cut over machines (parallel.shard); alone, x."""
    return x if group is None else mx.distributed.all_sum(x, group=group)


class KVCache:
    """Keys and values of one layer, grown `grow_by` positions at a time so decoding does not copy the whole cache per token.
    dtype: what they are stored in (None: as they come). On the CPU float16 by default (ops.kv_dtype):
    half the bytes a decode step reads at depth; our attention kernel widens them in registers."""

    grow_by = 256

    def __init__(self, dtype=None):
        self.keys = self.values = None
        self.offset = 0
        self.dtype = dtype

    def update_and_fetch(self, keys, values):
        self.update(keys, values)
        return self.keys[:, :, : self.offset], self.values[:, :, : self.offset]

    def update(self, keys, values):
        T = keys.shape[2]  # keys (B, n_kv_heads, T, head_dim)
        self.reserve(keys, values, T)
        self.keys[:, :, self.offset : self.offset + T] = keys
        self.values[:, :, self.offset : self.offset + T] = values
        self.offset += T

    def reserve(self, keys, values, T: int):
        """Room for T more positions of keys and values shaped as these."""
        if self.keys is None or self.offset + T > self.keys.shape[2]:
            n = -(-(self.offset + T) // self.grow_by) * self.grow_by  # capacity: a multiple of grow_by
            self.keys, self.values = (self._grow(a, new, n) for a, new in ((self.keys, keys), (self.values, values)))

    def _grow(self, old, new, n):
        B, H, _, D = new.shape
        dtype = self.dtype or new.dtype
        if old is None:
            return mx.zeros((B, H, n, D), dtype)
        return mx.concatenate([old[:, :, : self.offset], mx.zeros((B, H, n - self.offset, D), dtype)], axis=2)

    def trim(self, n: int) -> int:
        """Forget the last n positions (chat's /undo and /regen); returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def state(self):
        return self.keys, self.values

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class Segments(list):
    """One layer's caches of several sequences whose tokens lie one after another in a row, as
    (KVCache, start, end) of each sequence's positions in that row (batch.py)."""

    def update(self, keys, values):
        """Each sequence's keys and values, rows start:end of these (1, n_kv_heads, T, head_dim), into its
        cache: one op for all of them with our kernels (a sequence's were four ops a layer; a step of 16
        decoding together is 2% faster)."""
        for c, a, b in self:
            c.reserve(keys, values, b - a)
        offsets, starts, ends = ([c.offset for c, _, _ in self], [a for _, a, _ in self], [b for *_, b in self])
        new_keys = ops.write_rows(keys, [c.keys for c, _, _ in self], offsets, starts, ends)
        new_values = ops.write_rows(values, [c.values for c, _, _ in self], offsets, starts, ends)
        for (c, a, b), k, v in zip(self, new_keys, new_values):
            c.keys, c.values, c.offset = k, v, c.offset + b - a


class RoPE(nn.Module):
    # Hugging Face checkpoints store wq/wk permuted for "rotate-half" RoPE (the two halves of each
    # head are the rotated pairs), so we apply the non-traditional form to them as they are.
    # Interleaved ("traditional") RoPE on these weights runs but produces fluent garbage.
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def __call__(self, x, offset: int = 0):
        return ops.rope(x, self.head_dim, self.theta, offset)

    def at(self, x, positions: List[int]):
        """Row t of x at positions[t]."""
        return ops.rope_at(x, self.head_dim, self.theta, positions)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (nn.RMSNorm's, with its weight's name)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight, self.eps = mx.ones((dims,)), eps

    def __call__(self, x):
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.scale = args.head_dim**-0.5
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.rope = RoPE(args.head_dim, args.rope_theta)
        self.sdpa = ops.sdpa  # parallel.use_cpu_threads cuts it over CPU streams
        self.group = None  # parallel.shard: the ranks whose partial outputs add up

    def __call__(self, x, cache):
        """cache: a KVCache, or Segments (several sequences one after another in x's one row)."""
        B, T, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.reshape(B, T, self.n_heads, -1).transpose(0, 2, 1, 3)  # (B, n_heads, T, head_dim)
        k = k.reshape(B, T, self.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (B, n_kv_heads, T, head_dim)
        v = v.reshape(B, T, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if isinstance(cache, KVCache):
            out = self.attend(q, k, v, cache)
        else:
            out = self.attend_segments(q, k, v, cache)
        return all_sum(self.wo(out.transpose(0, 2, 1, 3).reshape(B, T, -1)), self.group)

    def attend(self, q, k, v, cache: KVCache):
        q, k = self.rope(q, offset=cache.offset), self.rope(k, offset=cache.offset)
        k, v = cache.update_and_fetch(k, v)
        # The fused kernel shares each KV head among n_heads // n_kv_heads query heads (GQA), and
        # its "causal" mask is aligned to the end of the keys, so T new tokens on top of a cache of
        # S attend to all S old ones and causally among themselves.
        mask = "causal" if q.shape[2] > 1 else None
        return self.sdpa(q, k, v, scale=self.scale, mask=mask)

    def attend_segments(self, q, k, v, segments: "Segments"):
        """Each sequence at its own positions, over its own keys: no padding to change a result. With our
        kernels RoPE and attention are one op each for all (a sequence apiece was 12 ops a layer, and a
        step of 16 decoding together 7% longer), each row the bits it gets alone."""
        positions = [c.offset + t for c, a, b in segments for t in range(b - a)]
        q, k = self.rope.at(q, positions), self.rope.at(k, positions)
        segments.update(*(a.astype(segments[0][0].dtype or a.dtype) for a in (k, v)))  # converted once for all
        caches = [(c.keys, c.values, c.offset, a, b) for c, a, b in segments]
        return ops.sdpa_segments(q, caches, self.scale, self.sdpa)


class SwitchLinear(nn.Module):
    """num_experts stacked linear layers (experts, out, in); each token row uses the experts it is routed to."""

    def __init__(self, in_dims: int, out_dims: int, num_experts: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, out_dims, in_dims))

    def __call__(self, x, indices, sorted_indices=False):
        return mx.gather_mm(x, self["weight"].swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 8, mode: str = "affine"):
        return QuantizedLinear(*mx.quantize(self.weight, group_size, bits), group_size, bits)


class FeedForward(nn.Module):
    """The SwiGLU expert, w2(silu(w1 x) * w3 x), for all experts at once: weights are (experts, out, in)."""

    sort_threshold = 4  # routed (token, expert) pairs from which sorting by expert pays: two tokens

    def __init__(self, args: ModelArgs):
        super().__init__()
        E = args.moe.num_experts
        self.w1 = SwitchLinear(args.dim, args.hidden_dim, E)
        self.w2 = SwitchLinear(args.hidden_dim, args.dim, E)
        self.w3 = SwitchLinear(args.dim, args.hidden_dim, E)

    def __call__(self, x, indices):
        # x: (B, T, dim), indices: (B, T, k) -> (B, T, k, dim)
        B, T, k = indices.shape
        if indices.size >= self.sort_threshold:
            # Many tokens (prefill, or a batch of sequences): group the rows by expert so each expert's
            # weights are read once. Our kernels give each row the same bits either way.
            flat = indices.flatten()
            order = mx.argsort(flat)
            x, idx = x.reshape(B * T, 1, -1)[order // k], flat[order]  # (B*T*k, 1, dim)
            y = self._experts(x, idx, sorted_indices=True)
            return y[mx.argsort(order)].reshape(B, T, k, -1)
        x = mx.expand_dims(x, (-2, -3))  # (B, T, 1, 1, dim): one row, broadcast over the k experts
        return self._experts(x, indices).squeeze(-2)

    def _experts(self, x, idx, sorted_indices=False):
        h = ops.swiglu(self.w1(x, idx, sorted_indices), self.w3(x, idx, sorted_indices))
        return self.w2(h, idx, sorted_indices)


class MOEFeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.moe.num_experts_per_tok
        self.gate = nn.Linear(args.dim, args.moe.num_experts, bias=False)  # the router
        self.experts = FeedForward(args)
        self.group = None
        self.log = None  # a list while the chosen experts are kept (routing_choices)

    def __call__(self, x):
        gates = self.gate(x)  # (B, T, experts)
        k = self.top_k
        inds = mx.stop_gradient(mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k])  # (B, T, k)
        if self.log is not None:
            self.log.append(inds)  # lazy, computed with the rest: no wait here
        # Softmax over the chosen logits equals softmax over all experts renormalised to the top k
        # (Hugging Face's order); float32 because near-equal weights decide the mix.
        scores = mx.softmax(mx.take_along_axis(gates, inds, axis=-1).astype(mx.float32), axis=-1)
        y = self.experts(x, inds)  # (B, T, k, dim)
        return all_sum((y * scores[..., None].astype(y.dtype)).sum(axis=-2), self.group)


class MOETransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = MOEFeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def __call__(self, x, cache: KVCache):
        h = x + self.attention(self.attention_norm(x), cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Mixtral(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = [MOETransformerBlock(args) for _ in range(args.n_layers)]
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.group = self.plan = None  # parallel.shard: the ranks, and what each holds (parallel.Plan)
        self.kv_dtype = None  # what make_cache's caches store (None: the compute dtype); load_model sets it

    def make_cache(self) -> List[KVCache]:
        return [KVCache(self.kv_dtype) for _ in self.layers]

    def __call__(self, tokens, cache: Optional[List[KVCache]] = None, rows=None):
        """tokens: (B, T) ids after what `cache` holds -> (logits (B, T, vocab) float32, cache).
        A batch of sequences (batch.py): tokens (1, T) their tokens one after another, cache a list of
        Segments per layer, rows the positions whose logits are wanted -> logits (1, len(rows), vocab)."""
        cache = self.make_cache() if cache is None else cache
        h = self.tok_embeddings(tokens)
        for layer, c in zip(self.layers, cache):
            h = layer(h, c)
        h = h if rows is None else h[:, rows]
        return self.output(self.norm(h)).astype(mx.float32), cache

    @property
    def dtype(self):
        return self.norm.weight.dtype

    def log_routing(self, on: bool = True):
        """From now on keep the experts each MoE layer chooses for each token (routing_choices), or stop."""
        for layer in self.layers:
            layer.feed_forward.log = [] if on else None

    def routing_log(self) -> list:
        return [inds for layer in self.layers for inds in layer.feed_forward.log or []]


# --------------------------------------------------------------------------- quantized projections


class QuantizedLinear(nn.Module):
    """A quantized projection in the usual layout: (..., out, in), packed and grouped along `in`. One
    matrix, or experts stacked in front, each row of x using the expert `indices` names (gather).

    The one layout on every device: integer dot products want the reduction axis contiguous, so our CPU
    kernels are fastest on it, as Metal is, and mlx-community checkpoints run as they are."""

    def __init__(self, weight, scales, biases, group_size: int, bits: int):
        super().__init__()
        self.group_size, self.bits = group_size, bits
        self.weight, self.scales, self.biases = weight, scales, biases
        self.freeze()

    def __call__(self, x, indices=None, sorted_indices=False):
        w = self["weight"], self["scales"], self["biases"]
        return ops.qmm(x, *w, self.group_size, self.bits, indices, sorted_indices)


def quantize_model(model: "Mixtral", group_size: int, bits: int, keep=lambda path: True):
    """Quantize the projections for which keep(path) holds, as convert.py writes them."""
    nn.quantize(model, group_size, bits, class_predicate=lambda p, m: hasattr(m, "to_quantized") and keep(p))

    def ours(m):  # MLX's QuantizedLinear -> ours, where the kernel is chosen
        if not isinstance(m, nn.QuantizedLinear):
            return m
        return QuantizedLinear(m["weight"], m["scales"], m["biases"], group_size, bits)

    model.update_modules(tree_map(ours, model.leaf_modules(), is_leaf=nn.Module.is_module))


# --------------------------------------------------------------------------- loading


def read_config(path: Path):
    """-> (ModelArgs, quantization dict or None) from a converted folder's config.json."""
    config, quantization = folder.read_config(path)
    return ModelArgs.from_dict(config, source=str(path / "config.json")), quantization


def load_model(
    model_path: str,
    dtype=None,
    lazy: bool = False,
    cpu_threads: Optional[int] = None,
    group="world",
    shares: Optional[List[float]] = None,
    kv_dtype=None,
):
    """Load a converted folder (config.json, weights.*.npz, tokenizer.model) -> (Mixtral, Tokenizer).

    dtype: compute dtype (an mx.Dtype or its name); default float32 on the CPU, float16 on a GPU.
    lazy: leave the weights unread until first used (a damaged shard then fails there, not here).
    cpu_threads: CPU streams to split the projections over; default all cores on the CPU, 1 on a GPU.
    group: the ranks to cut every layer over (parallel.shard); default those mlx.launch started, if any.
    shares: each rank's part of every layer, e.g. [2, 1, 1]; default in proportion to the memory each
    rank can give the model (parallel.make_plan).
    kv_dtype: what the KV cache stores (a name or mx.Dtype); default float16 where our CPU attention reads it
    in place, else the compute dtype (ops.kv_dtype).
    """
    path, dtype = Path(model_path), compute_dtype(dtype)
    with signals_held() as deliver:  # Ctrl-C and SIGTERM land between tensors, never inside a read
        args, quantization = read_config(path)
        tokenizer = Tokenizer(path / "tokenizer.model")
        check_vocabulary(tokenizer, args, path / "tokenizer.model", "put the checkpoint's own tokenizer.model there")
        weights, shards = lazy_shards(path)
        model = skeleton(args, quantization, weights)
        if quantization and quantization.get("layout") == "input-major":
            q = quantization["group_size"], quantization["bits"]
            weights = folder.from_input_major(path, model, weights, *q, QuantizedLinear)
        attach(model, weights, dtype, path)
        del weights  # from here the model alone holds the tensors: cut ones can be freed once cut
        place(model, group, cpu_threads, quantization["group_size"] if quantization else 1, shares)
        model.kv_dtype = ops.kv_dtype(kv_dtype, dtype)
        if not lazy:
            read_weights(model, shards, deliver)
    return model, tokenizer


def check_vocabulary(tokenizer: "Tokenizer", args: ModelArgs, where, fix: str):
    if tokenizer.vocab_size != args.vocab_size:
        raise MixtralError(
            f"{where}: a vocabulary of {tokenizer.vocab_size} tokens, but the model has {args.vocab_size}; {fix}"
        )


def lazy_shards(path: Path):
    """-> ({name: lazy array}, shard files): nothing is read until evaluated."""
    shards = folder.shards(path)
    if not shards:
        raise MixtralError(f"{path}: no {folder.SHARDS} shards; convert a model first (python convert.py)")
    weights = {}
    for shard in shards:
        try:
            weights.update(mx.load(str(shard)))
        except Exception as e:
            raise MixtralError(f"{shard}: cannot read ({e})") from None
    return weights, shards


def skeleton(args: ModelArgs, quantization, weights) -> Mixtral:
    """The model's modules with placeholder weights, quantized exactly where the converter quantized (it
    keeps the router in full precision)."""
    model = Mixtral(args)
    if quantization:
        quantized = {k.removesuffix(".scales") for k in weights if k.endswith(".scales")}
        quantize_model(model, quantization["group_size"], quantization["bits"], keep=lambda p: p in quantized)
    return model


def attach(model: Mixtral, weights: dict, dtype, path: Path):
    """Put the folder's (lazy) tensors in place of the placeholders: every name, every shape, or an error."""
    expected = dict(tree_flatten(model.parameters()))
    folder.check_tensor_names(path, expected.keys(), weights.keys())
    for name, param in expected.items():
        if weights[name].shape != param.shape:
            raise MixtralError(
                f"{path}: tensor {name} has shape {tuple(weights[name].shape)}, config.json implies {tuple(param.shape)}"
            )

    # Floating tensors (norms, router, unquantized weights) compute in dtype; quantization scales and
    # biases stay as stored where our kernels read them so (ops.scales_dtype). Not the embedding's: MLX
    # dequantizes its rows in their scales' dtype, and in float16 rounded them to 11 significant bits.
    def cast(k, w):
        if not mx.issubdtype(w.dtype, mx.floating):
            return w
        quantization = k.endswith((".scales", ".biases")) and not k.startswith("tok_embeddings.")
        return w.astype(ops.scales_dtype(w.dtype, dtype) if quantization else dtype)

    model.load_weights([(k, cast(k, w)) for k, w in weights.items()], strict=True)


def place(model: Mixtral, group="world", cpu_threads: Optional[int] = None, group_size: int = 1, shares=None):
    """Cut the model over ranks (this rank keeps its share of the plan) and CPU streams; on a GPU, keep it
    resident."""
    group = parallel.world() if group == "world" else group
    if group is None and shares is not None and len(shares) != 1:
        raise MixtralError(
            f"--shares gives {len(shares)} shares, but this process runs alone; use mlx.launch -n {len(shares)}"
        )
    if group is not None:
        parallel.shard(model, group, parallel.plan_for(model, group, group_size, shares))
    if cpu_threads is None:  # every core; ranks on one machine share its cores
        cpu_threads = max(1, default_cpu_threads() // parallel.ranks_here(group))
    ops.use_threads(model, cpu_threads, QuantizedLinear)
    if not on_cpu():
        machine.keep_resident(model, "the model")


def read_weights(model: Mixtral, shards: List[Path], deliver=lambda: None, progress=None):
    """Read every weight, one tensor at a time: a rank reads each whole tensor once and keeps only its
    slice. deliver() raises a Ctrl-C held back during a read. progress: one line on stderr updated in
    place (GB read, GB/s, time left); default when stderr is a terminal."""
    tensors = [w for _, w in tree_flatten(model.parameters())]
    bar = runtime.loading_bar(sum(w.nbytes for w in tensors), sys.stderr.isatty() if progress is None else progress)
    try:
        for w in tensors:
            mx.eval(w)
            mx.clear_cache()  # return the whole tensor a slice came from, not keep it for reuse
            bar.update(w.nbytes / 1e9)
            deliver()
    except Exception as e:  # the zip reader's CRC check or a short read, raised only now (loading is lazy)
        if is_out_of_memory(e):
            raise
        bad = next((s for s in shards if folder.damaged(s)), shards[0] if len(shards) == 1 else "a shard")
        raise MixtralError(
            f"{bad}: damaged ({str(e).strip().splitlines()[-1]}); copy or convert it again "
            f"(python mixtral.py --verify --model-path {Path(shards[0]).parent} checks every file)"
        ) from None
    finally:
        bar.close()  # the line goes: what follows starts on a clean one


# --------------------------------------------------------------------------- generation


def sample(logits, temp: float = 0.0, top_p: float = 1.0, min_p: float = 0.0, key=None):
    """logits (B, vocab) -> token ids (B,). temp 0 is greedy; top_p keeps the smallest set of
    tokens whose probability reaches top_p; min_p drops tokens below min_p x the top probability.
    key: the draw's random key (default: MLX's global sequence, which mx.random.seed starts)."""
    if temp == 0:
        return ops.argmax(logits)
    logprobs = logits / temp
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    if min_p > 0:
        top = mx.max(logprobs, axis=-1, keepdims=True)
        logprobs = mx.where(logprobs < top + mx.log(mx.array(min_p)), -mx.inf, logprobs)
    if top_p < 1.0:
        order = mx.argsort(-logprobs, axis=-1)
        sorted_probs = mx.exp(mx.take_along_axis(logprobs, order, axis=-1))
        # Keep a token if the mass strictly before it is below top_p (so the top token always stays).
        keep_sorted = (mx.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p
        keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
        logprobs = mx.where(keep, logprobs, -mx.inf)
    return mx.random.categorical(logprobs, key=key)


def prefill(
    model: Mixtral, tokens: List[int], cache: List[KVCache], chunk: int = 512, should_stop=lambda: False
) -> List[int]:
    """Feed all but the last token through the cache, `chunk` at a time; return what is left (more
    than one token when should_stop() turned true between two chunks).

    Only the cache is evaluated: MLX then skips what nothing needs for those positions (the output
    projection and the last layer's experts), and memory stays bounded for long prompts.
    """
    while len(tokens) > 1 and not should_stop():
        n = min(chunk, len(tokens) - 1)
        model(mx.array([tokens[:n]], dtype=mx.uint32), cache)
        mx.eval([c.state for c in cache], model.routing_log())  # a kept log would otherwise keep the graph
        tokens = tokens[n:]
    return tokens


def generate(
    model: Mixtral,
    prompt_ids,
    cache: Optional[List[KVCache]] = None,
    temp: float = 0.0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: Optional[int] = None,
    prefill_chunk: int = 512,
    constraint=None,
) -> Iterator[int]:
    """Yield token ids after prompt_ids without end (the caller stops on EOS or a budget).

    prompt_ids are appended to `cache` (a new one when None): pass the cache of an earlier call to
    continue a conversation. Sampled ids are fed back through the cache one step at a time.
    constraint: a grammar.Constraint the ids must follow (structured output), or None.
    """
    if seed is not None:
        mx.random.seed(seed)
    cache = model.make_cache() if cache is None else cache

    def draw(logits):
        if constraint is not None:
            logits = grammar_mask(logits, constraint)
        y = sample(logits[:, -1, :], temp, top_p, min_p)[0]
        if model.group is not None:  # every rank takes rank 0's token (in the graph: no wait)
            y = mx.distributed.all_sum(mx.where(model.group.rank() == 0, y, 0), group=model.group)
        return y

    y = draw(model(mx.array([prefill(model, list(prompt_ids), cache, prefill_chunk)], dtype=mx.uint32), cache)[0])
    mx.async_eval(y)
    while True:
        # Build step n+1 on the lazy token of step n before waiting for it: the graph construction
        # overlaps the computation. Under a constraint the draw waits for token n's mask, computed
        # while step n+1's forward pass runs.
        logits, _ = model(y[None][None], cache)
        if constraint is None:
            next_y = draw(logits)
            mx.async_eval(next_y)
            yield y.item()
        else:
            mx.async_eval(logits)
            token = y.item()
            yield token
            constraint.accept(token)
            next_y = draw(logits)
            mx.async_eval(next_y)
        y = next_y


def grammar_mask(logits, constraint):
    """logits (..., vocab) with -inf at every token the constraint refuses next."""
    return mx.where(constraint.mask(), logits, -mx.inf)


def routing_choices(model: Mixtral) -> List[List[List[int]]]:
    """Per layer, per token fed since the last call (in order), the experts the router chose; the log
    starts again. Empty lists when the model keeps no log (Mixtral.log_routing)."""
    out = []
    for layer in model.layers:
        log = layer.feed_forward.log or []
        out.append(mx.concatenate([inds.reshape(-1, inds.shape[-1]) for inds in log]).tolist() if log else [])
        if layer.feed_forward.log is not None:
            layer.feed_forward.log = []
    return out


@dataclass
class Reply:
    """A reply: its text pieces as they come (an iterator), then its ids, why it ended and its speed.

    finish_reason: "stop" (EOS), "length" (the token budget), "interrupted" (should_stop() or the
    reader left); None until the reply ends, and for a reply that never started (chat.Chat: a stop
    during the prefill).
    """

    pieces: Iterator[str] = field(default_factory=lambda: iter(()))
    ids: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    cancelled: Optional[str] = None  # why there is no reply: what a stop during the prefill kept
    prompt_tokens: int = 0  # the tokens this reply prefilled
    ttft: float = 0.0  # seconds from the start to the first token
    elapsed: float = 0.0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self.pieces)

    def close(self):
        """Stop reading: the reply ends as interrupted, its state kept consistent."""
        getattr(self.pieces, "close", lambda: None)()

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / max(self.ttft, 1e-9)

    @property
    def gen_tps(self) -> float:
        return max(len(self.ids) - 1, 0) / max(self.elapsed - self.ttft, 1e-9)


def complete(
    model: Mixtral,
    tokenizer: "Tokenizer",
    prompt_ids,
    reply: Reply,
    max_tokens: int,
    cache=None,
    should_stop=lambda: False,
    start: Optional[float] = None,
    **sampling,
) -> Iterator[str]:
    """Generate after prompt_ids until EOS, max_tokens or should_stop(), and yield the text as it becomes
    final; fills `reply`. start: when the reply's clock started (default now), for a caller that
    prefilled before. Sampling arguments go to generate()."""
    start = time.perf_counter() if start is None else start

    def ids():
        if max_tokens <= 0:
            reply.finish_reason = "length"
            return
        for y in generate(model, prompt_ids, cache, **sampling):
            # generate() has fed y through the cache before yielding it.
            reply.ttft = reply.ttft or time.perf_counter() - start
            if y == tokenizer.eos_id:
                reply.finish_reason = "stop"
                return
            reply.ids.append(y)
            yield y
            if len(reply.ids) >= max_tokens:
                reply.finish_reason = "length"
                return
            if should_stop():
                reply.finish_reason = "interrupted"
                return

    try:
        yield from tokenizer.decode_stream(ids())
    finally:  # also when the reader stops early (GeneratorExit)
        reply.finish_reason = reply.finish_reason or "interrupted"
        reply.elapsed = time.perf_counter() - start
        reply.ttft = reply.ttft or reply.elapsed


# --------------------------------------------------------------------------- CLI


def build_parser():
    p = argparse.ArgumentParser(description="One-shot Mixtral generation with MLX.")
    p.add_argument("--model-path", default=DEFAULT_MODEL_PATH, help="converted model folder (default: %(default)s)")
    p.add_argument("--prompt", help="the prompt; '-' reads it from stdin")
    p.add_argument("--verify", action="store_true", help="check every file against manifest.json (sha256) first")
    p.add_argument(
        "--info",
        action="store_true",
        help="describe the converted folder (source, bits, sizes, error, memory) and exit",
    )
    p.add_argument(
        "--max-tokens", "-m", type=int, default=100, help="tokens to generate at most (default: %(default)s)"
    )
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 is off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    grammar.add_flags(p)
    add_dtype_flags(p)
    p.add_argument(
        "--shares",
        type=parallel.shares_flag,
        help="each rank's part of every layer under mlx.launch, e.g. 2,1,1 (default: in proportion to each rank's memory)",
    )
    return p


def add_dtype_flags(p):
    """--dtype and --kv-dtype, shared with chat.py, server.py and bench.py."""
    p.add_argument("--dtype", choices=list(DTYPES), help="compute dtype (default: float32 on CPU, float16 on GPU)")
    p.add_argument(
        "--kv-dtype",
        choices=list(DTYPES),
        help="what the KV cache stores (default: float16 on the CPU, where our attention reads it in place; "
        "else the compute dtype)",
    )


def main(argv=None):
    quiet_unless_rank0()
    run_program(run, build_parser().parse_args(argv))


def run(args):
    if args.info:
        model_args, quantization = read_config(Path(args.model_path))
        kv_dtype = ops.kv_dtype(args.kv_dtype, compute_dtype(args.dtype))
        kv = machine.kv_bytes_per_token(model_args, kv_dtype)
        text = folder.describe(args.model_path, model_args, quantization, kv, dtype_name(kv_dtype))
        sizes = lambda: parallel.part_sizes(skeleton(model_args, quantization, lazy_shards(Path(args.model_path))[0]))
        plan = parallel.rank_plan(model_args, quantization, kv, args.shares, sizes)
        return print(f"{text}\n{ops.use_kernels()}{plan}")
    if args.verify:
        folder.verify(args.model_path)
        print(f"{args.model_path}: every file is intact", file=sys.stderr)
        if args.prompt is None:
            return
    if args.prompt is None:
        raise MixtralError("--prompt is required (or --info, --verify)")
    if args.max_tokens < 0 or args.temp < 0 or not 0 < args.top_p <= 1:
        raise MixtralError("--max-tokens and --temp must be >= 0 and --top-p in (0, 1]")
    if args.prompt == "-" and parallel.world():
        raise MixtralError(
            "--prompt - cannot work under mlx.launch, which never passes the end of stdin on; "
            'pass the text itself: --prompt "$(cat FILE)"'
        )
    rank0 = mx.distributed.init().rank() == 0
    # Rank 0 reads the schema (a bad one fails here, before the load) and gives every rank its grammar below:
    # each rank then draws as rank 0 does, step for step (the draws' collectives must pair up).
    rules = grammar.from_flags(args.json, args.json_schema) if rank0 else None
    prompt = runtime.read_prompt(args.prompt) if rank0 else ""
    tic = time.perf_counter()
    model, tokenizer = load_model(args.model_path, args.dtype, shares=args.shares, kv_dtype=args.kv_dtype)
    prompt = parallel.text_from_rank0(prompt, model.group)
    rules = parallel.text_from_rank0(rules, model.group)
    print(f"[load] {time.perf_counter() - tic:.1f} s, dtype {model.dtype}; {ops.KERNELS['line']}", file=sys.stderr)

    prompt_ids = tokenizer.encode(prompt)
    machine.check_memory(model, len(prompt_ids) + args.max_tokens, "--max-tokens", args.model_path)
    reply = Reply(prompt_tokens=len(prompt_ids))
    constraint = grammar.Constraint(tokenizer, rules) if rules else None
    sampling = dict(temp=args.temp, top_p=args.top_p, seed=args.seed, constraint=constraint)
    reply.pieces = complete(model, tokenizer, prompt_ids, reply, args.max_tokens, **sampling)
    for text in reply:
        print(text, end="", flush=True)
    print()
    print(
        f"[prompt] {reply.prompt_tokens} tokens, {reply.prompt_tps:.2f} tokens/s\n"
        f"[generation] {len(reply.ids)} tokens, {reply.gen_tps:.2f} tokens/s\n"
        f"[memory] peak {mx.get_peak_memory() / machine.GB:.2f} GB",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
