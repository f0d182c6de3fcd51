"""Tensor parallelism, stated once: a projection cut by its outputs or by its inputs.

The same cut serves twice:

- Across the CPU streams of one machine (`use_cpu_threads`). MLX's CPU backend runs one thread per
  stream, so every large projection is cut by outputs over one stream per core, and the slices are
  concatenated; attention is cut by heads. Each output is the same dot product as before: no result
  changes. A GPU needs none of this.
- Across machines (`shard`, under mlx.launch). Each rank keeps 1/N of every layer: attention by KV
  heads (wq, wk, wv cut by outputs, wo by inputs), the experts along hidden_dim (w1, w3 by outputs,
  w2 by inputs). A rank's wo and w2 then give a partial sum of the layer's output, and the model adds
  the N partial sums with one all_sum after the attention and one after the experts
  (`mixtral.all_sum`). The router, the norms, the embeddings and the output stay whole on every rank
  (the output is 0.3% of Mixtral's weights: cutting it by vocabulary would add a gather per token).

A projection is stored (..., out, in), packed along `in` when quantized ("standard"), or
(..., in, out), packed and grouped along `out` (mixtral.InputMajorLinear). A cut along a packed axis falls
between whole quantization groups, and its slice of the packed words, scales and biases is in
proportion.
"""

import copy
import queue
import socket
import time
import zlib

import mlx.core as mx
import mlx.nn as nn


def out_dims(layer: nn.Module) -> int:
    return layer.out_dims if getattr(layer, "input_major", False) else layer["weight"].shape[-2]


def in_dims(layer: nn.Module) -> int:
    if getattr(layer, "input_major", False):
        return layer["weight"].shape[-2]
    return layer["scales"].shape[-1] * layer.group_size if "scales" in layer else layer["weight"].shape[-1]


