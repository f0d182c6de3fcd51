"""Chat with Menny, a cynical teenager, on Mixtral-8x7B-Instruct in MLX.

    python chat.py --model-path mlx_model

The conversation lives in one KV cache for the whole session: each turn feeds only its new tokens.
"""

import signal

if __name__ == "__main__":  # Ctrl-C during the imports below ends the program quietly; run_program() takes over after
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import contextlib
import hashlib
import os
import queue
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import mlx.core as mx

import folder
import grammar
import machine
import mixtral
import ops
import parallel
import runtime
import sessions
from machine import MAX_POSITIONS
from runtime import CtrlC, MixtralError

DEFAULT_SYSTEM_PROMPT = "Your name is Menny, a cynical teenager AI assistant."
DEFAULT_TEMP, DEFAULT_TOP_P, DEFAULT_MIN_P = 0.7, 0.9, 0.0
DEFAULT_MAX_TOKENS = 1024
HUB_MODEL = "mistralai/Mixtral-8x7B-Instruct-v0.1"

HELP = """commands:
  /help           this text
  /reset          forget the conversation (keeps the persona)
  /system TEXT    new persona (resets the conversation); /system alone removes it
  /undo           drop the last exchange
  /regen          regenerate the last reply
  /save FILE      write the transcript (messages, settings, seed) as JSON, and its KV cache beside it
  /experts [FILE] which experts the router chose for your last message and the reply (FILE: as JSON)
  /quit           leave (also Ctrl-D, or Ctrl-C at an empty prompt)
  \"\"\"             start and end a multi-line message
Ctrl-C during a reply stops it and keeps what was said."""


# --------------------------------------------------------------------------- prompt format
# Mixtral-8x7B-Instruct-v0.1 as mistral-common's v1 tokenizer encodes it: BOS once, each user turn
# one encode of "[INST] {text} [/INST]" (the system prompt joined to the first user message with a
# blank line), each reply its own encode followed by EOS. [INST] is plain text, not a special token.


def user_block(tokenizer, content: str, system: str = "") -> List[int]:
    text = f"{system}\n\n{content}" if system else content
    return tokenizer.encode(f"[INST] {text} [/INST]", bos=False)


def reply_block(tokenizer, message: dict) -> List[int]:
    # A generated reply keeps its ids: re-encoding its text need not give the same tokens.
    ids = message.get("tokens")
    return (list(ids) if ids is not None else tokenizer.encode(message["content"], bos=False)) + [tokenizer.eos_id]


def split_system(messages: List[dict]):
    """-> (system prompt or "", the user/assistant turns); checks the order of roles."""
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    for i, m in enumerate(messages):
        if m.get("role") != ("user", "assistant")[i % 2] or not isinstance(m.get("content"), str):
            want = ("user", "assistant")[i % 2]
            raise MixtralError(
                f"message {i}: expected role {want!r} (user and assistant alternate after an optional system message), got {m.get('role')!r}"
            )
    return system, messages


def message_blocks(tokenizer, messages: List[dict]) -> List[List[int]]:
    """The token ids of each user/assistant message (BOS not included)."""
    system, turns = split_system(messages)
    return [
        user_block(tokenizer, m["content"], system if i == 0 else "")
        if m["role"] == "user"
        else reply_block(tokenizer, m)
        for i, m in enumerate(turns)
    ]


def encode_messages(tokenizer, messages: List[dict]) -> List[int]:
    """[{"role": "system"|"user"|"assistant", "content": str}, ...] -> token ids for Mixtral-Instruct.

    An assistant message may carry "tokens", the ids it was generated as; they are used as they are."""
    return [tokenizer.bos_id] + [i for block in message_blocks(tokenizer, messages) for i in block]


# --------------------------------------------------------------------------- the conversation


@dataclass
class Turn:
    """One message of the conversation and where its tokens start in Chat.tokens."""

    role: str  # "user" or "assistant"
    content: str
    start: int
    ids: Optional[List[int]] = None  # a reply's generated ids: re-encoding its text need not give them

    def message(self) -> dict:
        return {"role": self.role, "content": self.content, **({"tokens": self.ids} if self.ids is not None else {})}


