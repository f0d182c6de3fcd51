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

A projection is stored (..., out, in), packed along `in` when quantized. A cut along `in` falls
between whole quantization groups, and its slice of the packed words, scales and biases is in
proportion.
"""

import argparse
import copy
import queue
import socket
import time
import zlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

import folder
import machine
from runtime import EveryRankError


def out_dims(layer: nn.Module) -> int:
    return layer["weight"].shape[-2]


def in_dims(layer: nn.Module) -> int:
    return layer["scales"].shape[-1] * layer.group_size if "scales" in layer else layer["weight"].shape[-1]


def cut(layer: nn.Module, a: int, b: int, along: str) -> nn.Module:
    """The part of `layer` that computes outputs a:b (along="out") or reads inputs a:b (along="in")."""
    n = out_dims(layer) if along == "out" else in_dims(layer)
    part = copy.copy(layer)
    for name in ("weight", "scales", "biases"):
        if name in layer:
            w = layer[name]
            w = w[..., a:b, :] if along == "out" else w[..., a * w.shape[-1] // n : b * w.shape[-1] // n]
            part[name] = mx.contiguous(w)
    return part


def alignment(layer: nn.Module, along: str) -> int:
    """Cuts along the packed axis (in) must fall between quantization groups."""
    return layer.group_size if "scales" in layer and along == "in" else 1


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


def use_cpu_threads(model, n: int, threaded=lambda layer: False, attention: bool = True):
    """Cut each projection with enough outputs over n CPU streams, and attention by heads (unless
    `attention` is False); not what runs threads of its own (`threaded`, and then attention: mixtral's
    kernels/)."""
    streams = [mx.new_stream(mx.cpu) for _ in range(n)]

    def split(parent, name):
        if out_dims(parent[name]) >= SplitOutputs.min_outputs and not threaded(parent[name]):
            setattr(parent, name, SplitOutputs(parent[name], streams))

    for layer in model.layers:
        if attention:
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


# --------------------------------------------------------------------------- the plan: who holds what


@dataclass(frozen=True)
class Plan:
    """What each rank holds of every layer: whole KV heads (with the query heads that share them) and
    whole groups of `unit` columns of the expert width, in rank order; and, for the report, the bytes
    each rank can give the model and the bytes of the model's parts."""

    heads: Tuple[int, ...]  # KV heads per rank
    groups: Tuple[int, ...]  # expert-width groups per rank
    unit: int  # columns per group: the quantization group (1 unquantized)
    budgets: Tuple[int, ...]  # bytes each rank can give the model
    sizes: Tuple[int, int, int]  # bytes of the whole model: kept whole on every rank, attention, experts

    @staticmethod
    def span(counts, r: int) -> Tuple[int, int]:
        a = sum(counts[:r])
        return a, a + counts[r]

    def weight_bytes(self, r: int) -> int:
        whole, attention, experts = self.sizes
        return whole + attention * self.heads[r] // sum(self.heads) + experts * self.groups[r] // sum(self.groups)

    def describe(self) -> str:
        return f"KV heads {':'.join(map(str, self.heads))}, expert groups {':'.join(map(str, self.groups))}"


def apportion(total: int, weights: List[float], minimum: int = 1) -> List[int]:
    """`total` whole units in proportion to weights, each at least `minimum`; a remainder goes where
    the weight is largest against what it got (ties: the larger weight, then the lower rank)."""
    s = sum(weights)
    exact = [total * w / s for w in weights]
    counts = [max(minimum, int(x)) for x in exact]
    while sum(counts) < total:
        i = max(range(len(counts)), key=lambda i: (exact[i] - counts[i], weights[i], -i))
        counts[i] += 1
    while sum(counts) > total:  # minimums pushed it over: take from the most over-served
        i = max((i for i in range(len(counts)) if counts[i] > minimum), key=lambda i: (counts[i] - exact[i], -i))
        counts[i] -= 1
    return counts


