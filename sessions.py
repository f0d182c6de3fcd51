"""A conversation on disk: its KV cache saved beside a transcript (chat.py's /save FILE, --resume FILE),
and named sessions saved after every turn (--session NAME).

A cache file is safetensors: per layer `I.k` and `I.v` (1, KV heads, tokens, head_dim) holding
tokens START to END of the conversation, and metadata saying what they belong to: the weights
(folder.identity), the compute dtype, this rank and the rank count, a hash of the first END token
ids, and a checksum of the data. A file is used only where all of it matches.
"""

import fcntl
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import List, Optional, Tuple

import mlx.core as mx
import numpy as np

import folder
import machine
import parallel
import runtime
from runtime import MixtralError

CACHE_FORMAT = "mixtral-mlx kv-cache 1"


def cache_file(path, group=None) -> Path:
    """Where /save FILE puts the conversation's KV cache: FILE's name with its suffix replaced by
    .kv.safetensors (talk.json -> talk.kv.safetensors); under mlx.launch each rank writes its part on
    its own machine, talk.rank1of2.kv.safetensors."""
    p = Path(path)
    return p.with_name(f"{p.stem}{rank_part(group)}.kv.safetensors")


def rank_part(group) -> str:
    """What names this rank's file under mlx.launch (".rank1of2"); nothing alone."""
    return f".rank{group.rank()}of{group.size()}" if group is not None else ""


def tokens_sha256(tokens: List[int]) -> str:
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()


def array_sha256(arrays: dict) -> str:
    """A checksum of the arrays' bytes, in name order (safetensors has none of its own)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(np.asarray(arrays[name].view(mx.uint8)).tobytes())
    return h.hexdigest()


def write_json(path: str, data):
    """UTF-8 JSON written atomically: a failed write leaves any old file whole."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MixtralError(f"{path}: cannot write ({e.strerror}); the previous file, if any, is unchanged") from None