class Chat:
    """The conversation: its turns, their tokens, and the KV cache that holds a prefix of those tokens:
    all of them after a reply, fewer after a rebuild (--resume, an overflow) or a stop, until the next
    prefill feeds the rest in chunks that a stop request can come between.

    It serves a terminal and an HTTP handler alike: ask() and regen() return a mixtral.Reply to iterate
    for text, which then says why it ended and how fast; notices (old turns dropped to fit) go to
    on_notice."""

    def __init__(
        self,
        model,
        tokenizer,
        system=DEFAULT_SYSTEM_PROMPT,
        max_context=MAX_POSITIONS,
        max_tokens=DEFAULT_MAX_TOKENS,
        temp=DEFAULT_TEMP,
        top_p=DEFAULT_TOP_P,
        min_p=DEFAULT_MIN_P,
        seed=None,
        on_notice=lambda text: None,
        model_id: str = "",
        experts: bool = False,
        rules: Optional[str] = None,
    ):
        # model_id: what the weights are (folder.identity), for a saved cache to name what it belongs to
        self.model, self.tokenizer, self.on_notice, self.model_id = model, tokenizer, on_notice, model_id
        self.system, self.max_context, self.max_tokens = system, max_context, max_tokens
        self.temp, self.top_p, self.min_p = temp, top_p, min_p
        self.experts = None  # the last turn's chosen experts, when `experts` keeps them (/experts)
        self.known_ids = lambda text: None  # a reply's generated ids by its text, beyond this conversation
        self.rules = rules  # a grammar every reply follows (--json, --json-schema), or None
        model.log_routing(experts)
        self.seed = random.randrange(2**31) if seed is None else seed
        mx.random.seed(self.seed)
        self.reset()

    def reset(self, system: Optional[str] = None):
        if system is not None:
            self.system = system
        self.turns: List[Turn] = []
        self.tokens: List[int] = []  # the conversation's tokens; the cache holds the first `fed`
        self.cache = self.model.make_cache()

    @property
    def messages(self) -> List[dict]:
        return [t.message() for t in self.turns]

    def conversation(self, messages: Optional[List[dict]] = None) -> List[dict]:
        """The persona (if any) followed by `messages` (default: the whole conversation)."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + (
            self.messages if messages is None else messages
        )

    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.cache)

    @property
    def fed(self) -> int:
        return min(c.offset for c in self.cache)

    def _trim(self, n: int):
        """Keep the first n tokens, and in the cache at most those (a step broken off half-way may
        have fed some layers and not others: all keep what all have)."""
        keep = min(n, self.fed)
        for c in self.cache:
            c.trim(c.offset - keep)
        del self.tokens[n:]

    def _feed(self, block: List[int], should_stop) -> bool:
        """Feed what the cache lacks, then all but the last token of block (its logits pick the
        reply's first token). False if should_stop() came first: the cache keeps what it was fed of
        `tokens`, and nothing of block."""
        left = mixtral.prefill(self.model, self.tokens[self.fed :] + block, self.cache, should_stop=should_stop)
        if len(left) > 1 or should_stop():
            self._trim(len(self.tokens))
            return False
        return True

    def _rebuild(self, messages: List[dict]):
        """A conversation of these user/assistant messages (after dropping old turns, on --resume, or
        as a client sent it): the cache keeps what it shares with the tokens it held, the next prefill
        feeds the rest."""
        old = self.tokens[: self.fed]
        blocks = message_blocks(self.tokenizer, self.conversation(messages)) if messages else []
        self.tokens, self.turns = [self.tokenizer.bos_id] if blocks else [], []
        for m, block in zip(messages, blocks):
            self.turns.append(Turn(m["role"], m["content"], len(self.tokens), m.get("tokens")))
            self.tokens += block
        self._keep_shared(old)

    def _keep_shared(self, old: List[int]):
        """Trim the cache, which holds `old`, to the prefix that `old` shares with self.tokens."""
        keep = common_prefix(old, self.tokens)
        for c in self.cache:
            c.trim(c.offset - keep)

    def _new_block(self, content: str, first: bool) -> List[int]:
        """Tokens to feed for a new user message; the first one brings BOS and the persona."""
        block = user_block(self.tokenizer, content, self.system if first else "")
        return [self.tokenizer.bos_id] + block if first else block

    @property
    def _reserve(self) -> int:
        """Context kept free for a reply."""
        return min(self.max_tokens + 1, self.max_context // 2)

    def _fit(self, content: str) -> List[int]:
        """Drop the oldest whole exchanges until the new message and a reply fit in max_context."""
        messages = self.messages
        for drop in range(0, len(messages) + 1, 2):
            kept = messages[drop:]
            if drop == 0:
                used = len(self.tokens)
            else:  # what the cache would hold, the persona re-attached to the first kept message
                used = len(encode_messages(self.tokenizer, self.conversation(kept))) if kept else 0
            block = self._new_block(content, first=not kept)
            if used + len(block) + self._reserve <= self.max_context:
                break
        else:
            raise MixtralError(
                f"message too long: {len(block)} tokens leave no room for a reply in --max-context {self.max_context}"
            )
        if drop:
            self._rebuild(kept)
            self.on_notice(
                f"(dropped the {drop // 2} oldest exchange{'s' * (drop > 2)} to fit --max-context {self.max_context})"
            )
        return block

    def ask(self, content: str, should_stop=lambda: False) -> mixtral.Reply:
        """Menny's reply to a new user message, streamed as it is iterated; only the tokens the cache
        lacks are prefilled. A stop before the first token (during a long prefill) drops the message,
        as if unsent."""
        reply = mixtral.Reply()
        reply.pieces = self._ask(content, should_stop, reply)
        return reply

    def _ask(self, content, should_stop, reply):
        start = time.perf_counter()
        yield from self._say(self._fit(content), content, should_stop, reply, start)

    def _say(self, block: List[int], content: Optional[str], should_stop, reply, start=None):
        """Feed block (a user message's, when content is given) after the conversation, and reply."""
        start = start or time.perf_counter()
        mixtral.routing_choices(self.model)  # a kept log starts with this turn
        unfed = len(self.tokens) - self.fed
        reply.prompt_tokens = unfed + len(block)
        if not self._feed(block, should_stop):
            reply.cancelled = "message dropped"
            return
        if content is not None:
            self.turns.append(Turn("user", content, len(self.tokens)))
        yield from self._reply(block, should_stop, reply, start, unfed, user=content is not None)

    # For a client that sends the whole conversation with every request (server.py): the conversation
    # becomes what it sent, keeping the cache of the prefix they share, and only the rest is prefilled.

    def respond(self, messages: List[dict], should_stop=lambda: False):
        """A reply to `messages` (an optional system message, then user and assistant turns ending with
        the user's). -> (Reply, the prompt's length in tokens), the reply streamed as it is iterated."""
        block, last = self.prepare(messages)
        reply = mixtral.Reply()
        reply.pieces = self._say(block, last, should_stop, reply)
        return reply, len(self.tokens) + len(block)

    def continue_ids(self, ids: List[int], should_stop=lambda: False):
        """A continuation of raw token ids (a completion, no chat format). -> (Reply, len(ids))."""
        block, _ = self.prepare(ids)
        reply = mixtral.Reply()
        reply.pieces = self._say(block, None, should_stop, reply)
        return reply, len(ids)

    def prepare(self, request):
        """The conversation becomes a request: messages (ending with the user's) or raw token ids. The
        cache keeps the prefix it shares with it. -> (the block to feed after self.tokens, the user's
        text or None). A batch (server.py) feeds it and generates, then calls settle()."""
        if request and isinstance(request[0], dict):
            history, last = self._as_sent(request)
            self.system = split_system(request)[0]
            self._rebuild(history)
            return self._new_block(last, first=not self.turns), last
        old, self.turns, self.tokens = self.tokens[: self.fed], [], list(request[:-1])
        self._keep_shared(old)
        return list(request[-1:]), None

    def budget(self, block: List[int]) -> int:
        """Tokens a reply to block may have: max_tokens, within what the context leaves."""
        return min(self.max_tokens, self.max_context - len(self.tokens) - len(block) - 1)

    def settle(self, block: List[int], content: Optional[str], ids: Optional[List[int]]):
        """After a batch fed block and generated ids (None: stopped before the reply began, block dropped)."""
        if ids is None:
            return self._trim(len(self.tokens))
        if content is not None:
            self.turns.append(Turn("user", content, len(self.tokens)))
        self.tokens += block
        self._close(Turn("assistant", "", len(self.tokens), ids))

    def shared_prefix(self, messages_or_ids) -> int:
        """How many tokens of that request this conversation's cache already holds."""
        if messages_or_ids and isinstance(messages_or_ids[0], dict):
            history, _ = self._as_sent(messages_or_ids)
            system = split_system(messages_or_ids)[0]
            prefix = [{"role": "system", "content": system}] if system else []
            ids = encode_messages(self.tokenizer, prefix + history) if history else []
        else:
            ids = messages_or_ids
        return common_prefix(self.tokens[: self.fed], ids)

    def _as_sent(self, messages: List[dict]):
        """-> (the history with each reply that this conversation generated carrying its ids, the
        last user message's text). A client sends a reply's text: its re-encoding need not give the
        ids the reply was generated as, and chat.py keeps those. known_ids(text), when set, names the ids
        of any reply it knows first (a server's whole store: a reply then reads the same in every
        conversation that holds it, warm or cold)."""
        system, turns = split_system(messages)
        same, history = system == self.system, []
        for i, m in enumerate(turns[:-1]):
            ours = self.turns[i] if same and i < len(self.turns) else None
            same = ours is not None and (ours.role, ours.content) == (m["role"], m["content"])
            ids = self.known_ids(m["content"]) if m["role"] == "assistant" else None
            ids = ids if ids is not None else ours.ids if same else None
            history.append({**m, "tokens": ids} if ids is not None else m)
        return history, turns[-1]["content"]

    def regen(self, should_stop=lambda: False) -> mixtral.Reply:
        """A new reply to the last user message, streamed as it is iterated."""
        if not self.turns:
            raise MixtralError("nothing to regenerate yet")
        reply = mixtral.Reply()
        reply.pieces = self._regen(should_stop, reply)
        return reply

    def _regen(self, should_stop, reply):
        start = time.perf_counter()
        last, tokens = self.turns.pop(), list(self.tokens)
        # Step back one token before the reply: its logits, which pick the first word, were not kept.
        self._trim(last.start - 1)
        mixtral.routing_choices(self.model)
        unfed = len(self.tokens) - self.fed
        reply.prompt_tokens = unfed + 1
        if not self._feed([tokens[last.start - 1]], should_stop):
            self.turns.append(last)
            self.tokens = tokens  # the cache holds a prefix of them
            reply.cancelled = "the last reply kept"
            return
        yield from self._reply([tokens[last.start - 1]], should_stop, reply, start, unfed, user=False)

    def undo(self):
        if not self.turns:
            raise MixtralError("nothing to undo")
        start = self.turns[-2].start
        del self.turns[-2:]
        self._trim(start if self.turns else 0)  # an empty conversation starts again with BOS

    def _reply(self, prompt: List[int], should_stop, reply: mixtral.Reply, start: float, unfed=0, user=False):
        budget = self.budget(prompt)
        self.tokens += prompt
        turn = Turn("assistant", "", len(self.tokens), reply.ids)
        broken = True  # by an error: what the step left may never compute (a collective's peer is gone)
        try:
            # _feed has prefilled all but the last token of the block.
            yield from mixtral.complete(
                self.model,
                self.tokenizer,
                prompt[-1:],
                reply,
                budget,
                self.cache,
                should_stop,
                start,
                temp=self.temp,
                top_p=self.top_p,
                min_p=self.min_p,
                constraint=grammar.Constraint(self.tokenizer, self.rules) if self.rules else None,
            )
            broken = False
        except GeneratorExit:  # the reader stopped: an ordinary end
            broken = False
            raise
        finally:
            self._close(turn)
            if self.model.layers[0].feed_forward.log is not None:
                if broken:  # nothing to show, and waiting on its arrays could be waiting forever
                    self.model.log_routing()
                else:
                    self.keep_experts(mixtral.routing_choices(self.model), unfed, prompt if user else None, reply.ids)
            if not broken:  # between turns, hand back the step buffers MLX keeps (the soak test: flat RSS)
                # Not after an error: clear_cache waits for the CPU streams, holding the GIL, and a step
                # whose collective lost its peer never ends, so the process could not even end on SIGTERM.
                mx.clear_cache()

    def _close(self, turn: Turn):
        """However a reply ended, it is closed with EOS: fed already when sampled, else with the next
        prefill. The cache keeps no more than the conversation (a step broken off half-way)."""
        self.tokens += turn.ids + [self.tokenizer.eos_id]
        self._trim(len(self.tokens))
        turn.content = self.tokenizer.decode(turn.ids)
        self.turns.append(turn)

    def keep_experts(self, choices, unfed: int, message: Optional[List[int]], reply_ids: List[int]):
        """The experts chosen for the last user message's tokens and for the reply's (/experts). The log
        holds every token fed this turn: `unfed` old ones first, then the message (one token for a
        /regen, whose message keeps its record), then the reply's."""
        cut = lambda a, n: [layer[a : a + n] for layer in choices]
        if message is not None or self.experts is None:
            self.experts = {"prompt_ids": list(message or []), "prompt": cut(unfed, len(message or []))}
        start = unfed + (len(message) if message is not None else 1)
        self.experts |= {"reply_ids": list(reply_ids), "reply": cut(start, len(reply_ids))}

    def save(self, path: str, settings: dict):
        """Write the transcript (sessions.write_transcript)."""
        sessions.write_transcript(path, self.conversation(), settings, self.seed)

    def load(self, path: str, text: Optional[str] = None):
        """Continue a transcript saved by /save (`text`: its contents, when already read). Exchanges
        beyond --max-context are dropped, oldest first, as in a live chat."""
        text = sessions.read_text(path) if text is None else text
        messages = sessions.transcript_messages(path, text, self.tokenizer.vocab_size)
        try:
            system, turns = split_system(messages)
        except MixtralError as e:
            raise MixtralError(f"{path}: not a chat transcript ({e})") from None
        if turns and turns[-1]["role"] == "user":
            turns = turns[:-1]  # a question without its answer: the user can ask it again
        self.reset(system)
        dropped = 0
        while (
            turns and len(encode_messages(self.tokenizer, self.conversation(turns))) + self._reserve > self.max_context
        ):
            turns, dropped = turns[2:], dropped + 1
        if dropped:
            self.on_notice(
                f"(dropped the {dropped} oldest exchange{'s' * (dropped > 1)} of {path} to fit --max-context {self.max_context})"
            )
        self._rebuild(turns)


def common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# --------------------------------------------------------------------------- finding the model


def resolve_model(path: str, log, tokenizer=None) -> Path:
    """A converted folder as it is; a Hugging Face folder or Hub id converted once into a cache."""
    p = Path(path)
    if (p / "config.json").is_file() and folder.shards(p):
        return p
    is_hf_folder = (p / "config.json").is_file() and any(p.glob("*.safetensors"))
    is_repo_id = folder.is_hub_id(path)
    if not (is_hf_folder or is_repo_id):
        raise MixtralError(
            f"no converted model at {path}. These two commands get Menny running:\n"
            f"  python convert.py --hf-path {HUB_MODEL} --mlx-path {folder.DEFAULT_MODEL_PATH}\n"
            f"  python chat.py --model-path {folder.DEFAULT_MODEL_PATH}"
        )
    import convert

    # One conversion per source: the folder's resolved path (or the repo id) names its cache entry.
    key = str(p.resolve()) if is_hf_folder else path
    name = f"{(p.resolve().name if is_hf_folder else path.replace('/', '--'))}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    target = folder.cache_root() / name
    if not (target / "config.json").is_file():
        log(f"converting {path} to MLX in {target} (once) ...")
        convert.supervise(
            ["--hf-path", path, "--mlx-path", str(target)] + (["--tokenizer", tokenizer] if tokenizer else []),
            target,
            log=log,
        )
    return target


# --------------------------------------------------------------------------- the terminal


class Terminal:
    """Reads turns and prints replies: readline and colours when interactive, plain lines when piped."""

    def __init__(self, interactive: bool, rank0: bool = True):
        self.interactive, self.readline, self.rank0 = interactive, None, rank0
        self.lines, self.group = None, None  # under mlx.launch: rank 0's lines, read ahead; the ranks
        self.history_file = Path.home() / ".mixtral_chat_history"
        if interactive:
            with (
                contextlib.suppress(ImportError),
                runtime.signals_held(),
            ):  # a Ctrl-C inside a C import becomes ImportError
                import readline

                self.readline = readline
                with contextlib.suppress(OSError):
                    readline.read_history_file(self.history_file)

    def remark(self, text: str):
        """Remarks go to the terminal dimmed; when piped, to stderr so stdout holds only replies."""
        if self.interactive:
            print(f"\033[2m{text}\033[0m", flush=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def read_shared(self, group) -> Optional[str]:
        """The next message on every rank: rank 0 reads it, the others receive it. Under mlx.launch
        (where rank 0's stdin is the launcher's pipe, never a terminal) a thread reads rank 0's lines
        ahead, so that it can tell the others "nothing yet" while it waits and they sleep (parallel.lead)."""
        if group is not None and not self.rank0:
            return parallel.follow(group)
        if group is not None and self.lines is None:
            self.lines = queue.Queue()
            threading.Thread(target=self._read_lines, args=(sys.stdin.fileno(),), daemon=True).start()
        self.group = group
        return parallel.text_from_rank0(self.read(), group)

    def _read_lines(self, fd: int):
        # Off the file descriptor: a thread blocked inside sys.stdin holds its lock, and the
        # interpreter aborts at exit when it cannot take it ("Fatal Python error: _enter_buffered_busy").
        pending = b""
        try:
            while chunk := os.read(fd, 1 << 16):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self.lines.put(line.decode("utf-8", "surrogateescape"))  # as main() decodes sys.stdin
            if pending:
                self.lines.put(pending.decode("utf-8", "surrogateescape"))
            self.lines.put(None)
        except OSError as e:
            self.lines.put(e)

    def read(self) -> Optional[str]:
        """The next message (a \"\"\" block may span lines); None to leave (end of input, or Ctrl-C
        at an empty prompt). Ctrl-C on a typed line or inside a block drops it, as in a shell."""
        prompt = "\001\033[1m\002>>> \001\033[0m\002" if self.interactive else ""
        while True:
            try:
                line = self._input(prompt)
                if line is not None and line.strip().startswith('"""'):
                    line = self._block(line.strip()[3:])
            except KeyboardInterrupt:
                if not self.interactive:
                    raise  # piped: Ctrl-C ends the program (status 130)
                print()
                if self.readline and self.readline.get_line_buffer():
                    continue
                return None
            if line is None or line.strip():
                return line

    def _block(self, line: str) -> Optional[str]:
        lines = []
        while not line.rstrip().endswith('"""'):
            lines.append(line)
            try:
                line = self._input("... " if self.interactive else "")
            except KeyboardInterrupt:
                if not self.interactive:
                    raise
                print()
                self.remark("(block dropped)")
                return ""  # back to the prompt
            if line is None:
                return None
        lines.append(line.rstrip()[:-3])
        return "\n".join(lines).strip("\n")

    def _input(self, prompt: str) -> Optional[str]:
        while True:
            if self.lines is not None:  # read ahead by _read_lines
                line = parallel.lead(lambda timeout: self.lines.get(timeout=timeout), self.group)
                if isinstance(line, OSError):
                    raise MixtralError(f"cannot read the input ({line.strerror})")
                if line is None:
                    return None
            else:
                try:
                    line = input(prompt)
                except EOFError:
                    return None
            try:
                line.encode("utf-8")
                return line
            except UnicodeEncodeError as e:  # stdin decodes with surrogateescape (see main)
                self.remark(
                    f"error: that line is not UTF-8 text (byte 0x{ord(line[e.start]) & 0xFF:02x}); skipped, type it again"
                )

    def close(self):
        if self.interactive and self.readline:
            with contextlib.suppress(OSError):
                self.readline.write_history_file(self.history_file)


def stream_reply(chat: Chat, term: Terminal, ctrl_c: CtrlC, reply_to, verbose: bool):
    """Print the reply that reply_to(should_stop) makes as it comes; Ctrl-C stops it."""
    group = chat.model.group
    with ctrl_c.stops() as pressed:
        # Under mlx.launch every rank must stop at the same token: rank 0's Ctrl-C decides.
        stopped = pressed if group is None else lambda: bool(parallel.from_rank0(int(pressed()), group))
        reply = reply_to(stopped)
        for text in reply:
            print(text, end="", flush=True)
    if reply.cancelled:
        term.remark(f"(stopped before the reply: {reply.cancelled})")
        return
    print(flush=True)
    if reply.finish_reason == "interrupted":
        term.remark("(stopped)")
    elif reply.finish_reason == "length":
        term.remark(f"(cut off at --max-tokens {chat.max_tokens})")
    if verbose:
        term.remark(
            f"[prompt {reply.prompt_tokens} tokens, {reply.prompt_tps:.1f} tokens/s, first token {reply.ttft:.2f} s | "
            f"reply {len(reply.ids)} tokens, {reply.gen_tps:.1f} tokens/s | context {len(chat.tokens)}/{chat.max_context}]"
        )


def command(chat: Chat, term: Terminal, ctrl_c: CtrlC, line: str, settings: dict, verbose: bool) -> bool:
    """Run a /command; False to quit."""
    name, _, arg = line.strip().partition(" ")
    if name in ("/quit", "/exit", "/bye"):
        return False
    if name == "/help":
        term.remark(HELP)
    elif name == "/reset":
        chat.reset()
        term.remark("(conversation forgotten)")
    elif name == "/system":
        chat.reset(arg)
        term.remark(f"(new persona: {arg})" if arg else "(no persona)")
    elif name == "/undo":
        chat.undo()
        term.remark("(last exchange dropped)")
    elif name == "/regen":
        stream_reply(chat, term, ctrl_c, chat.regen, verbose)
    elif name == "/save":
        if not arg:
            raise MixtralError("/save needs a file name")
        tic = time.perf_counter()
        if term.rank0:  # the transcript is rank 0's, on rank 0's machine; each rank saves its part of the cache
            chat.save(arg, settings)
        size = sessions.save_cache(chat, arg)
        cache = (
            f" and its {size / 1e6:.1f} MB cache ({sessions.cache_file(arg, chat.model.group).name})" if size else ""
        )
        term.remark(f"(saved {arg}{cache} in {time.perf_counter() - tic:.1f} s)")
    elif name == "/experts":
        if chat.experts is None:
            raise MixtralError("/experts: no reply yet to show the experts of")
        report = experts_report(chat.experts, chat.model.args.moe.num_experts)
        if arg and term.rank0:
            sessions.write_json(arg, report)
        term.remark(f"(wrote {arg})" if arg else experts_table(report))
    else:
        raise MixtralError(f"unknown command {name}; /help lists them")
    return True


def experts_report(experts: dict, n_experts: int) -> dict:
    """/experts FILE's JSON: per layer, how many tokens of the last message and of the reply were sent
    to each expert; the token ids; each token's chosen experts per layer."""
    count = lambda choices: [sum(e in pair for pair in choices) for e in range(n_experts)]
    return {
        "layers": [{"prompt": count(p), "reply": count(r)} for p, r in zip(experts["prompt"], experts["reply"])],
        "ids": {"prompt": experts["prompt_ids"], "reply": experts["reply_ids"]},
        "choices": {"prompt": experts["prompt"], "reply": experts["reply"]},
    }


def experts_table(report: dict) -> str:
    """A heat map: per layer, the share of tokens each expert got (an empty cell: none, a full one: all)."""
    shades = " ▁▂▃▄▅▆▇█"
    n = {part: max(len(report["ids"][part]), 1) for part in ("prompt", "reply")}
    heat = lambda counts, part: "".join(shades[round(8 * c / n[part])] for c in counts)
    top = lambda counts, part: f"{counts.index(max(counts)) + 1} {100 * max(counts) / n[part]:3.0f}%"
    width = len(report["layers"][0]["prompt"])
    numbers = "".join(str(e + 1)[-1] for e in range(width))
    lines = [
        f"experts chosen per layer: your message ({len(report['ids']['prompt'])} tokens) | the reply "
        f"({len(report['ids']['reply'])} tokens); a full cell: every token, top: the busiest expert",
        f"layer  {numbers}   {numbers}   top (message, reply)",
    ]
    for i, layer in enumerate(report["layers"]):
        p, r = layer["prompt"], layer["reply"]
        lines.append(f"{i:5d}  {heat(p, 'prompt')} | {heat(r, 'reply')}   {top(p, 'prompt')}, {top(r, 'reply')}")
    return "\n".join(lines)


def add_model_flags(p):
    """The flags that find and load the model, shared with server.py."""
    p.add_argument(
        "--model-path",
        default=folder.DEFAULT_MODEL_PATH,
        help="converted folder, or a Hugging Face folder / Hub id to convert once (default: %(default)s)",
    )
    mixtral.add_dtype_flags(p)
    p.add_argument("--tokenizer", help="tokenizer.model for a first-run conversion of a folder that lacks one")
    p.add_argument(
        "--shares",
        type=parallel.shares_flag,
        help="each rank's part of every layer under mlx.launch, e.g. 2,1,1 (default: in proportion to each rank's memory)",
    )


def build_parser():
    p = argparse.ArgumentParser(description="Chat with Menny, a cynical teenager, on Mixtral-8x7B-Instruct.")
    add_model_flags(p)
    p.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help="the persona; '' for none (default: Menny)")
    p.add_argument("--prompt", help="one message: print Menny's reply and exit")
    p.add_argument("--resume", help="start from a transcript saved with /save (and its cache, when it fits)")
    p.add_argument(
        "--session", help="a named conversation, saved after every turn and resumed by the next --session NAME"
    )
    p.add_argument("--sessions", action="store_true", help="list the saved sessions and exit")
    p.add_argument(
        "--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens per reply at most (default: %(default)s)"
    )
    p.add_argument(
        "--max-context", type=int, help="tokens of conversation kept (default: 32768, or what fits in memory)"
    )
    p.add_argument(
        "--temp", type=float, default=DEFAULT_TEMP, help="sampling temperature, 0 is greedy (default: %(default)s)"
    )
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="nucleus sampling mass (default: %(default)s)")
    p.add_argument(
        "--min-p",
        type=float,
        default=DEFAULT_MIN_P,
        help="drop tokens below this share of the top one (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, help="random seed (default: a new one, saved by /save)")
    grammar.add_flags(p)
    p.add_argument("--verbose", action="store_true", help="per-turn speed and context use")
    p.add_argument("--verify", action="store_true", help="check every model file against its manifest (sha256) first")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    runtime.quiet_unless_rank0()
    sys.stdin.reconfigure(encoding="utf-8", errors="surrogateescape")  # a bad byte is one line's error, not a crash
    runtime.run_program(run, args)


def run(args):
    """The program: the terminal, Ctrl-C's handler (rank 0 owns both), the model, then the loop."""
    if args.sessions:
        return print(sessions.list_sessions())
    rank0 = mx.distributed.init().rank() == 0
    ctrl_c = CtrlC()
    if rank0:
        ctrl_c.install()
    term = Terminal(interactive=rank0 and args.prompt is None and sys.stdin.isatty(), rank0=rank0)
    try:
        converse(args, term, ctrl_c)
    finally:
        term.close()


def converse(args, term: Terminal, ctrl_c: CtrlC):
    if args.max_tokens < 1 or args.temp < 0 or not 0 < args.top_p <= 1 or not 0 <= args.min_p < 1:
        raise MixtralError("need --max-tokens >= 1, --temp >= 0, 0 < --top-p <= 1, 0 <= --min-p < 1")
    if args.max_context is not None and args.max_context < 16:
        raise MixtralError("--max-context must be at least 16 tokens")
    if args.session is not None and args.resume:
        raise MixtralError("--session and --resume: pick one (a session resumes itself)")
    session = (
        sessions.Session(args.session) if args.session is not None else None
    )  # a bad name, one in use: before loading
    # Rank 0 reads the schema (a bad one fails here, before loading) and gives every rank its grammar below:
    # each rank then draws as rank 0 does, step for step (the draws' collectives must pair up).
    rules = grammar.from_flags(args.json, args.json_schema) if term.rank0 else None
    model_path = resolve_model(args.model_path, term.remark, args.tokenizer)
    if args.verify:
        folder.verify(model_path)
    model, tokenizer = mixtral.load_model(model_path, args.dtype, shares=args.shares, kv_dtype=args.kv_dtype)
    if args.verbose:
        term.remark(ops.KERNELS["line"])
    group = model.group
    rules = parallel.text_from_rank0(rules, group)
    # Every rank must make the same decisions: the context is what every rank can hold, the transcript rank 0's.
    max_context = args.max_context or parallel.least(machine.default_context(model), group)
    machine.check_memory(model, max_context, "--max-context", model_path)
    chat = Chat(
        model,
        tokenizer,
        args.system_prompt,
        max_context,
        args.max_tokens,
        args.temp,
        args.top_p,
        args.min_p,
        args.seed,
        on_notice=term.remark,
        model_id=folder.identity(model_path),
        experts=True,  # for /experts: keeping the router's choices costs no wait (bench.py: experts_cost)
        rules=rules,
    )
    resume = args.resume or (session.transcript if session and session.transcript.is_file() else None)
    if resume:
        text = parallel.text_from_rank0(sessions.read_text(resume) if term.rank0 else "", group)
        if session:
            why = session.resume(chat, text)
        else:
            chat.load(resume, text)
            why = sessions.restore_cache(chat, resume) if chat.tokens else None
        if why:
            term.remark(
                f"(not all of the saved cache of {resume} is used: {why}; the next message prefills "
                f"{len(chat.tokens) - chat.fed} tokens first)"
            )
    settings = {
        k: getattr(args, k) for k in ("model_path", "max_tokens", "temp", "top_p", "min_p", "dtype", "kv_dtype")
    }
    settings["max_context"] = max_context

    def autosave():
        if session:
            tic, size = time.perf_counter(), session.save(chat, settings, term.rank0)
            if args.verbose:
                term.remark(f"[session {session.name}: saved {size / 1e6:.2f} MB in {time.perf_counter() - tic:.3f} s]")

    if args.prompt is not None:
        stream_reply(chat, term, ctrl_c, lambda stopped: chat.ask(args.prompt, stopped), args.verbose)
        return autosave()
    if group is not None and term.rank0 and not term.interactive:
        term.remark("(under mlx.launch, end piped input with /quit: the launcher never passes the end of input on)")
    if term.interactive:
        persona = f" ({chat.system})" if chat.system else ""
        term.remark(f"Chatting with Menny{persona}. /help for commands, Ctrl-D to leave.")
        if chat.turns:
            term.remark(f"(resumed {len(chat.turns) // 2} exchanges from {resume})")
    while (line := term.read_shared(group)) is not None:
        try:
            if line.startswith("/"):
                if not command(chat, term, ctrl_c, line, settings, args.verbose):
                    break
            else:
                stream_reply(chat, term, ctrl_c, lambda stopped: chat.ask(line, stopped), args.verbose)
            autosave()
        except MixtralError as e:
            term.remark(f"error: {e}")


if __name__ == "__main__":
    main()
