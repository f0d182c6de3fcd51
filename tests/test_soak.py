"""Soak: 200 piped turns on a tiny model with a small --max-context. Slow, so out of the quick run:

python3 -m pytest -m soak
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import chat
import mixtral

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mb(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_200_turns_keep_memory_flat_and_the_persona_in_the_cache(tmp_path, mlx_q8):
    p = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "chat.py"),
            "--model-path",
            str(mlx_q8),
            "--max-context",
            "200",
            "--max-tokens",
            "12",
            "--seed",
            "0",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peaks = {}
    for turn in range(1, 201):
        p.stdin.write(f"message {turn}: tell me something about the number {turn}\n")
        p.stdin.flush()
        assert p.stdout.readline(), p.stderr.read()
        if turn in (50, 200):
            peaks[turn] = peak_rss_mb(p.pid)
    p.stdin.write(f"/save {tmp_path / 't.json'}\n")
    p.stdin.close()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 0 and "error" not in err and "Traceback" not in err, err
    print(f"peak RSS after 50 turns {peaks[50]:.0f} MB, after 200 {peaks[200]:.0f} MB")
    assert peaks[200] <= 1.05 * peaks[50]
    # The saved conversation is what the cache held at the end: the persona starts it.
    saved = json.loads((tmp_path / "t.json").read_text())["messages"]
    assert saved[0] == {"role": "system", "content": chat.DEFAULT_SYSTEM_PROMPT}
    assert saved[1]["content"] != "message 1: tell me something about the number 1"  # old turns were dropped
    tok = mixtral.Tokenizer(mlx_q8 / "tokenizer.model")
    ids = chat.encode_messages(tok, saved)
    assert len(ids) <= 200 and ids[: 1 + len(chat.user_block(tok, saved[1]["content"], saved[0]["content"]))] == [
        tok.bos_id
    ] + chat.user_block(tok, saved[1]["content"], saved[0]["content"])
