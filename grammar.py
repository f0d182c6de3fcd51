"""Structured output: replies that are JSON, or JSON that follows a JSON Schema, whatever the weights.

Before each token is drawn, every token the grammar cannot take next gets -inf (a mask over the
vocabulary); EOS is allowed only where the JSON is complete. The grammar engine is llguidance (MIT, no
dependencies, wheels for macOS arm64 and Linux; the JSON Schema compiler and token masks llama.cpp
uses), on our sentencepiece vocabulary. docs/structured-output.md has what was measured against xgrammar.

    constraint = grammar.Constraint(tokenizer, grammar.compile_format({"type": "json_object"}))
    mixtral.generate(model, ids, constraint=constraint)    # or batch.Sequence(..., constraint=...)
"""

import json
from typing import List, Optional

import mlx.core as mx
import numpy as np

from runtime import MixtralError

MAX_SCHEMA_BYTES = 1 << 20  # 1 MiB of JSON: larger schemas are refused before any work
MAX_DEPTH = 64  # nesting of the schema's JSON: deeper is refused (a real schema nests a dozen)

# Any JSON object (OpenAI's "json_object"): the schema llama-server uses for it.
ANY_OBJECT = {"type": "object"}
# Between two JSON tokens: nothing, a space, or a line break and an indent (llama.cpp's rule). Unbounded
# whitespace, JSON's own, would let a reply spin in blanks until max_tokens.
WHITESPACE = r"(?:[ ]|\n{1,2}[ \t]{0,20})?"


class FormatError(ValueError):
    """A response_format or schema we cannot take: its message names the part (a 400 in the server)."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise MixtralError(
            "structured output needs llguidance: pip install -r requirements.txt (it is pinned there)"
        ) from None
    return llguidance


def compile_schema(schema, where: str = "the schema") -> str:
    """A JSON Schema (a dict, or its text) -> the grammar that follows it; FormatError names what cannot be
    taken (not JSON, too large, too deep, a keyword the compiler does not implement, an invalid schema)."""
    if isinstance(schema, (str, bytes)):
        if len(schema) > MAX_SCHEMA_BYTES:
            raise FormatError(f"{where} is {len(schema)} bytes; at most {MAX_SCHEMA_BYTES} are taken")
        try:
            schema = json.loads(schema)
        except (ValueError, RecursionError) as e:
            raise FormatError(f"{where} is not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise FormatError(f"{where} must be a JSON object (a JSON Schema), not {type(schema).__name__}")
    check_size(schema, where)
    ll = _llguidance()
    grammar = ll.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_pattern": WHITESPACE})
    is_error, messages = ll.LLMatcher.validate_grammar_with_warnings(grammar, None)
    if is_error:
        raise FormatError(f"{where} cannot be used: {first_line(messages[0])}")
    return grammar


def check_size(schema, where: str):
    """Refuse a schema too large or too deeply nested before the compiler sees it (iteratively: a
    10,000-deep one must not exhaust Python's stack either)."""
    stack, nodes = [(schema, 1)], 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if depth > MAX_DEPTH:
            raise FormatError(f"{where} nests deeper than {MAX_DEPTH} levels")
        if nodes > MAX_SCHEMA_BYTES // 4:
            raise FormatError(f"{where} has more than {MAX_SCHEMA_BYTES // 4} parts")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children)


def first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"


def compile_format(response_format) -> Optional[str]:
    """OpenAI's response_format -> a grammar, or None for plain text:
    {"type": "text"}; {"type": "json_object"}; {"type": "json_schema", "json_schema": {"name", "schema",
    "strict"}}. FormatError for anything else, naming the field."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise FormatError('\'response_format\' must be an object such as {"type": "json_object"}')
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return compile_schema(ANY_OBJECT)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise FormatError("'response_format.json_schema' must be an object with a 'schema' (a JSON Schema)")
        return compile_schema(spec["schema"], "'response_format.json_schema.schema'")
    raise FormatError(f"'response_format.type' {kind!r} is not supported: use 'text', 'json_object' or 'json_schema'")


def read_schema_file(path) -> str:
    """--json-schema FILE -> its grammar (MixtralError, one line, for a file that cannot be used)."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_SCHEMA_BYTES + 1)
    except OSError as e:
        raise MixtralError(f"{path}: cannot read the schema ({e.strerror})") from None
    try:
        return compile_schema(text, str(path))
    except FormatError as e:
        raise MixtralError(f"{e}; pass a JSON Schema file") from None


