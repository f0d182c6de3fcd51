"""mixtral.py's one-shot CLI prints exactly what generate() produces."""

import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest

import mixtral

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, stdin=None):
    cmd = [sys.executable, str(ROOT / "mixtral.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, input=stdin, timeout=120)


def expected_text(model_path, prompt, n, **kw):
    model, tok = mixtral.load_model(model_path)
    ids = []
    for y in islice(mixtral.generate(model, tok.encode(prompt), **kw), n):
        if y == tok.eos_id:
            break
        ids.append(y)
    return tok.decode(ids)


@pytest.mark.parametrize("sampling", [[], ["--temp", "0.9", "--top-p", "0.95", "--seed", "7"]])
def test_prompt_prints_decode_of_generated_ids(mlx_q8, sampling):
    r = run_cli("--model-path", mlx_q8, "--prompt", "Once upon a time", "--max-tokens", 30, *sampling)
    assert r.returncode == 0, r.stderr
    kw = dict(temp=0.9, top_p=0.95, seed=7) if sampling else {}
    text = expected_text(mlx_q8, "Once upon a time", 30, **kw)
    assert text and r.stdout == text + "\n"
    assert "tokens/s" in r.stderr and "peak" in r.stderr


def test_prompt_dash_reads_stdin(mlx_q8):
    r = run_cli("--model-path", mlx_q8, "--prompt", "-", "--max-tokens", 12, stdin="Once upon a time")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected_text(mlx_q8, "Once upon a time", 12, seed=0) + "\n"


def test_missing_model_is_a_one_line_error(tmp_path):
    r = run_cli("--model-path", tmp_path / "nothing", "--prompt", "hi")
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "nothing: no such folder" in r.stderr and "Traceback" not in r.stderr
