"""Bad files, bad input and signals: one line `error: ...` (or `interrupted`), never a traceback,
nothing lost or half-written."""

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import chat
import mixtral
import runtime
from mixtral import MixtralError

ROOT = Path(__file__).resolve().parent.parent


def run(program, *args, stdin=None, env=None, **kw):
    return subprocess.run(
        [sys.executable, str(ROOT / program), *map(str, args)],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=120,
        **kw,
    )


def one_line_error(r, *fragments):
    err = r.stderr.decode() if isinstance(r.stderr, bytes) else r.stderr
    assert r.returncode == 1, err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err


@pytest.fixture
def model_copy(tmp_path, mlx_q8):
    out = tmp_path / "m"
    shutil.copytree(mlx_q8, out)
    return out


# --------------------------------------------------------------------------- converted folders


@pytest.mark.parametrize("block", [{"bits": 8}, "8-bit", {"bits": 8, "group_size": 64, "layout": "sideways"}])
def test_a_bad_quantization_block_is_one_line(model_copy, block):
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**config, "quantization": block}))
    one_line_error(run("mixtral.py", "--model-path", model_copy, "--prompt", "hi"), "'quantization' must be")


def test_a_tokenizer_of_another_vocabulary_is_refused_at_load(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**config, "vocab_size": 32064}))
    with pytest.raises(MixtralError, match="a vocabulary of 32000 tokens, but the model has 32064"):
        mixtral.load_model(model_copy)


def damage(shard: Path, how: str):
    data = bytearray(shard.read_bytes())
    with zipfile.ZipFile(shard) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)  # the largest member
    central = data.rfind(b"PK\x01\x02")
    if how == "member data":
        data[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF
    elif how == "member header":
        data[info.header_offset + 30 : info.header_offset + 30 + len(info.filename)] = b"x" * len(info.filename)
    elif how == "zip directory":
        data[central : central + 4] = b"XXXX"
    elif how == "truncated tail":
        data = data[: len(data) - 1000]
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["member data", "member header", "zip directory", "truncated tail"])
def test_a_damaged_shard_is_named_before_the_first_token(model_copy, how):
    damage(model_copy / "weights.00.npz", how)
    r = run("mixtral.py", "--model-path", model_copy, "--prompt", "hi")
    one_line_error(r, "weights.00.npz")
    assert r.stdout == b""


@pytest.mark.parametrize("how", ["member data", "truncated tail"])
def test_verify_names_the_damaged_file_and_passes_an_intact_copy(model_copy, mlx_q8, how):
    r = run("mixtral.py", "--verify", "--model-path", mlx_q8)
    assert r.returncode == 0 and b"every file is intact" in r.stderr
    damage(model_copy / "weights.00.npz", how)
    r = run("mixtral.py", "--verify", "--model-path", model_copy)
    assert (
        r.returncode == 1 and b"error: " in r.stderr and b"weights.00.npz" in r.stderr and b"Traceback" not in r.stderr
    )


def test_info_describes_a_folder_without_reading_its_weights(model_copy):
    damage(model_copy / "weights.00.npz", "member data")  # --info must not care
    r = run("mixtral.py", "--info", "--model-path", model_copy)
    assert r.returncode == 0, r.stderr
    for field in (b"source", b"8 bits, group 64", b"mean 0.5", b"KV cache"):
        assert field in r.stdout, r.stdout


# --------------------------------------------------------------------------- input


@pytest.mark.parametrize(
    "messages,message",
    [
        (["hi"], "list of objects"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "tokens": ["a"]}],
            "'tokens' must be",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "tokens": [5, 99999]}],
            "from 0 to 31999",
        ),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "tokens": [True]}],
            "'tokens' must be",
        ),
    ],
)
def test_a_bad_transcript_is_one_line_at_start(tmp_path, mlx_q8, messages, message):
    t = tmp_path / "t.json"
    t.write_text(json.dumps({"messages": messages}))
    one_line_error(run("chat.py", "--model-path", mlx_q8, "--resume", t, stdin=b""), "not a chat transcript", message)


def test_a_transcript_longer_than_the_context_keeps_its_newest_exchanges(tmp_path, mlx_q8, tokenizer):
    model, _ = mixtral.load_model(mlx_q8)
    long = chat.Chat(model, tokenizer, max_tokens=8, temp=0.0, seed=0)
    for i in range(12):
        "".join(long.ask(f"message {i} with a few more words in it"))
    long.save(tmp_path / "t.json", {})
    notices = []
    short = chat.Chat(model, tokenizer, max_tokens=8, temp=0.0, seed=0, max_context=128, on_notice=notices.append)
    short.load(tmp_path / "t.json")
    assert len(short.tokens) + 9 <= 128 and short.messages == long.messages[-len(short.messages) :]
    assert "dropped the" in notices[0] and short.messages[0]["role"] == "user"
    assert short.tokens == chat.encode_messages(tokenizer, short.conversation())
    "".join(short.regen())  # a reply budget that is positive
    assert short.messages[-1]["tokens"]


def test_lines_that_are_not_utf8_are_refused_and_the_chat_goes_on(mlx_q8):
    r = run("chat.py", "--model-path", mlx_q8, "--max-tokens", 3, "--temp", 0, stdin=b"caf\xe9\nhello\n")
    assert r.returncode == 0, r.stderr
    assert b"not UTF-8 text (byte 0xe9)" in r.stderr and b"Traceback" not in r.stderr
    assert r.stdout.count(b"\n") == 1  # one reply: to "hello"