def read_text(path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MixtralError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


# --------------------------------------------------------------------------- a transcript (/save FILE)


def write_transcript(path, messages: List[dict], settings: dict, seed: int):
    """The conversation as UTF-8 JSON, atomically: a failed write leaves any old file whole."""
    write_json(path, {"messages": messages, "settings": settings, "seed": seed})


def transcript_messages(path, text: str, vocab_size: int) -> List[dict]:
    """A transcript's text -> its messages; a reply's saved token ids must be ints the vocabulary has
    (others would read garbage embeddings)."""
    try:
        messages = json.loads(text)["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise TypeError("'messages' must be a list of objects")
        for i, m in enumerate(messages):
            tokens = m.get("tokens")
            if tokens is not None and not (
                isinstance(tokens, list) and all(type(t) is int and 0 <= t < vocab_size for t in tokens)
            ):
                raise TypeError(f"message {i}: 'tokens' must be a list of token ids from 0 to {vocab_size - 1}")
        return messages
    except (ValueError, KeyError, TypeError) as e:
        raise MixtralError(f"{path}: not a chat transcript ({e})") from None


# --------------------------------------------------------------------------- the KV cache beside it


def cache_identity(chat, n: int) -> dict:
    """What a saved cache of the first n tokens belongs to: it is used only where all of it matches."""
    group = chat.model.group
    return {
        "format": CACHE_FORMAT,
        "model": chat.model_id,
        "dtype": machine.dtype_name(chat.model.dtype),
        "kv_dtype": machine.dtype_name(chat.model.kv_dtype or chat.model.dtype),
        "rank": str(group.rank() if group else 0),
        "ranks": str(group.size() if group else 1),
        "shares": chat.model.plan.describe() if chat.model.plan else "whole",
        "tokens": str(n),
        "tokens_sha256": tokens_sha256(chat.tokens[:n]),
    }


def save_cache(chat, path) -> int:
    """Write the cache of the conversation beside the transcript at `path` (cache_file(path)),
    atomically; -> its size in bytes (0: nothing fed yet, and no file)."""
    target = cache_file(path, chat.model.group)
    if not chat.fed:
        target.unlink(missing_ok=True)
        return 0
    return write_segment(chat, target, 0, chat.fed)


def restore_cache(chat, path) -> Optional[str]:
    """After load(path): fill the cache from the one saved beside it, when it belongs to this model,
    dtype, rank count and transcript. -> None, or why it was not used (the next prefill feeds all)."""
    return restore_segments(chat, [cache_file(path, chat.model.group)])


def write_segment(chat, target: Path, a: int, b: int) -> int:
    """The cache of tokens a:b as safetensors, what it belongs to in its metadata; -> bytes."""
    arrays = {f"{i}.{k}": x[:, :, a:b] for i, c in enumerate(chat.cache) for k, x in zip("kv", c.state)}
    mx.eval(arrays)
    meta = cache_identity(chat, b) | {"start": str(a), "data_sha256": array_sha256(arrays)}
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}.safetensors")
    try:
        with runtime.signals_held():  # a Ctrl-C lands once the file is whole
            mx.save_safetensors(str(tmp), arrays, metadata=meta)
        os.replace(tmp, target)
    except (OSError, RuntimeError) as e:  # RuntimeError: MLX's own write failing (a full disk)
        tmp.unlink(missing_ok=True)
        raise MixtralError(
            f"{target}: cannot write ({getattr(e, 'strerror', None) or e}); the previous one, if any, is unchanged"
        ) from None
    return target.stat().st_size


def restore_segments(chat, files: List[Path]) -> Optional[str]:
    """Fill the (empty) cache from segments that follow each other from token 0, as far as they
    belong to this model, dtype, rank count and conversation. -> None when all were used, else why
    not (the cache keeps the segments before; the next prefill feeds the rest). Under mlx.launch
    the ranks agree: if one falls back, all do."""
    why, fed = None, 0
    for file in files:
        why = read_segment(chat, file, fed)
        if why is not None:
            break
        fed = chat.fed
    group = chat.model.group
    if group is not None and (parallel.any_rank(why is not None, group) or parallel.from_rank0(fed, group) != fed):
        why, fed = why or "another rank could not use its part", 0
    for c in chat.cache:
        c.trim(c.offset - fed)
    return why


def read_segment(chat, file: Path, start: int) -> Optional[str]:
    if not file.is_file():
        return f"no {file.name}"
    try:
        arrays, meta = mx.load(str(file), return_metadata=True)
        n = int(meta.get("tokens", -1))
        if int(meta.get("start", -1)) != start or not start < n <= len(chat.tokens):
            return f"{file.name} holds tokens {meta.get('start')} to {n}, not from {start}"
        if meta.get("tokens_sha256") != cache_identity(chat, n)["tokens_sha256"]:
            return "it holds another conversation (the transcript was edited, or cut to fit --max-context)"
        meta.setdefault("kv_dtype", meta.get("dtype"))  # saved before the cache had its own dtype
        for key, want in cache_identity(chat, n).items():
            if meta.get(key) != want:
                return f"it was saved with another {key} ({meta.get(key)}, here {want})"
        if meta.get("data_sha256") != array_sha256(arrays):
            return "it is damaged (its checksum differs)"
        for i, layer in enumerate(chat.model.layers):
            for x in (arrays[f"{i}.k"], arrays[f"{i}.v"]):
                heads, dtype = layer.attention.n_kv_heads, chat.model.kv_dtype or chat.model.dtype
                if x.shape[2] != n - start or x.dtype != dtype or x.shape[1] != heads:
                    return f"{file.name}: layer {i} has the wrong shape or dtype"
        for i, c in enumerate(chat.cache):
            c.update_and_fetch(arrays[f"{i}.k"], arrays[f"{i}.v"])
        mx.eval([c.state for c in chat.cache])
    except Exception as e:  # a truncated or foreign file: mx.load's error
        return f"{file.name} is unreadable ({str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__})"
    return None


# --------------------------------------------------------------------------- sessions


SESSION_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


class Session:
    """A named conversation kept in the cache folder and saved after every turn (--session NAME): its
    transcript (talk.json) and its KV cache in segments, kv.START-END.safetensors, each holding the
    tokens fed since the one before, so that a save writes only what is new. A save writes the new
    segment, then the transcript, each atomically: a process killed at any moment leaves a transcript
    whole, and segments that match it as far as they go (resuming prefills the rest). One chat at a
    time holds a session: a second one is refused."""

    def __init__(self, name: str, root: Optional[Path] = None):
        if not SESSION_NAME.fullmatch(name) or ".." in name:
            raise MixtralError(
                f"session name {name!r}: use up to 64 letters, digits, '.', '_' and '-' (no '/', no '..')"
            )
        self.name, self.dir = name, (root or sessions_root()) / name
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            # One lock per rank: local ranks under mlx.launch share the folder, each with its own part.
            self.lock = open(self.dir / f"lock{rank_part(parallel.world())}", "w")
        except OSError as e:
            raise MixtralError(
                f"{self.dir}: cannot write the sessions folder ({e.strerror}); set XDG_CACHE_HOME to a writable folder"
            ) from None
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MixtralError(
                f"session {name!r} is open in another chat; leave that one first (two would overwrite each other)"
            ) from None
        self.transcript = self.dir / "talk.json"
        self.written = []  # (start, end, tokens_sha256 of the first `end` tokens, file) of the segments kept

    def segments(self, group=None) -> List[Tuple[int, int, Path]]:
        part = rank_part(group)
        found = []
        for f in self.dir.glob(f"kv.*{part}.safetensors"):
            m = re.fullmatch(rf"kv\.(\d+)-(\d+){re.escape(part)}\.safetensors", f.name)
            if m:
                found.append((int(m[1]), int(m[2]), f))
        return sorted(found)

    def resume(self, chat, text: str) -> Optional[str]:
        """Continue the saved conversation (`text`: its transcript, as rank 0 read it). -> why its
        cache was not all used, or None."""
        chat.load(self.transcript, text)
        files = self.segments(chat.model.group)
        why = restore_segments(chat, [f for _, _, f in files]) if chat.tokens else None
        self.written = [(a, b, tokens_sha256(chat.tokens[:b]), f) for a, b, f in files if b <= chat.fed]
        return why

    def save(self, chat, settings: dict, rank0: bool = True) -> int:
        """Write what changed since the last save; -> bytes written."""
        fed, kept, end = chat.fed, [], 0
        for a, b, sha, f in self.written:  # the segments that still hold a prefix of the conversation
            if a != end or b > fed or sha != tokens_sha256(chat.tokens[:b]):
                break
            kept.append((a, b, sha, f))
            end = b
        written = 0
        if fed > end:
            f = self.dir / f"kv.{end:08d}-{fed:08d}{rank_part(chat.model.group)}.safetensors"
            written = write_segment(chat, f, end, fed)
            kept.append((end, fed, tokens_sha256(chat.tokens[:fed]), f))
        if rank0:
            chat.save(self.transcript, settings)
            written += self.transcript.stat().st_size
        for _, _, f in self.segments(chat.model.group):
            if f not in {k[3] for k in kept}:
                f.unlink(missing_ok=True)  # after the transcript: a kill before leaves them unmatched, not wrong
        self.written = kept
        return written


def sessions_root() -> Path:
    return folder.cache_root() / "sessions"


def session_rows(root: Optional[Path] = None) -> List[dict]:
    """The saved sessions, by name: exchanges, tokens cached, last use (seconds since the epoch), bytes on disk."""
    root = root or sessions_root()
    rows = []
    for d in sorted(p for p in root.glob("*") if (p / "talk.json").is_file()):
        try:
            turns = len([m for m in json.loads((d / "talk.json").read_text())["messages"] if m["role"] == "user"])
        except (OSError, ValueError, KeyError, TypeError):
            turns = None
        ends = [int(m[1]) for f in d.glob("kv.*.safetensors") if (m := re.match(r"kv\.\d+-(\d+)", f.name))]
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        used = (d / "talk.json").stat().st_mtime
        rows.append({"name": d.name, "turns": turns, "tokens": max(ends, default=0), "last_used": used, "bytes": size})
    return rows


def read_session(name: str, root: Optional[Path] = None) -> Optional[dict]:
    """A saved session's transcript, read only (no lock: saves replace it whole); None if there is none."""
    if not SESSION_NAME.fullmatch(name) or ".." in name:
        return None
    try:
        data = json.loads(((root or sessions_root()) / name / "talk.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def list_sessions(root: Optional[Path] = None) -> str:
    """One line per saved session: name, exchanges, tokens cached, last use, size on disk."""
    root = root or sessions_root()
    rows = []
    for r in session_rows(root):
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_used"]))
        turns = "?" if r["turns"] is None else r["turns"]
        rows.append(f"{r['name']:<24} {turns!s:>5} {r['tokens']:>8} {used:>17} {r['bytes'] / 1e6:>9.1f} MB")
    if not rows:
        return f"no sessions yet in {root} (start one with --session NAME)"
    return "\n".join([f"{'session':<24} {'turns':>5} {'tokens':>8} {'last used':>17} {'size':>12}", *rows])