def make_plan(args, unit: int, sizes, budgets: List[int], shares: Optional[List[float]] = None) -> Plan:
    """Cut every layer over len(budgets) ranks: each rank's part of the attention and the experts in
    proportion to `shares`, by default to the memory it can give them (its budget less what every rank
    holds whole and the activations). Heads are coarse (8 in Mixtral), so the expert groups, which are
    fine (224), even out each rank's total. Pure: the same on every rank. MixtralError if none fits."""
    n, heads_total = len(budgets), args.n_kv_heads
    if not 1 <= n <= heads_total:
        raise EveryRankError(
            f"{n} ranks cannot share this model: each rank needs at least one of its {heads_total} KV heads; "
            f"launch 1 to {heads_total} ranks"
        )
    q_per_kv = args.n_heads // args.n_kv_heads
    if (args.head_dim * q_per_kv) % unit or args.head_dim % unit or args.hidden_dim % unit:
        raise EveryRankError(
            f"this model cannot be cut over ranks: its heads ({args.head_dim} wide) or expert width "
            f"({args.hidden_dim}) are not whole quantization groups of {unit}"
        )
    whole, attention, experts = sizes
    if shares is not None and (len(shares) != n or not all(x > 0 for x in shares)):
        raise EveryRankError(f"--shares needs {n} positive numbers, one per rank (e.g. {','.join(['1'] * n)})")
    weights = list(shares) if shares else [max(b - whole - machine.ACTIVATIONS, 1) for b in budgets]
    heads = apportion(heads_total, weights)
    total = sum(weights)
    target = [max(w / total * (attention + experts) - h * attention / heads_total, 0) for w, h in zip(weights, heads)]
    groups = apportion(args.hidden_dim // unit, [t + 1e-9 for t in target])
    # Rounding heads and groups can leave a rank with more memory holding a little less than one with
    # less: move single groups until more memory always means at least as much held.
    held = lambda r: heads[r] * attention / heads_total + groups[r] * experts / sum(groups)
    for _ in range(sum(groups)):
        pair = next(
            (
                (i, j)
                for i in range(n)
                for j in range(n)
                if weights[i] > weights[j] and held(i) < held(j) and groups[j] > 1
            ),
            None,
        )
        if pair is None:
            break
        groups[pair[0]] += 1
        groups[pair[1]] -= 1
    plan = Plan(tuple(heads), tuple(groups), unit, tuple(budgets), tuple(sizes))
    for r in range(n):
        if plan.weight_bytes(r) + machine.ACTIVATIONS > budgets[r]:
            raise EveryRankError(
                f"rank {r} cannot hold its share ({plan.heads[r]} of {heads_total} KV heads, {plan.groups[r]} of "
                f"{sum(groups)} expert groups: {folder.format_bytes(plan.weight_bytes(r))} of weights, and "
                f"{folder.format_bytes(machine.ACTIVATIONS)} for activations) in the "
                f"{folder.format_bytes(budgets[r])} it can give the model; use more ranks, other --shares, or 4-bit "
                "weights (convert.py --q-bits 4)"
            )
    return plan


def shares_flag(text: str) -> List[float]:
    """--shares 2,1,1: each rank's part of every layer, in rank order (argparse's type)."""
    try:
        shares = [float(x) for x in text.split(",")]
        if not all(x > 0 for x in shares):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive numbers, one per rank, e.g. 2,1,1") from None
    return shares


def part_sizes(model) -> Tuple[int, int, int]:
    """Bytes of the (whole, lazy) model: kept whole on every rank, the attention, the experts."""
    sizes = [0, 0, 0]
    for name, w in tree_flatten(model.parameters()):
        sizes[2 if ".experts." in name else 1 if ".attention." in name else 0] += w.nbytes
    return tuple(sizes)


def plan_for(model, group, unit: int, shares: Optional[List[float]] = None) -> Plan:
    """The plan for a whole (lazy) model over the group's ranks."""
    return plan_for_sizes(model.args, part_sizes(model), group, unit, shares)


def plan_for_sizes(args, sizes, group, unit: int, shares: Optional[List[float]] = None) -> Plan:
    """Every rank tells the others the memory it can give the model; all compute the same plan."""
    mine = mx.array([machine.model_budget() // 2**20], dtype=mx.int32)  # MiB: an int32 holds 2 PiB
    budgets = [int(b) * 2**20 for b in mx.distributed.all_gather(mine, group=group).tolist()]
    return make_plan(args, unit, sizes, budgets, shares)


def plan_table(plan: Plan, args, kv_bytes_per_token: int) -> str:
    """The plan as --info and bench.py print it: per rank, the memory it can give, its share, its
    weights and its KV cache per 1000 tokens (at kv_bytes_per_token for the whole model)."""
    size = folder.format_bytes
    rows = [("rank", "memory", "KV heads", "expert groups", "weights", "KV per 1k tokens")]
    for r in range(len(plan.heads)):
        kv = kv_bytes_per_token * plan.heads[r] // args.n_kv_heads * 1000
        heads, groups = f"{plan.heads[r]}/{args.n_kv_heads}", f"{plan.groups[r]}/{sum(plan.groups)}"
        rows.append((str(r), size(plan.budgets[r]), heads, groups, size(plan.weight_bytes(r)), size(kv)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def shard(model, group, plan: Plan):
    """Keep this rank's part of every layer, as the plan says (lazily: nothing is read until evaluated)."""
    r = group.rank()
    h0, h1 = plan.span(plan.heads, r)
    g0, g1 = (plan.unit * x for x in plan.span(plan.groups, r))
    for layer in model.layers:
        attention, experts = layer.attention, layer.feed_forward.experts
        q_per_kv, hd = attention.n_heads // attention.n_kv_heads, attention.head_dim
        attention.wq = cut(attention.wq, h0 * q_per_kv * hd, h1 * q_per_kv * hd, "out")
        attention.wk = cut(attention.wk, h0 * hd, h1 * hd, "out")
        attention.wv = cut(attention.wv, h0 * hd, h1 * hd, "out")
        attention.wo = cut(attention.wo, h0 * q_per_kv * hd, h1 * q_per_kv * hd, "in")
        attention.n_heads, attention.n_kv_heads = (h1 - h0) * q_per_kv, h1 - h0
        experts.w1, experts.w3 = cut(experts.w1, g0, g1, "out"), cut(experts.w3, g0, g1, "out")
        experts.w2 = cut(experts.w2, g0, g1, "in")
        attention.group = layer.feed_forward.group = group
    model.group, model.plan = group, plan


def from_rank0(value: int, group) -> int:
    """Rank 0's integer on every rank (alone: the value itself)."""
    if group is None:
        return value
    return mx.distributed.all_sum(mx.array(value if group.rank() == 0 else 0), group=group).item()


def least(value: int, group) -> int:
    """The smallest of the ranks' integers (alone: the value itself): what every rank can afford."""
    if group is None:
        return value
    return int(mx.distributed.all_gather(mx.array([value], dtype=mx.int32), group=group).min().item())


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


def rank_plan(args, quantization, kv: int, shares, sizes) -> str:
    """--info under mlx.launch (or with --shares): what each rank would hold. Nothing is read: the plan
    comes from the shapes (sizes(): part_sizes of the model's skeleton), and the ranks' memory."""
    group = world()
    if group is None and shares is None:
        return ""
    unit = quantization["group_size"] if quantization else 1
    if group is None:  # the plan for len(--shares) ranks, each with this machine's memory
        plan = make_plan(args, unit, sizes(), [machine.model_budget()] * len(shares), shares)
    else:
        plan = plan_for_sizes(args, sizes(), group, unit, shares)
    return f"\nranks         {len(plan.heads)}: {plan.describe()}\n{plan_table(plan, args, kv)}"
