"""runtime.py: the exit path of every program."""

import subprocess
import sys

import pytest

import runtime
from conftest import ROOT, default_signals


@pytest.mark.parametrize(
    "sig, code, line", [("SIGTERM", 143, runtime.TERMINATED_ALONE), ("SIGINT", 130, "interrupted")]
)
def test_a_signal_that_a_library_turns_into_another_exception_still_exits_quietly(sig, code, line):
    # mlx.launch SIGTERMs the other ranks when one fails. Landing inside a C extension's import
    # (sentencepiece's, in CI), the signal surfaced as "ImportError: initialization failed" raised from
    # it, and rank 0 printed a traceback. Ctrl-C there does the same. This body does what that import
    # did, at a chosen moment.
    body = (
        "import os, signal, time, runtime\n"
        "def body():\n"
        "    try:\n"
        f"        os.kill(os.getpid(), signal.{sig}); time.sleep(10)\n"
        "    except BaseException as e:\n"
        "        raise ImportError('initialization failed') from e\n"
        "runtime.run_program(body)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", body], cwd=ROOT, capture_output=True, text=True, timeout=60, preexec_fn=default_signals
    )
    assert r.returncode == code and r.stderr == line + "\n", r.stderr