def cut(layer: nn.Module, a: int, b: int, along: str) -> nn.Module:
    """The part of `layer` that computes outputs a:b (along="out") or reads inputs a:b (along="in")."""
    input_major = getattr(layer, "input_major", False)
    rows = (along == "out") != input_major  # out is axis -2 in the standard layout, in for input-major
    n = out_dims(layer) if along == "out" else in_dims(layer)
    part = copy.copy(layer)
    for name in ("weight", "scales", "biases"):
        if name in layer:
            w = layer[name]
            w = w[..., a:b, :] if rows else w[..., a * w.shape[-1] // n : b * w.shape[-1] // n]
            part[name] = mx.contiguous(w)
    if input_major and along == "out":
        part.out_dims = b - a
    return part


def alignment(layer: nn.Module, along: str) -> int:
    """Cuts along a packed axis must fall between quantization groups."""
    input_major = getattr(layer, "input_major", False)
    packed = "scales" in layer and (along == "out") == input_major
    return layer.group_size if packed else 1


# --------------------------------------------------------------------------- CPU streams


class SplitOutputs(nn.Module):
    """A projection whose outputs are cut over CPU streams, the slices concatenated."""

    min_outputs = 256  # below this, the threads' hand-over costs more than it saves

    def __init__(self, layer: nn.Module, streams):
        super().__init__()
        n, align = out_dims(layer), alignment(layer, "out")
        cuts = sorted({n * i // len(streams) // align * align for i in range(len(streams))} | {n})
        self.parts = [cut(layer, a, b, "out") for a, b in zip(cuts, cuts[1:])]
        self.streams = streams[: len(self.parts)]

    def __call__(self, x, *args):
        outs = []
        for part, stream in zip(self.parts, self.streams):
            with mx.stream(stream):
                outs.append(part(x, *args))
        return mx.concatenate(outs, axis=-1)


class HeadParallel:
    """Attention with the KV heads (and the query heads that share them) cut over CPU streams."""

    def __init__(self, n_kv_heads: int, streams):
        n = min(len(streams), n_kv_heads)
        self.cuts = [n_kv_heads * i // n for i in range(n + 1)]
        self.streams = streams[:n]

    def __call__(self, q, k, v, scale, mask):
        group = q.shape[1] // k.shape[1]  # query heads per KV head
        outs = []
        for a, b, stream in zip(self.cuts, self.cuts[1:], self.streams):
            with mx.stream(stream):
                outs.append(
                    mx.fast.scaled_dot_product_attention(
                        q[:, a * group : b * group], k[:, a:b], v[:, a:b], scale=scale, mask=mask
                    )
                )
        return mx.concatenate(outs, axis=1)


def use_cpu_threads(model, n: int, threaded=lambda layer: False):
    """Cut attention by heads, and each projection with enough outputs, over n CPU streams; not the
    projections whose kernel runs threads of its own (`threaded`: mixtral's kernels/)."""
    streams = [mx.new_stream(mx.cpu) for _ in range(n)]

    def split(parent, name):
        if out_dims(parent[name]) >= SplitOutputs.min_outputs and not threaded(parent[name]):
            setattr(parent, name, SplitOutputs(parent[name], streams))

    for layer in model.layers:
        layer.attention.sdpa = HeadParallel(layer.attention.n_kv_heads, streams)
        for name in ("wq", "wk", "wv", "wo"):
            split(layer.attention, name)
        for name in ("w1", "w2", "w3"):
            split(layer.feed_forward.experts, name)
    split(model, "output")


# --------------------------------------------------------------------------- ranks


def world():
    """The group of ranks mlx.launch started; None when this process runs alone."""
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def ranks_here(group) -> int:
    """How many of the group's ranks run on this machine: they share its cores (local ranks, in tests)."""
    if group is None:
        return 1
    me = zlib.crc32(socket.gethostname().encode()) & 0x7FFFFFFF
    hosts = mx.distributed.all_gather(mx.array([me], dtype=mx.int32), group=group)
    return int((hosts == me).sum())


def ranks_that_fit(args, group_size: int = 1) -> list:
    """The numbers of ranks that cut every layer into whole heads and whole quantization groups."""
    g = group_size or 1
    return [
        n
        for n in range(1, args.n_kv_heads + 1)
        if args.n_kv_heads % n == 0
        and (args.n_kv_heads // n * args.head_dim) % g == 0
        and args.hidden_dim % (n * g) == 0
    ]


def shard(model, group):
    """Keep this rank's 1/N of every layer (lazily: nothing is read until evaluated). N must be one
    of ranks_that_fit(model.args, group_size)."""
    N, r = group.size(), group.rank()

    def split(parent, name, along):
        layer = parent[name]
        n = out_dims(layer) if along == "out" else in_dims(layer)
        setattr(parent, name, cut(layer, r * n // N, (r + 1) * n // N, along))

    for layer in model.layers:
        attention, experts = layer.attention, layer.feed_forward.experts
        for name in ("wq", "wk", "wv"):
            split(attention, name, "out")
        split(attention, "wo", "in")
        attention.n_heads //= N
        attention.n_kv_heads //= N
        for name in ("w1", "w3"):
            split(experts, name, "out")
        split(experts, "w2", "in")
        attention.group = layer.feed_forward.group = group
    model.group = group


def from_rank0(value: int, group) -> int:
    """Rank 0's integer on every rank (alone: the value itself)."""
    if group is None:
        return value
    return mx.distributed.all_sum(mx.array(value if group.rank() == 0 else 0), group=group).item()


def any_rank(flag: bool, group) -> bool:
    """Whether the flag holds on any rank (alone: the flag)."""
    if group is None:
        return flag
    return mx.distributed.all_sum(mx.array(int(flag)), group=group).item() > 0


def text_from_rank0(text, group):
    """Rank 0's text (or None) on every rank: the group's own all_sum carries the UTF-8 bytes."""
    if group is None:
        return text
    data = text.encode("utf-8", "surrogateescape") if group.rank() == 0 and text is not None else b""
    n = from_rank0(-1 if text is None else len(data), group)
    if n < 0:
        return None
    mine = mx.array(list(data), mx.uint8) if group.rank() == 0 else mx.zeros((n,), mx.uint8)
    received = mx.distributed.all_sum(mine, group=group) if n else mine
    return bytes(received.tolist()).decode("utf-8", "surrogateescape")


# Waiting inside a collective costs a core: the ring backend polls its sockets. So while rank 0 waits
# for work (a line, a request), it tells the others "nothing yet" (an empty text) every IDLE_POLL
# seconds, and they sleep in between (an idle rank, measured: 30-80% of a core before, 8-13% now).
IDLE_POLL = 0.1


def lead(get, group):
    """Rank 0: what get(timeout) returns, once it does (queue.Empty until then), the others told
    "nothing yet" meanwhile; follow() takes it on the others."""
    while True:
        try:
            return get(IDLE_POLL)
        except queue.Empty:
            text_from_rank0("", group)


def follow(group):
    """Another rank: rank 0's next text (or None), its "nothing yet"s slept through."""
    while (text := text_from_rank0(None, group)) == "":
        time.sleep(0.8 * IDLE_POLL)  # rank 0 comes back no sooner: the wait in the collective is short
    return text
