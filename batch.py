"""Continuous batching: many replies decoded together, each one the same bits as alone (server.py).

    batch = Batch(model, tokenizer.eos_id, size=8)
    batch.add(Sequence(cache, feed=prompt_ids, max_tokens=100, on_token=..., on_end=...))
    while batch.busy:
        batch.step()

A step runs at most one prefill chunk of one sequence (the oldest with prompt left: `chunk` tokens bound
how long a new prompt delays the others), then one forward pass over the newest token of every decoding
sequence: a row each, over its own KV cache (lengths differ; no padding), the experts' rows grouped by
expert so that each expert's weights are read once for all the rows it serves (mixtral.FeedForward).
Our CPU kernels give a row the same bits alone or among others and in any prefill chunk, attention runs
per sequence, and each sequence draws from a random key of its own (the one mx.random.seed(seed) would
give it alone), so a reply in a batch equals the same request alone, token for token (tests/test_batch.py).

Steps are pipelined as mixtral.generate is: step n+1 is built on the lazy tokens of step n before we wait
for them, so building the graph overlaps the computation. A sequence that ends at step n has had its
last token fed by step n + 1, as generate feeds it; the conversation then trims what it does not keep.
"""

import random
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import mlx.core as mx

import mixtral

PREFILL_CHUNK = 128  # tokens of a new prompt per step: ~0.2 s at 700 tokens/s, what it may delay the others


@dataclass(eq=False)
class Sequence:
    """One reply to generate: its conversation's cache, the prompt tokens that cache lacks, how to sample,
    and where its tokens go. on_token(id) gets each generated id but EOS and may answer a finish reason
    ("stop": a stop string) to end there; on_end(sequence) runs once, however it ended."""

    cache: list  # one mixtral.KVCache per layer: the conversation's own
    feed: List[int]  # the prompt's tokens the cache lacks (at least one: its last picks the first reply token)
    max_tokens: int
    on_token: Callable[[int], Optional[str]] = lambda y: None
    on_end: Callable[["Sequence"], None] = lambda s: None
    temp: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: Optional[int] = None
    experts: bool = False  # keep the router's choices for every token fed (choices)
    # What happened:
    ids: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # "stop" (EOS or a stop string), "length", "interrupted"
    started: bool = False  # the prompt was fed whole: the reply began (else on_end means it was dropped)
    prompt_tokens: int = 0  # tokens prefilled
    start: float = field(default_factory=time.perf_counter)
    ttft: float = 0.0  # seconds from start to the first token
    elapsed: float = 0.0
    log: Optional[List[list]] = None  # per layer, the routing of each forward pass that fed this sequence

    def __post_init__(self):
        self.prompt_tokens = len(self.feed)
        self.key = mx.random.key(random.randrange(2**63) if self.seed is None else self.seed)
        self.y = None  # the lazy token being computed for it

    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.cache)

    def choices(self) -> List[List[List[int]]]:
        """Per layer, per token fed (prompt, then reply), the experts the router chose (experts=True)."""
        return [mx.concatenate(parts).tolist() if parts else [] for parts in self.log or []]

    def draw(self, logits):
        """The next token from logits (1, vocab), as mixtral.generate draws it alone."""
        if self.temp == 0:
            return mixtral.sample(logits)
        self.key, key = mx.random.split(self.key)  # the split mx.random's global sequence makes
        return mixtral.sample(logits, self.temp, self.top_p, self.min_p, key=key)


