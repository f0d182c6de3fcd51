"""Continuous batching: many replies decoded together, each one the same bits as alone (server.py).

    batch = Batch(model, tokenizer.eos_id, size=16)
    batch.add(Sequence(cache, feed=prompt_ids, max_tokens=100, on_token=..., on_end=...))
    while batch.busy:
        batch.step()

A step is one forward pass over one row of tokens: the newest token of every decoding sequence and up
to `chunk` prompt tokens for each sequence still prefilling (oldest first; more when none decodes), one after
another (mixtral.Segments). The projections read each weight once for the whole row, the experts' rows
grouped by expert; attention takes each sequence over its own KV cache (lengths differ; no padding: one
op for all with our kernels, ops.sdpa_segments); the
output projection runs only on the rows whose next token is drawn. Our CPU kernels give a row the same
bits alone or among others and in any prefill chunk, and each sequence draws from a random key of its
own (the one mx.random.seed(seed) would give it alone), so a reply in a batch equals the same request
alone, token for token (tests/test_batch.py).

Steps are pipelined as mixtral.generate is: step n+1 is built on the lazy tokens of step n before we wait
for them, so building the graph overlaps the computation. A sequence that ends at step n has had its
last token fed by step n + 1, as generate feeds it; the conversation then trims what it does not keep.
"""

import random
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import mlx.core as mx
import numpy as np

import mixtral

# Prompt tokens per step while others decode, for each sequence still prefilling (oldest first), and
# PREFILL_STEP at most: one new prompt adds one chunk to their step (measured on 2 cores: 15 decoding, a
# 4000-token prompt raised their step from ~120 to ~220 ms); many new prompts at once are fed together
# (15 prompts of 46 tokens at one chunk a step took 22 steps to join, 40% of the 16 replies' time).
# With none decoding, chat.py's chunk.
PREFILL_CHUNK, PREFILL_STEP, PREFILL_ALONE = 32, 256, 512


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
    constraint: Optional[object] = None  # a grammar.Constraint the reply follows (structured output)
    # What happened:
    ids: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # "stop" (EOS or a stop string), "length", "interrupted"
    started: bool = False  # the prompt was fed whole: the reply began (else on_end means it was dropped)
    prompt_tokens: int = 0  # tokens prefilled
    start: float = field(default_factory=time.perf_counter)
    ttft: float = 0.0  # seconds from start to the first token
    elapsed: float = 0.0
    log: Optional[List[list]] = None  # per layer, the routing of each forward pass that fed this sequence
    ends_fed: bool = False  # max_tokens <= 0: it ends once its prompt (but the last token) is fed

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
        if self.constraint is not None and self.finish_reason is None:
            logits = mixtral.grammar_mask(logits, self.constraint)
        if self.temp == 0:
            return mixtral.sample(logits)
        self.key, key = mx.random.split(self.key)  # the split mx.random's global sequence makes
        return mixtral.sample(logits, self.temp, self.top_p, self.min_p, key=key)


class Batch:
    """Up to `size` sequences decoding together; more wait their turn in arrival order."""

    def __init__(self, model, eos_id: int, size: int = 16, chunk: int = PREFILL_CHUNK):
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
        """One forward pass: a token of every decoding sequence, and up to `chunk` prompt tokens for each
        sequence still prefilling (PREFILL_STEP in all), oldest first."""
        while self.waiting and len(self.running) < self.size:
            s = self.waiting.pop(0)
            if s.max_tokens <= 0:  # nothing to generate: the prompt's last token is never fed (mixtral.complete)
                s.feed, s.ends_fed = s.feed[:-1], True
            self.running.append(s)
        for s in [s for s in self.running if s.ends_fed and not s.feed]:
            s.started = True  # a reply of no tokens
            self._end(s, "length")
        self.model.log_routing(any(s.experts for s in self.running))
        segments = []
        budget = max(self.chunk, PREFILL_ALONE)
        if any(s.y is not None for s in self.running):
            budget = max(self.chunk, min(PREFILL_STEP, self.chunk * sum(1 for s in self.running if s.feed)))
        for s in self.running:
            if s.y is not None:  # decoding: the token drawn last step, lazy
                segments.append((s, s.y))
            elif budget > 0 and s.feed:
                n = min(budget, len(s.feed))
                segments.append((s, mx.array(s.feed[:n], mx.uint32)))
                s.feed, budget = s.feed[n:], budget - n
        caches, drawing, logits = self._forward(segments) if segments else ([], [], None)
        if any(s.constraint is not None for s in drawing):
            # A grammar's mask for this draw needs the previous token: draw once it is delivered, while
            # this step's forward pass runs.
            mx.async_eval(caches, logits)
            self._deliver()
            tokens = self._draw(drawing, logits)
            mx.async_eval(tokens)
        else:
            tokens = self._draw(drawing, logits)
            mx.async_eval(caches, tokens)
            self._deliver()  # the previous step's tokens: waits for them, while this step computes
        self.in_flight, self.tokens = drawing, tokens

    def _forward(self, segments):
        """One pass over the segments' tokens, one after another in a row -> (the caches of sequences still
        prefilling: what must be computed of them, the sequences whose next token is drawn, their logits)."""
        ends = np.cumsum([len(tokens) for _, tokens in segments]).tolist()
        bounds = list(zip([0, *ends[:-1]], ends))
        caches = [
            mixtral.Segments((s.cache[i], a, b) for (s, _), (a, b) in zip(segments, bounds))
            for i in range(len(self.model.layers))
        ]
        drawing = [i for i, (s, _) in enumerate(segments) if not s.feed and not s.ends_fed]
        rows = mx.array([bounds[i][1] - 1 for i in drawing]) if drawing else None
        inputs = mx.concatenate([tokens for _, tokens in segments])[None]
        logits, _ = self.model(inputs, caches, rows=rows)
        self._keep_routing(segments, bounds)
        # Of a sequence still prefilling only its cache is wanted: MLX skips the rest of the graph for it.
        others = [[c.state for c in s.cache] for i, (s, _) in enumerate(segments) if i not in drawing]
        return others, [segments[i][0] for i in drawing], logits if drawing else None

    def _draw(self, drawing: List[Sequence], logits):
        """Each drawing sequence's next token from its row of logits -> the tokens (lazy), or None."""
        if not drawing:
            return None
        tokens = mx.concatenate([s.draw(logits[:, j]) for j, s in enumerate(drawing)])
        group = self.model.group
        if group is not None:  # every rank takes rank 0's tokens (in the graph: no wait)
            tokens = mx.distributed.all_sum(mx.where(group.rank() == 0, tokens, 0), group=group)
        for j, s in enumerate(drawing):
            s.started = True
            s.y = tokens[j : j + 1]
        return tokens

    def _keep_routing(self, segments, bounds):
        """Hand each sequence that keeps its experts its rows of this pass's routing log."""
        for i, layer in enumerate(self.model.layers):
            log = layer.feed_forward.log
            if log is None:
                return
            for (s, _), (a, b) in zip(segments, bounds):
                if s.experts:
                    s.log = s.log or [[] for _ in self.model.layers]
                    s.log[i].append(log[0][0, a:b])
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
            if s.constraint is not None:
                s.constraint.accept(y)
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