def add_flags(p):
    """--json and --json-schema FILE (mixtral.py and chat.py)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="every reply is a JSON object")
    g.add_argument("--json-schema", metavar="FILE", help="every reply is JSON that follows this JSON Schema")


def from_flags(any_json: bool, schema_file: Optional[str]) -> Optional[str]:
    """The grammar --json or --json-schema FILE asks for, or None."""
    if schema_file:
        return read_schema_file(schema_file)
    return compile_schema(ANY_OBJECT) if any_json else None


# --------------------------------------------------------------------------- the vocabulary


def token_bytes(sp) -> List[bytes]:
    """Each token's bytes as it adds them to the text: pieces with '▁' as a space, byte-fallback tokens
    <0xNN> as that byte; control and unknown tokens as llguidance's special tokens (0xFF, then the name)."""
    out = []
    for i in range(sp.vocab_size()):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            out.append(bytes([int(piece[3:5], 16)]))
        elif sp.is_control(i) or sp.is_unknown(i):
            out.append(b"\xff" + piece.encode())
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out


class _Vocabulary:
    """What llguidance.TokenizerWrapper reads of a tokenizer."""

    def __init__(self, tokenizer):
        sp = tokenizer._sp
        self.sp, self.eos_token_id, self.bos_token_id = sp, tokenizer.eos_id, tokenizer.bos_id
        self.tokens = token_bytes(sp)
        self.special_token_ids = [i for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)]

    def __call__(self, text):
        # Text inside a reply: without sentencepiece's leading space. A newline before it is two tokens
        # of its own ('▁', '<0x0A>'), never merged with what follows.
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return self.sp.encode("\n" + text)[2:]


def ll_tokenizer(tokenizer):
    """The tokenizer's llguidance form, made once (~0.1 s for 32000 tokens) and kept on it."""
    if getattr(tokenizer, "_ll", None) is None:
        ll = _llguidance()
        tokenizer._ll = ll.LLTokenizer(ll.TokenizerWrapper(_Vocabulary(tokenizer)))
    return tokenizer._ll


# --------------------------------------------------------------------------- one reply's constraint


class Constraint:
    """The grammar's state along one reply: mask() before each draw, accept(id) after it."""

    def __init__(self, tokenizer, grammar: str):
        ll = _llguidance()
        self.vocab = tokenizer.vocab_size
        self.matcher = ll.LLMatcher(ll_tokenizer(tokenizer), grammar, log_level=0)
        if self.matcher.is_error():
            raise FormatError(f"the grammar cannot be used: {first_line(self.matcher.get_error())}")
        self.bits = np.zeros((self.vocab + 31) // 32, np.int32)

    def mask(self) -> mx.array:
        """(vocab,) bool: the tokens the grammar takes next (EOS only where the JSON is complete)."""
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        allowed = np.unpackbits(self.bits.view(np.uint8), bitorder="little")[: self.vocab]
        return mx.array(allowed.astype(np.bool_))

    def accept(self, token: int):
        """The drawn token, one mask() allowed. A refusal means the grammar could not go on (a limit of the
        engine reached mid-reply: its mask then allows nothing): the reply ends with that error."""
        if not self.matcher.consume_token(token):
            raise MixtralError(f"the JSON grammar could not go on ({first_line(self.matcher.get_error())})")

    @property
    def done(self) -> bool:
        """No token but EOS can follow (the JSON is complete and cannot go on)."""
        return self.matcher.is_stopped()