class Batch:
    """Up to `size` sequences decoding together; more wait their turn in arrival order."""

    def __init__(self, model, eos_id: int, size: int = 8, chunk: int = PREFILL_CHUNK):
        self.model, self.eos_id, self.size, self.chunk = model, eos_id, size, chunk
        self.running: List[Sequence] = []
        self.waiting: List[Sequence] = []
        self.in_flight: List[Sequence] = []  # the sequences of the step whose tokens are being computed
        self.tokens = None  # and those tokens, lazy

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def room(self) -> int:
        """How many more sequences could start now."""
        return self.size - len(self.running) - len(self.waiting)

    def add(self, s: Sequence):
        self.waiting.append(s)

    def stop(self, s: Sequence):
        """End s now (its client left): its next step does not run."""
        if s in self.waiting:
            self.waiting.remove(s)
        elif s not in self.running:
            return
        self._end(s, "interrupted")

    def step(self):
        """One prefill chunk (if a prompt is waiting) and one token of every decoding sequence."""
        while self.waiting and len(self.running) < self.size:
            self.running.append(self.waiting.pop(0))
        for s in [s for s in self.running if s.max_tokens <= 0 and len(s.feed) <= 1]:
            s.started = True  # nothing to generate: a reply of no tokens, as mixtral.complete gives
            self._end(s, "length")
        self.model.log_routing(any(s.experts for s in self.running))
        outputs, fed = self._prefill_chunk()
        decoding = [s for s in self.running if len(s.feed) <= 1]
        if decoding:
            outputs.append(self._decode(decoding))
            fed.append(decoding)
        self._keep_routing(fed)
        mx.async_eval(outputs)
        self._deliver()  # the previous step's tokens: waits for them, while this step computes
        self.in_flight, self.tokens = decoding, outputs[-1] if decoding else None

    def _prefill_chunk(self):
        """Feed the oldest waiting prompt one chunk (all but its last token, which decoding feeds)."""
        s = next((s for s in self.running if len(s.feed) > 1), None)
        if s is None:
            return [], []
        n = min(self.chunk, len(s.feed) - 1)
        self.model(mx.array([s.feed[:n]], dtype=mx.uint32), s.cache)
        s.feed = s.feed[n:]
        return [[c.state for c in s.cache]], [[s]]  # only the cache: MLX skips the rest of the graph

    def _decode(self, seqs: List[Sequence]):
        """One forward pass over each sequence's newest token -> the next tokens (len(seqs),), lazy."""
        for s in seqs:
            s.started = True
        inputs = mx.concatenate([s.y if s.y is not None else mx.array(s.feed[-1:], mx.uint32) for s in seqs])
        caches = [[s.cache[i] for s in seqs] for i in range(len(self.model.layers))]
        logits, _ = self.model(inputs[:, None], caches)
        tokens = mx.concatenate([s.draw(logits[i : i + 1, -1]) for i, s in enumerate(seqs)])
        group = self.model.group
        if group is not None:  # every rank takes rank 0's tokens (in the graph: no wait)
            tokens = mx.distributed.all_sum(mx.where(group.rank() == 0, tokens, 0), group=group)
        for i, s in enumerate(seqs):
            s.y = tokens[i : i + 1]
        return tokens

    def _keep_routing(self, fed: List[List[Sequence]]):
        """Hand each sequence that keeps its experts its rows of the routing log of this step's passes."""
        logs = [layer.feed_forward.log for layer in self.model.layers]
        if logs[0] is None:
            return
        for i, log in enumerate(logs):
            for inds, seqs in zip(log, fed):  # one entry per forward pass, in order
                for row, s in enumerate(seqs):
                    if s.experts:
                        s.log = s.log or [[] for _ in logs]
                        s.log[i].append(inds[row].reshape(-1, inds.shape[-1]))
            log.clear()

    def _deliver(self):
        """The tokens of the step before this one, each to its sequence; ended sequences leave."""
        if not self.in_flight:
            return
        now = time.perf_counter()
        for s, y in zip(self.in_flight, self.tokens.tolist()):
            if s.finish_reason is not None:  # stopped meanwhile
                continue
            s.ttft = s.ttft or now - s.start
            if y == self.eos_id:
                self._end(s, "stop")
                continue
            s.ids.append(y)
            why = s.on_token(y)
            if why is None and len(s.ids) >= s.max_tokens:
                why = "length"
            if why is not None:
                self._end(s, why)

    def _end(self, s: Sequence, why: str):
        s.finish_reason = why
        s.elapsed = time.perf_counter() - s.start
        s.ttft = s.ttft or s.elapsed
        if s in self.running:
            self.running.remove(s)
        s.on_end(s)