def test_a_prompt_on_stdin_that_is_not_utf8_is_one_line(mlx_q8):
    one_line_error(run("mixtral.py", "--model-path", mlx_q8, "--prompt", "-", stdin=b"caf\xe9"), "not UTF-8")


def test_save_writes_atomically_and_keeps_the_old_file_when_writing_fails(tmp_path, mlx_q8):
    t = tmp_path / "t.json"
    t.write_text("old transcript")
    script = (
        f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "import chat, mixtral\n"
        f"m, tok = mixtral.load_model({str(mlx_q8)!r})\n"
        "c = chat.Chat(m, tok, max_tokens=4, seed=0)\n"
        "''.join(c.ask('hi ' * 200))\n"
        f"c.save({str(t)!r}, {{}})\n"
    )
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))  # writes past 100 bytes fail
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert "cannot write" in r.stderr and "previous file, if any, is unchanged" in r.stderr
    assert t.read_text() == "old transcript" and [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_two_hugging_face_folders_of_the_same_name_get_two_conversions(tmp_path, hf_tiny, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    a, b = tmp_path / "a" / "tiny", tmp_path / "b" / "tiny"
    shutil.copytree(hf_tiny, a)
    shutil.copytree(hf_tiny, b)
    assert chat.resolve_model(str(a), log=lambda s: None) != chat.resolve_model(str(b), log=lambda s: None)
    assert chat.resolve_model(str(a), log=lambda s: None) == chat.resolve_model(str(a), log=lambda s: None)


# --------------------------------------------------------------------------- signals


def test_ctrl_c_while_piped_exits_130_without_a_traceback(mlx_q8):
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "chat.py"), "--model-path", str(mlx_q8), "--max-tokens", "2"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    p.stdin.write("hi\n")
    p.stdin.flush()
    p.stdout.readline()  # replied: now waiting for the next line
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and err.strip().endswith("interrupted") and "Traceback" not in err, err


def test_ctrl_c_during_one_shot_generation_exits_130_without_a_traceback(mlx_q8):
    p = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "mixtral.py"),
            "--model-path",
            str(mlx_q8),
            "--prompt",
            "Once",
            "--max-tokens",
            "1000000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    p.stdout.read(10)  # generating
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and b"interrupted" in err and b"Traceback" not in err, err


@pytest.mark.parametrize("sig, code, line", [("SIGTERM", 143, runtime.TERMINATED), ("SIGINT", 130, "interrupted")])
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
    r = subprocess.run([sys.executable, "-c", body], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == code and r.stderr == line + "\n", r.stderr


# --------------------------------------------------------------------------- the converter


def test_a_failing_write_is_one_line_and_leaves_nothing(tmp_path, hf_tiny):
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # a full disk, for this process
    r = subprocess.run(
        [sys.executable, str(ROOT / "convert.py"), "--hf-path", hf_tiny, "--mlx-path", tmp_path / "out"],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert (
        r.stderr.splitlines()[-1].startswith("error: ")
        and "out: cannot write" in r.stderr
        and "nothing was written" in r.stderr
    )
    assert list(tmp_path.iterdir()) == []


def test_a_target_folder_that_cannot_be_written_is_one_line(tmp_path, hf_tiny):
    # root writes through permissions: /sys stays read-only to it (on Linux; elsewhere it is missing)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    target = Path("/sys/mixtral-out") if os.geteuid() == 0 else locked / "out"
    one_line_error(run("convert.py", "--hf-path", hf_tiny, "--mlx-path", target), f"{target}: cannot write there")
    assert not target.exists() and list(locked.iterdir()) == []


def test_a_rerun_removes_what_a_killed_conversion_left(tmp_path, hf_tiny):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    leftover = tmp_path / f".out.tmp-{dead}-abcd"
    leftover.mkdir()
    (leftover / "weights.00.npz").write_bytes(b"x" * 1000)
    mine = tmp_path / f".out.tmp-{os.getpid()}-efgh"  # a live process's: not touched
    mine.mkdir()
    r = run("convert.py", "--hf-path", hf_tiny, "--mlx-path", tmp_path / "out")
    assert r.returncode == 0 and b"left by an interrupted conversion" in r.stderr, r.stderr
    assert not leftover.exists() and mine.exists()


def test_a_safetensors_entry_without_data_offsets_is_one_line(tmp_path, hf_tiny):
    src = tmp_path / "hf"
    shutil.copytree(hf_tiny, src)
    shard = sorted(src.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    del header[name]["data_offsets"]
    new = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n :])
    one_line_error(run("convert.py", "--hf-path", src, "--mlx-path", tmp_path / "out"), "has no valid data_offsets")


def test_ctrl_c_during_the_first_run_conversion_exits_130_and_leaves_nothing(tmp_path):
    from synthetic import write_hf_checkpoint

    hf = write_hf_checkpoint(
        tmp_path / "hf",
        seed=2,
        n_shards=8,
        hidden_size=512,
        intermediate_size=1792,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "chat.py"), "--model-path", str(hf), "--prompt", "hi"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert "converting" in p.stderr.readline()
    assert p.stderr.readline().startswith("[1/")  # converting layer by layer now
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.strip().endswith("interrupted") and "Traceback" not in err, err
    cache = tmp_path / "cache" / "mixtral-mlx"
    assert not any(cache.glob("*/config.json")) and not any(cache.glob(".*tmp*"))
