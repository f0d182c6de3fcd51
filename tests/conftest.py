"""What every test file shares: the repo's root on sys.path, the tiny checkpoints, and how to run one
of our programs and judge its one-line error."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, settings
from openai import OpenAI

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import convert  # noqa: E402
import mixtral  # noqa: E402
import ops  # noqa: E402
from synthetic import TOKENIZER, write_hf_checkpoint, write_input_major  # noqa: E402

# Property tests are derandomized: the same examples on every run, so CI cannot pass once and fail the
# next time. HUNT=50 python3 -m pytest: the property tests get 50x the examples, new ones each run.
HUNT = int(os.environ.get("HUNT", 0))
settings.register_profile("project", derandomize=not HUNT, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile("project")
examples = lambda n: n * max(HUNT, 1)


# The converted forms every layer must work in: 8 and 4 bits, none, and a folder in the input-major
# layout earlier versions wrote (repacked at load).
LAYOUTS = {
    "8-bit standard": dict(q_bits=8),
    "4-bit standard": dict(q_bits=4),
    "unquantized": dict(q_bits=None),
    "8-bit input-major": dict(q_bits=None, input_major=8),
}


def convert_form(hf_path, out, q_bits=8, input_major=None):
    """hf_path converted as LAYOUTS names; input_major=BITS: then rewritten as earlier versions wrote it."""
    if not input_major:
        return convert.convert(hf_path, out, q_bits=q_bits, log=lambda s: None)
    unquantized = convert.convert(hf_path, Path(f"{out}.source"), q_bits=None, dtype="float32", log=lambda s: None)
    return write_input_major(unquantized, out, bits=input_major)


@pytest.fixture
def kernels():
    """Choose the quantized projections' kernels for one test (ops.use_kernels), then restore."""
    before = dict(ops.KERNELS)
    yield ops.use_kernels
    ops.KERNELS.update(before)


def default_signals():
    """In a child, before exec: SIGINT and SIGTERM do what they do by default, whatever pytest's own
    disposition is (a background job of a script, `cmd &`, inherits SIGINT ignored)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def command(program, *args):
    return [sys.executable, str(ROOT / program), *map(str, args)]


def run_script(program, *args, stdin=None, timeout=120, **kw) -> subprocess.CompletedProcess:
    """Run one of our programs to its end; text unless stdin is bytes."""
    kw.setdefault("text", not isinstance(stdin, bytes))
    kw.setdefault("preexec_fn", default_signals)
    return subprocess.run(command(program, *args), input=stdin, capture_output=True, timeout=timeout, **kw)


def popen_script(program, *args, **kw) -> subprocess.Popen:
    """Start one of our programs, to signal it or talk to it."""
    kw.setdefault("preexec_fn", default_signals)
    return subprocess.Popen(command(program, *args), **kw)


def assert_one_line_error(r, *fragments):
    """Status 1 and a single line `error: ...` holding each fragment, no traceback."""
    err = r.stderr.decode() if isinstance(r.stderr, bytes) else r.stderr
    assert r.returncode == 1, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err


def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", seed=0)


def _converted(tmp_path_factory, hf_path, name, **kw):
    out = tmp_path_factory.mktemp("mlx") / name
    convert.convert(hf_path, out, log=lambda s: None, **kw)
    return out


@pytest.fixture(scope="session")
def mlx_fp(tmp_path_factory, hf_tiny):
    return _converted(tmp_path_factory, hf_tiny, "fp", q_bits=None)


@pytest.fixture(scope="session")
def mlx_q8(tmp_path_factory, hf_tiny):
    return _converted(tmp_path_factory, hf_tiny, "q8", q_bits=8)


@pytest.fixture
def model_copy(tmp_path, mlx_q8):
    """A copy of the tiny 8-bit folder to damage."""
    return copy_folder(mlx_q8, tmp_path / "m")


@pytest.fixture(scope="session")
def tokenizer():
    return mixtral.Tokenizer(TOKENIZER)


KEY = "test-key"


class Server:
    """server.py on a free loopback port, until stop()."""

    def __init__(self, model_path, *args, key=KEY, env=None):
        self.proc = popen_script(
            "server.py",
            "--model-path",
            model_path,
            "--port",
            0,
            *(["--api-key", key] if key else []),
            *args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.log = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            self.log.append(line)
            if not line or line.startswith("serving "):
                break
        assert line.startswith("serving "), "".join(self.log)
        self.url = line.split(" on ")[1].split()[0]  # http://127.0.0.1:PORT/v1
        self.reader = threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True)
        self.reader.start()
        self.client = OpenAI(base_url=self.url, api_key=key or "-", timeout=60, max_retries=0)
        self.http = httpx.Client(base_url=self.url.removesuffix("/v1"), timeout=60)

    def post(self, path, body=None, content=None, key=KEY):
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        return self.http.post(path, json=body, content=content, headers=headers)

    def stop(self, sig=signal.SIGTERM):
        """-> (exit status, what it printed on stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        self.reader.join(timeout=5)
        return self.proc.returncode, "".join(self.log)
